"""End to end through real diffusers video pipelines (HunyuanVideo 1.5, LTX-2, WanVACE), tiny and offline: a sparse
method acts on every step and remove() restores stock bitwise, PAG guidance acts and disabling restores stock, and
Prompt-to-Prompt on a (source, target) pair keeps the source exact and edits the target.

The pipelines are built from configs (no downloads): the denoiser as in the zoo (``diffattn.testing.zoo``) with the
input channels the pipeline feeds it, tiny VAEs (the pipelines read their compression ratios and latent statistics
even for ``output_type="latent"``), text encoders and tokenizers ``None``, and precomputed prompt embeddings (with
their masks) of the shapes the text encoders would give. Every run is 2 steps on a 3 x 3 x 5 latent token grid."""

from __future__ import annotations

import functools

import pytest
import torch

import diffattn
from diffattn.runtime.position import prompt_branches
from diffattn.testing.zoo.hunyuan_video15 import _hunyuan_video15
from diffattn.testing.zoo.ltx2 import _ltx2

STEPS = 2
GRID = (3, 3, 5)  # latent frames x rows x columns, odd and non-square


_BUILT: list = []


def _eval(pipe):
    _BUILT.append(pipe)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------------------
# HunyuanVideo 1.5: joint video + (image-prompt, ByT5, MLLM) attention, CFG through its ClassifierFreeGuidance guider
# (separate pred_cond / pred_uncond calls in cache contexts)
# --------------------------------------------------------------------------------------------------------------------
_HY_MLLM, _HY_MLLM_DIM, _HY_BYT5, _HY_BYT5_DIM = 5, 16, 3, 12


@functools.cache
def hunyuan15_pipe():
    import diffusers
    from diffusers.guiders import ClassifierFreeGuidance

    torch.manual_seed(0)
    transformer = _hunyuan_video15(
        in_channels=9,  # latents (4) + conditioning latents (4) + mask (1), as the pipeline concatenates them
        text_embed_dim=_HY_MLLM_DIM,
        text_embed_2_dim=_HY_BYT5_DIM,
    )
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLHunyuanVideo15(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 16),
        layers_per_block=1,
        spatial_compression_ratio=4,
        temporal_compression_ratio=2,
        downsample_match_channel=False,
        upsample_match_channel=False,
    )
    pipe = diffusers.HunyuanVideo15Pipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        vae=vae,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=None,
        tokenizer_2=None,
        guider=ClassifierFreeGuidance(guidance_scale=5.0),
    )
    return _eval(pipe)


def _hunyuan15_embeds(seed: int, batch: int) -> dict:
    return {
        "embeds": _randn(seed, batch, _HY_MLLM, _HY_MLLM_DIM),
        "embeds_mask": torch.ones(batch, _HY_MLLM),
        "embeds_2": _randn(seed + 1, batch, _HY_BYT5, _HY_BYT5_DIM),
        "embeds_mask_2": torch.ones(batch, _HY_BYT5),
    }


def hunyuan15_kwargs(prompts: int = 1) -> dict:
    """Positive embeddings (one per prompt; prompt p seeded 10 + 2p), the negative ones (the text encoders are None,
    so the pipeline cannot encode the empty negative prompt itself), the same starting noise for every prompt."""
    positive = [_hunyuan15_embeds(10 + 2 * p, 1) for p in range(prompts)]
    negative = _hunyuan15_embeds(0, prompts)
    f, h, w = GRID
    kwargs = {
        "prompt_embeds": torch.cat([e["embeds"] for e in positive]),
        "prompt_embeds_mask": torch.cat([e["embeds_mask"] for e in positive]),
        "prompt_embeds_2": torch.cat([e["embeds_2"] for e in positive]),
        "prompt_embeds_mask_2": torch.cat([e["embeds_mask_2"] for e in positive]),
        "negative_prompt_embeds": negative["embeds"],
        "negative_prompt_embeds_mask": negative["embeds_mask"],
        "negative_prompt_embeds_2": negative["embeds_2"],
        "negative_prompt_embeds_mask_2": negative["embeds_mask_2"],
        "latents": _randn(1, 1, 4, f, h, w).expand(prompts, -1, -1, -1, -1).clone(),
        "height": 4 * h,
        "width": 4 * w,
        "num_frames": 2 * (f - 1) + 1,
        "num_inference_steps": STEPS,
        "output_type": "latent",
    }
    return kwargs


# --------------------------------------------------------------------------------------------------------------------
# LTX-2: video self- and cross-attention (audio left alone), CFG batched [uncond, cond] in one call
# --------------------------------------------------------------------------------------------------------------------
_LTX_TEXT, _LTX_CAPTION, _LTX_LAYERS = 7, 16, 3  # tokens, caption channels, text-encoder hidden states stacked


