"""Real-image inversion for editing: the inversion's intermediate latents in the source branch (MasaCtrl's
``ref_intermediate_latents``), null-text inversion's per-step unconditional embeddings, and the reconstruction check
that flags images unlike the model's training data."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch

import diffattn
from diffattn.editing import (
    Inversion,
    NullTextConfig,
    check_reconstruction,
    edit,
    invert,
    null_text_invert,
)
from diffattn.testing import tiny_pipeline

PROMPT, TARGET, STEPS, SIZE = "a red circle", "a blue circle", 4, dict(height=32, width=32)


@functools.cache
def pipeline(kind: str = "sd"):
    pipe = tiny_pipeline(kind, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.cache
def image() -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1, (32, 32, 3)).astype(np.float32)


@functools.cache
def inversion() -> Inversion:
    out = invert(pipeline(), image(), PROMPT, STEPS, **SIZE, return_intermediates=True)
    assert isinstance(out, Inversion)
    return out


@functools.cache
def null_text() -> Inversion:
    # the embeddings' values do not matter to the tests of where they go: few, large steps
    config = NullTextConfig(inner_steps=2, learning_rate=0.1)
    return null_text_invert(
        pipeline(), image(), PROMPT, STEPS, guidance_scale=3.0, config=config, progress=False, **SIZE
    )


def decoded(latents: torch.Tensor) -> np.ndarray:
    """What the pipeline's own decoding makes of ``latents`` (the reconstruction of an encoded image)."""
    pipe = pipeline()
    with torch.no_grad():
        pixels = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(pixels, output_type="np")[0]


def test_invert_returns_the_trajectory_in_denoising_order():
    inv = inversion()
    plain = invert(pipeline(), image(), PROMPT, STEPS, **SIZE)
    assert torch.equal(inv.latents, plain), "the intermediates must not change the inverted noise"
    assert len(inv.trajectory) == STEPS and inv.prompt == PROMPT and inv.num_inference_steps == STEPS
    # the last latent is the encoded image, the first a noisier one
    pipe = pipeline()
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(image(), **SIZE)
        encoded = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    torch.testing.assert_close(inv.trajectory[-1], encoded, rtol=0, atol=1e-6)
    assert not torch.equal(inv.trajectory[0], inv.trajectory[-1])


@pytest.mark.parametrize(
    "method",
    [None, diffattn.PromptToPrompt(), diffattn.MutualSelfAttention(start_step=0)],
    ids=["plain", "prompt-to-prompt", "masactrl"],
)
def test_with_intermediates_the_source_side_is_the_reconstruction_exactly(method):
    inv = inversion()
    reconstruction = decoded(inv.trajectory[-1])
    kept = edit(pipeline(), PROMPT, TARGET, method, inversion=inv, guidance_scale=5.0, **SIZE)
    free = edit(pipeline(), PROMPT, TARGET, method, inversion=inv.without_trajectory(), guidance_scale=5.0, **SIZE)
    np.testing.assert_allclose(kept.source, reconstruction, rtol=0, atol=1e-6)
    assert np.abs(free.source - reconstruction).max() > 1e-2, "without intermediates DDIM drifts at CFG 5"
    assert np.isfinite(kept.target).all()


def test_intermediates_reach_every_copy_and_run_before_local_blend():
    inv = inversion()
    reconstruction = decoded(inv.trajectory[-1])
    blend = diffattn.LocalBlend(words=("circle",), threshold=0.3)
    out = edit(
        pipeline(),
        PROMPT,
        TARGET,
        diffattn.PromptToPrompt(local_blend=blend),
        inversion=inv,
        guidance_scale=5.0,
        num_images_per_prompt=2,
        **SIZE,
    )
    for copy in out.source:
        np.testing.assert_allclose(copy, reconstruction, rtol=0, atol=1e-6)


def test_null_text_embeddings_reduce_the_reconstruction_error_at_cfg():
    """On the embedded image model (32 px, trained: its text steers the prediction, unlike the tiny random models',
    where DDIM's own inversion error dwarfs what guidance adds): at CFG 4, the source side of an edit from null-text
    inversion reproduces a rendered scene better than from the same DDIM-inverted noise with the empty prompt's
    embedding."""
    from diffattn_bench.embedded import load_image_pipeline
    from diffattn_bench.grammar import Scene, ShapeSpec
    from diffattn_bench.render import render_scene

    pipe = load_image_pipeline()
    pipe.set_progress_bar_config(disable=True)
    scene, _ = render_scene(Scene((ShapeSpec("circle", "red", "left"),)), 32, rng=0, jitter=False)
    prompt, steps = "a red circle on the left", 10
    inv = null_text_invert(pipe, scene, prompt, steps, guidance_scale=4.0, progress=False)
    assert len(inv.uncond_embeddings) == steps and inv.guidance_scale == 4.0 and inv.trajectory is None
    truth = scene.astype(np.float32) / 255
    tuned = edit(pipe, prompt, prompt, None, inversion=inv)  # guidance 4 from the inversion
    plain = edit(pipe, prompt, prompt, None, inversion=inv.without_null_text(), guidance_scale=4.0)
    tuned_error = float(np.mean((tuned.source - truth) ** 2))
    plain_error = float(np.mean((plain.source - truth) ** 2))
    assert tuned_error < 0.5 * plain_error, (tuned_error, plain_error)


