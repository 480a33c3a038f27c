"""Complete standard diffusers pipelines around the tiny denoisers: VAEs, text encoders, tokenizers, schedulers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .families import _SDXL_POOLED_DIM, _TEXT_DIM, PIPELINE_KINDS
from .models import _build_model
from .tokenizers import _CLIP_MAX_LEN, _clip_ids, _clip_tokenizer, _t5_tokenizer

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


def _clip_text_model(tokenizer: Any, hidden: int, *, projection_dim: int | None = None) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=max(1024, len(tokenizer)),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=_CLIP_MAX_LEN,
        projection_dim=projection_dim or hidden,
        hidden_act="quick_gelu",
        **_clip_ids(tokenizer),
    )
    cls = CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection
    return cls(config)


def _t5_encoder(tokenizer: Any, *, umt5: bool = False) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    cfg_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = cfg_cls(
        vocab_size=max(128, len(tokenizer)),
        d_model=_TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return model_cls(config)


def _vae(*, latent_channels: int = 4, flow: str | None = None) -> torch.nn.Module:
    """Two-level AutoencoderKL (spatial factor 2). ``flow`` = "sd3" / "flux" adds their scaling and shift."""
    from diffusers import AutoencoderKL

    extra: dict[str, Any] = {}
    if flow in ("sd3", "flux"):  # the real SD3 / Flux VAE latent statistics; no quant convs
        scaling, shift = (1.5305, 0.0609) if flow == "sd3" else (0.3611, 0.1159)
        extra = {"scaling_factor": scaling, "shift_factor": shift}
        extra.update(use_quant_conv=False, use_post_quant_conv=False)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        **extra,
    )


def _wan_vae() -> torch.nn.Module:
    """AutoencoderKLWan with real compression (8x spatial, 4x temporal) but tiny widths."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )


# --------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------
def _build_pipeline(kind: str) -> DiffusionPipeline:
    import diffusers

    if kind == "sd":
        tok = _clip_tokenizer()
        return diffusers.StableDiffusionPipeline(
            vae=_vae(),
            text_encoder=_clip_text_model(tok, _TEXT_DIM),
            tokenizer=tok,
            unet=_build_model("unet_sd15"),
            # SD1.5's shipped DDIM settings (the class defaults trigger the pipeline's deprecation warnings)
            scheduler=diffusers.DDIMScheduler(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                clip_sample=False,
                set_alpha_to_one=False,
                steps_offset=1,
            ),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if kind == "sdxl":
        tok, tok2 = _clip_tokenizer(), _clip_tokenizer(pad_token="!")
        half = _TEXT_DIM // 2  # the UNet cross-attends to both encoders' hidden states concatenated
        return diffusers.StableDiffusionXLPipeline(
            vae=_vae(),
            text_encoder=_clip_text_model(tok, half),
            text_encoder_2=_clip_text_model(tok2, half, projection_dim=_SDXL_POOLED_DIM),
            tokenizer=tok,
            tokenizer_2=tok2,
            unet=_build_model("unet_sdxl"),
            scheduler=diffusers.EulerDiscreteScheduler(),
            add_watermarker=False,
        )
    if kind == "sd3":
        tok, tok2, tok3 = _clip_tokenizer(), _clip_tokenizer(pad_token="!"), _t5_tokenizer()
        half = _TEXT_DIM // 2  # CLIP-L and CLIP-G hidden states are concatenated, padded to T5 width
        return diffusers.StableDiffusion3Pipeline(
            transformer=_build_model("sd3"),
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_vae(flow="sd3"),
            text_encoder=_clip_text_model(tok, half, projection_dim=half),
            tokenizer=tok,
            text_encoder_2=_clip_text_model(tok2, half, projection_dim=half),
            tokenizer_2=tok2,
            text_encoder_3=_t5_encoder(tok3),
            tokenizer_3=tok3,
        )
    if kind == "flux":
        tok, tok2 = _clip_tokenizer(), _t5_tokenizer()
        return diffusers.FluxPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0),
            vae=_vae(flow="flux"),
            text_encoder=_clip_text_model(tok, _TEXT_DIM),
            tokenizer=tok,
            text_encoder_2=_t5_encoder(tok2),
            tokenizer_2=tok2,
            transformer=_build_model("flux"),
        )
    if kind == "wan":
        tok = _t5_tokenizer()
        return diffusers.WanPipeline(
            tokenizer=tok,
            text_encoder=_t5_encoder(tok, umt5=True),
            vae=_wan_vae(),
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0),
            transformer=_build_model("wan"),
        )
    raise ValueError(f"unknown pipeline kind {kind!r}; expected one of {PIPELINE_KINDS}")


def tiny_pipeline(kind: str, seed: int = 0) -> DiffusionPipeline:
    """A full standard diffusers pipeline with tiny random components; ``kind`` in ``PIPELINE_KINDS``.

    sd -> StableDiffusionPipeline, sdxl -> StableDiffusionXLPipeline, flux -> FluxPipeline,
    wan -> WanPipeline, sd3 -> StableDiffusion3Pipeline. The denoiser has the same config as
    ``tiny_model`` of the matching family. VAEs compress 2x spatially (Wan: 8x spatial, 4x temporal),
    CLIP tokenizers have ``model_max_length`` 16. Deterministic for a seed; the global RNG is untouched.
    """
    if kind not in PIPELINE_KINDS:
        raise ValueError(f"unknown pipeline kind {kind!r}; expected one of {PIPELINE_KINDS}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _build_pipeline(kind)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            if any(p.dtype != torch.float32 for p in component.parameters()):
                component.float()
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