@functools.cache
def ltx2_pipe():
    import diffusers
    from diffusers.pipelines.ltx2 import LTX2TextConnectors

    torch.manual_seed(0)
    transformer = _ltx2(caption_channels=_LTX_CAPTION)
    torch.manual_seed(0)
    connectors = LTX2TextConnectors(
        caption_channels=_LTX_CAPTION,
        text_proj_in_factor=_LTX_LAYERS,
        video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=8,
        video_connector_num_layers=1,
        video_connector_num_learnable_registers=None,
        audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=8,
        audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None,
        connector_rope_base_seq_len=32,
        rope_double_precision=False,
    )
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLLTX2Video(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8,),
        down_block_types=("LTX2VideoDownBlock3D",),
        decoder_block_out_channels=(8,),
        layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        spatio_temporal_scaling=(True,),
        decoder_spatio_temporal_scaling=(True,),
        decoder_inject_noise=(False, False),
        downsample_type=("spatial",),
        upsample_type=("spatiotemporal",),
        upsample_residual=(False,),
        upsample_factor=(1,),
        patch_size=1,
        patch_size_t=1,
        decoder_causal=False,
    )
    torch.manual_seed(0)
    audio_vae = diffusers.AutoencoderKLLTX2Audio(
        base_channels=4,
        output_channels=2,
        ch_mult=(1,),
        num_res_blocks=1,
        in_channels=2,
        resolution=32,
        latent_channels=2,
        mel_bins=8,
    )
    pipe = diffusers.LTX2Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        audio_vae=audio_vae,
        text_encoder=None,
        tokenizer=None,
        connectors=connectors,
        transformer=transformer,
        vocoder=None,  # only decodes audio, which output_type="latent" skips
    )
    return _eval(pipe)


def ltx2_kwargs(prompts: int = 1) -> dict:
    """Gemma's stacked hidden states as the pipeline packs them, (B, L, caption_channels * layers), and their mask;
    the negative ones too (no text encoder to encode the empty prompt); the same starting noise for every prompt."""
    f, h, w = GRID
    positive = torch.cat([_randn(10 + p, 1, _LTX_TEXT, _LTX_CAPTION * _LTX_LAYERS) for p in range(prompts)])
    return {
        "prompt_embeds": positive,
        "prompt_attention_mask": torch.ones(prompts, _LTX_TEXT),
        "negative_prompt_embeds": _randn(0, prompts, _LTX_TEXT, _LTX_CAPTION * _LTX_LAYERS),
        "negative_prompt_attention_mask": torch.ones(prompts, _LTX_TEXT),
        "latents": _randn(1, 1, 4, f, h, w).expand(prompts, -1, -1, -1, -1).clone(),
        "audio_latents": _randn(2, 1, 2, 5, 2).expand(prompts, -1, -1, -1).clone(),
        "height": 32 * h,
        "width": 32 * w,
        "num_frames": 8 * (f - 1) + 1,
        "frame_rate": 25.0,
        "guidance_scale": 3.0,
        "stg_scale": 0.0,  # spatio-temporal guidance off: its blocks (default [28]) are not in a 2-layer model
        "modality_scale": 1.0,
        "guidance_rescale": 0.0,
        "audio_guidance_rescale": 0.0,
        "audio_stg_scale": 0.0,
        "audio_modality_scale": 1.0,
        "num_inference_steps": STEPS,
        "output_type": "latent",
    }


# --------------------------------------------------------------------------------------------------------------------
# WanVACE: self- and cross-attention in the main blocks and the control branch, CFG as separate cond / uncond calls
# --------------------------------------------------------------------------------------------------------------------
_WAN_TEXT, _WAN_TEXT_DIM = 7, 16


@functools.cache
def wan_vace_pipe(vace_layers: tuple[int, ...] = (0,)):
    """The zoo's WanVACE config: one control layer (``vace_layers=[0]``)."""
    import diffusers

    from diffattn.testing.pipelines import _wan_vae

    torch.manual_seed(0)
    transformer = diffusers.WanVACETransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        text_dim=_WAN_TEXT_DIM,
        freq_dim=32,
        ffn_dim=48,
        num_layers=2,
        rope_max_seq_len=32,
        in_channels=16,
        out_channels=16,
        vace_layers=list(vace_layers),
        vace_in_channels=96,  # inactive + reactive latents (2 x 16) + the 8 x 8 mask channels
    )
    torch.manual_seed(0)
    pipe = diffusers.WanVACEPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=_wan_vae(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0),
        transformer=transformer,
    )
    return _eval(pipe)


def wan_vace_kwargs(prompts: int = 1) -> dict:
    f, h, w = GRID
    positive = torch.cat([_randn(10 + p, 1, _WAN_TEXT, _WAN_TEXT_DIM) for p in range(prompts)])
    return {
        "prompt_embeds": positive,
        "negative_prompt_embeds": _randn(0, prompts, _WAN_TEXT, _WAN_TEXT_DIM),
        "latents": _randn(1, 1, 16, f, 2 * h, 2 * w).expand(prompts, -1, -1, -1, -1).clone(),
        "height": 16 * h,
        "width": 16 * w,
        "num_frames": 4 * (f - 1) + 1,
        "guidance_scale": 5.0,
        "num_inference_steps": STEPS,
        "output_type": "latent",
    }