def test_null_text_embeddings_reach_every_unconditional_entry_and_only_those():
    inv = null_text()
    pipe = pipeline()
    seen: list[torch.Tensor] = []
    spy = pipe.unet.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True
    )
    try:
        edit(pipe, PROMPT, TARGET, None, inversion=inv, **SIZE)
    finally:
        spy.remove()
    cond = pipe.encode_prompt([PROMPT, TARGET], "cpu", 1, False)[0]
    assert len(seen) == STEPS
    for step, hidden in enumerate(seen):  # the batch is [uncond source, uncond target, cond source, cond target]
        for row in (0, 1):
            torch.testing.assert_close(hidden[row], inv.uncond_embeddings[step][0], rtol=0, atol=0)
        torch.testing.assert_close(hidden[2:], cond, rtol=0, atol=0)
    assert not torch.equal(inv.uncond_embeddings[0], inv.uncond_embeddings[-1]), "one embedding per step"


def test_edit_refuses_an_inversion_it_cannot_use():
    inv, pipe = inversion(), pipeline()
    with pytest.raises(ValueError, match="source=inversion.prompt"):
        edit(pipe, "a green circle", TARGET, None, inversion=inv, **SIZE)
    with pytest.raises(ValueError, match="inversion's step count"):
        edit(pipe, PROMPT, TARGET, None, inversion=inv, num_inference_steps=STEPS + 1, **SIZE)
    with pytest.raises(ValueError, match="not both"):
        edit(pipe, PROMPT, TARGET, None, inversion=inv, latents=inv.latents, **SIZE)
    with pytest.raises(TypeError, match="latents="):
        edit(pipe, PROMPT, TARGET, None, inversion=inv.latents, **SIZE)
    with pytest.raises(ValueError, match="optimised for guidance_scale=3.0"):
        edit(pipe, PROMPT, TARGET, None, inversion=null_text(), guidance_scale=5.0, **SIZE)


def test_inversion_and_null_text_arguments_are_checked():
    inv = inversion()
    with pytest.raises(ValueError, match="one tensor per denoising step"):
        dataclasses.replace(inv, trajectory=inv.trajectory[:-1])
    with pytest.raises(ValueError, match="guidance scale > 1"):
        dataclasses.replace(inv, uncond_embeddings=(torch.zeros(1, 16, 32),) * STEPS)
    with pytest.raises(ValueError, match=r"\(1, tokens, dim\)"):
        dataclasses.replace(inv, uncond_embeddings=(torch.zeros(16, 32),) * STEPS, guidance_scale=3.0)
    with pytest.raises(ValueError, match="guidance_scale must be a number > 1"):
        null_text_invert(pipeline(), image(), PROMPT, STEPS, guidance_scale=1.0, **SIZE)
    with pytest.raises(ValueError, match="inner_steps"):
        NullTextConfig(inner_steps=-1)
    with pytest.raises(ValueError, match="SD1.x / SD2.x"):
        null_text_invert(pipeline("sdxl"), image(), PROMPT, STEPS, guidance_scale=3.0, **SIZE)


def test_reconstruction_check_flags_an_image_below_the_threshold():
    inv, pipe = inversion(), pipeline()
    check = check_reconstruction(pipe, image(), PROMPT, inv, STEPS, threshold=1000.0, **SIZE)
    assert check.out_of_domain and f"{check.psnr:.1f} dB" in check.message
    manual = -10 * np.log10(np.mean((check.reconstruction.astype(np.float64) - image()) ** 2))
    assert check.psnr == pytest.approx(manual, abs=1e-6)
    relaxed = check_reconstruction(pipe, image(), PROMPT, inv.latents, STEPS, threshold=check.psnr - 1, **SIZE)
    assert not relaxed.out_of_domain and relaxed.message is None
    with pytest.raises(ValueError, match="threshold"):
        check_reconstruction(pipe, image(), PROMPT, inv, STEPS, threshold=float("nan"), **SIZE)
    with pytest.raises(ValueError, match="size it was inverted at"):
        check_reconstruction(pipe, image()[:16], PROMPT, inv, STEPS, threshold=20.0, **SIZE)
