"""AnimateDiff (``AnimateDiffPipeline`` around ``UNetMotionModel``) end to end: its spatial attention runs per frame
(a batch of videos x frames) and its motion modules over the frames of each pixel (a batch of videos x pixels); a
sliding window acts on both, PAG acts, and prompt-to-prompt keeps the source video exactly while it edits the target
(which needs every per-frame and per-pixel entry to get its video's role and branch)."""

from __future__ import annotations

import diffusers
import pytest
import torch

import diffattn
from diffattn.runtime.position import prompt_branches
from diffattn.testing.zoo import zoo_cases

FRAMES, HEIGHT, WIDTH, STEPS = 3, 40, 56, 2  # latents 3 x 5 x 7


@pytest.fixture(scope="module")
def pipe():
    (case,) = [c for c in zoo_cases() if c.model_class == "UNetMotionModel"]
    pipe = diffusers.AnimateDiffPipeline(
        vae=None,
        text_encoder=None,
        tokenizer=None,
        unet=case.build(),
        motion_adapter=None,
        scheduler=diffusers.DDIMScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, prompts: int = 1, guidance_scale: float = 5.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    embeds, negative = torch.randn(2, 7, 12, generator=gen), torch.randn(2, 7, 12, generator=gen)
    with torch.no_grad():
        return pipe(
            prompt_embeds=embeds[:prompts],
            negative_prompt_embeds=negative[:prompts],
            num_frames=FRAMES,
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=STEPS,
            guidance_scale=guidance_scale,
            generator=[torch.Generator().manual_seed(0) for _ in range(prompts)],
            output_type="latent",
        ).frames


def test_sliding_window_acts_on_per_frame_and_temporal_layers_and_remove_restores_stock(pipe):
    stock = _run(pipe)
    with diffattn.apply(pipe, diffattn.SlidingWindowAttention(window=3)) as handle:
        out = _run(pipe)
        acted = handle.acted()
    assert {step for step, _ in acted} == set(range(STEPS))
    layers = {layer for _, layer in acted}
    assert any("motion_modules" in layer for layer in layers) and any(".attentions." in layer for layer in layers)
    assert not torch.equal(out, stock)
    assert torch.equal(_run(pipe), stock)


def test_layers_see_their_per_frame_and_temporal_grids(pipe):
    from support import Recording

    method = Recording(read=lambda q, k, ctx: (ctx.layer, ctx.q_layout.grid, q.shape[0], ctx.batch_roles))
    with diffattn.apply(pipe, method):
        _run(pipe)
    seen = {layer: (grid, batch, roles) for layer, grid, batch, roles in method.seen}
    temporal = seen["mid_block.motion_modules.0.transformer_blocks.0.attn1"]
    spatial = seen["down_blocks.0.attentions.0.transformer_blocks.0.attn1"]
    assert temporal[0] == (FRAMES,) and temporal[1] == 2 * 3 * 4  # [uncond, cond] x the 3 x 4 pixels of level 1
    assert temporal[2] == ("uncond",) * 12 + ("cond",) * 12
    assert spatial[0] == (5, 7) and spatial[1] == 2 * FRAMES
    assert spatial[2] == ("uncond",) * FRAMES + ("cond",) * FRAMES


def test_pag_acts_and_disabling_restores_stock(pipe):
    stock = _run(pipe)
    with diffattn.guidance.enable(pipe, diffattn.PAG(scale=3.0)):
        guided = _run(pipe)
    assert not torch.equal(guided, stock) and torch.isfinite(guided).all()
    assert torch.equal(_run(pipe), stock)


def test_prompt_to_prompt_keeps_the_source_video_and_edits_the_target(pipe):
    with prompt_branches(("source", "target")):
        plain = _run(pipe, prompts=2)
        with diffattn.apply(pipe, diffattn.PromptToPrompt(cross_replace=0.8, self_replace=0.4)) as handle:
            edited = _run(pipe, prompts=2)
            assert handle.acted()
    assert torch.equal(edited[0], plain[0])
    assert not torch.equal(edited[1], plain[1])