# --------------------------------------------------------------------------------------------------------------------
PIPELINES = {
    "HunyuanVideo15Pipeline": (hunyuan15_pipe, hunyuan15_kwargs),
    "LTX2Pipeline": (ltx2_pipe, ltx2_kwargs),
    "WanVACEPipeline": (wan_vace_pipe, wan_vace_kwargs),
}


def _latents(output) -> torch.Tensor:
    frames = output.frames
    return frames if isinstance(frames, torch.Tensor) else torch.as_tensor(frames)


def run(name: str, prompts: int = 1, pipe=None) -> torch.Tensor:
    build, kwargs = PIPELINES[name]
    with torch.no_grad():
        return _latents((pipe or build())(**kwargs(prompts)))


@functools.cache
def stock(name: str) -> torch.Tensor:
    return run(name)


@pytest.fixture(autouse=True)
def _clean():
    yield
    for pipe in _BUILT:  # a failed assertion must not leave hooks on a cached pipeline
        diffattn.remove(pipe)


@pytest.mark.parametrize("name", list(PIPELINES))
def test_pipeline_runs_stock_on_the_odd_grid(name):
    out = stock(name)
    assert torch.isfinite(out).all()
    assert torch.equal(run(name), out), "two stock calls must agree bitwise"


@pytest.mark.parametrize("name", PIPELINES)
def test_sliding_tile_attention_acts_on_every_step_and_remove_restores_stock(name):
    pipe = PIPELINES[name][0]()
    handle = diffattn.apply(pipe, diffattn.SlidingTileAttention(tile=(1, 1, 1), window=(1, 3, 3)))
    out = run(name)
    acted = handle.acted()
    handle.remove()
    assert {step for step, _ in acted} == set(range(STEPS)), f"acted on {sorted(acted)}"
    assert not torch.equal(out, stock(name)), "a 1 x 3 x 3 window on a 3 x 3 x 5 grid changed nothing"
    assert torch.equal(run(name), stock(name)), "after remove() the output must be bitwise stock"


@pytest.mark.parametrize("name", PIPELINES)
def test_pag_changes_the_output_and_disabling_restores_stock(name):
    _check_pag(name, PIPELINES[name][0](), stock(name))


def _check_pag(name: str, pipe, stock_out: torch.Tensor) -> None:
    with diffattn.guidance.enable(pipe, diffattn.PAG(scale=3.0)) as handle:
        out = run(name, pipe=pipe)
        steps = {r.step for r in handle.records}
    assert steps == set(range(STEPS)), f"PAG guided the steps {sorted(steps)}"
    assert not torch.equal(out, stock_out), "PAG (scale 3) changed nothing"
    assert torch.equal(run(name, pipe=pipe), stock_out), "after disabling PAG the output must be bitwise stock"


def test_pag_on_wan_vace_with_two_control_layers():
    """The same pipeline with vace_layers=[0, 1]: control_hidden_states_scale (2 values) no longer looks like the
    batch (1), and PAG works; the failure above is the shape coincidence, nothing else."""
    pipe = wan_vace_pipe((0, 1))
    _check_pag("WanVACEPipeline", pipe, run("WanVACEPipeline", pipe=pipe))


def _pair(name: str, method) -> tuple[torch.Tensor, torch.Tensor, set]:
    """The (source, target) outputs of one call on two prompts declared as branches, and where ``method`` acted."""
    pipe = PIPELINES[name][0]()
    handle = diffattn.apply(pipe, method) if method is not None else None
    try:
        with prompt_branches(("source", "target")):
            out = run(name, prompts=2)
    finally:
        acted = handle.acted() if handle is not None else set()
        if handle is not None:
            handle.remove()
    return out[0], out[1], acted


@pytest.mark.parametrize("name", ["HunyuanVideo15Pipeline", "LTX2Pipeline"])
def test_prompt_to_prompt_keeps_the_source_and_edits_the_target(name):
    plain_source, plain_target, _ = _pair(name, None)
    source, target, acted = _pair(name, diffattn.PromptToPrompt(cross_replace=0.8, self_replace=0.4))
    assert {step for step, _ in acted} == set(range(STEPS)), f"acted on {sorted(acted)}"
    assert torch.equal(source, plain_source), "P2P must leave the source branch bitwise as the plain pair's"
    assert not torch.equal(target, plain_target), "P2P changed nothing in the target"


def test_wan_vace_pipeline_runs_one_prompt_only_so_prompt_to_prompt_cannot_run_through_it():
    """diffusers 0.42.1 WanVACEPipeline: two prompts make two conditioning videos, which prepare_video_latents refuses
    ('Generating with more than one video is not yet supported'); one video for two prompts fails in the
    transformer (its control tokens keep batch 1). A diffusers limit, not diffattn's: when this starts to pass,
    add WanVACEPipeline to the Prompt-to-Prompt test."""
    with pytest.raises(ValueError, match="more than one video"):
        run("WanVACEPipeline", prompts=2)
