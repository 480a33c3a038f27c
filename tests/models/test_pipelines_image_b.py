"""diffattn through the real diffusers pipelines of CogView4, Lumina 2 and PixArt-Sigma, built tiny and offline.

Each pipeline wraps its zoo denoiser (``diffattn.testing.zoo``: seeded random weights, 6 x 10 latents, patch 2 -> a
3 x 5 token grid) with ``vae=None`` (``output_type="latent"``), ``text_encoder=None`` and ``tokenizer=None``, and is
called with precomputed, seeded prompt embeddings (plus the attention masks Lumina 2 and PixArt require), 2 inference
steps at height 48 x width 80. Per pipeline:

1. a sparse method (``SlidingWindowAttention``) acts on every step, changes the output, and ``remove()`` restores the
   stock output bitwise;
2. PAG (``diffattn.guidance.enable``) with the pipeline's CFG on changes the output, and disabling it restores it;
3. Prompt-to-Prompt on a (source, target) pair of prompt embeddings keeps the source exactly and changes the target.

Lumina 2 runs its conditional and unconditional calls separately with no ``cache_context``: the runtime tells them
apart by the prompt-embedding tensor each call receives (``prompt_embeds`` / ``negative_prompt_embeds`` of the
pipeline call). PixArt-Sigma keeps ``do_classifier_free_guidance`` as a local of ``__call__``, which the runtime reads
from the pipeline's frame.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import diffusers
import pytest
import torch

import diffattn
from diffattn.runtime.position import prompt_branches
from diffattn.testing.zoo import zoo_cases

HEIGHT, WIDTH = 48, 80  # latents 6 x 10 (VAE factor 8), patch 2 -> a 3 x 5 token grid
STEPS = 2
TEXT_LEN = 7
WINDOW = (1, 3)  # a 3 x 5 grid: one row, three columns per query (every query misses most keys)


def _zoo_model(model_class: str) -> torch.nn.Module:
    (case,) = [c for c in zoo_cases() if c.id == model_class]
    assert case.grid == (3, 5)
    return case.build()


def _embeds(batch: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt embeddings, negative prompt embeddings): ``batch`` distinct prompts of TEXT_LEN tokens."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TEXT_LEN, dim, generator=gen), torch.randn(batch, TEXT_LEN, dim, generator=gen)


@dataclass
class Tiny:
    """A tiny pipeline and how to call it: ``run(prompts, cfg)`` gives the final latents of ``prompts`` (1: one
    prompt; 2: a (source, target) pair), every prompt starting from the same seeded noise."""

    pipe: diffusers.DiffusionPipeline
    call: Callable[[diffusers.DiffusionPipeline, int, bool], torch.Tensor]
    guidance_scale: float

    def run(self, prompts: int = 1, cfg: bool = True) -> torch.Tensor:
        torch.manual_seed(0)
        with torch.no_grad():
            return self.call(self.pipe, prompts, cfg)


def _generators(n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(0) for _ in range(n)]


def _cogview4() -> Tiny:
    transformer = _zoo_model("CogView4Transformer2DModel")
    # CogView4's own scheduler config (dynamic, linear time shift); everything else its default
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        base_shift=0.25, max_shift=0.75, base_image_seq_len=256, use_dynamic_shifting=True, time_shift_type="linear"
    )
    pipe = diffusers.CogView4Pipeline(
        tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=scheduler
    )
    embeds, negative = _embeds(2, transformer.config.text_embed_dim, seed=1)

    def call(pipe, prompts, cfg):
        return pipe(
            prompt_embeds=embeds[:prompts],
            negative_prompt_embeds=negative[:prompts],
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=STEPS,
            guidance_scale=5.0 if cfg else 1.0,
            generator=_generators(prompts),
            output_type="latent",
        ).images

    return Tiny(pipe, call, 5.0)


def _lumina2() -> Tiny:
    transformer = _zoo_model("Lumina2Transformer2DModel")
    pipe = diffusers.Lumina2Pipeline(
        transformer=transformer,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
    )
    embeds, negative = _embeds(2, transformer.config.cap_feat_dim, seed=2)
    mask = torch.ones(2, TEXT_LEN, dtype=torch.long)  # one unmasked length per batch (the adapter requires it)

    def call(pipe, prompts, cfg):
        negatives = (
            {"negative_prompt_embeds": negative[:prompts], "negative_prompt_attention_mask": mask[:prompts]}
            if cfg
            else {}
        )
        return pipe(
            prompt_embeds=embeds[:prompts],
            prompt_attention_mask=mask[:prompts],
            **negatives,
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=STEPS,
            guidance_scale=4.0 if cfg else 1.0,
            generator=_generators(prompts),
            output_type="latent",
        ).images

    return Tiny(pipe, call, 4.0)


def _pixart_sigma() -> Tiny:
    transformer = _zoo_model("PixArtTransformer2DModel")
    pipe = diffusers.PixArtSigmaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=transformer,
        scheduler=diffusers.DPMSolverMultistepScheduler(),  # PixArt-Sigma's scheduler class, default config
    )
    embeds, negative = _embeds(2, transformer.config.caption_channels, seed=3)
    mask = torch.ones(2, TEXT_LEN, dtype=torch.long)

    def call(pipe, prompts, cfg):
        negatives = (
            {"negative_prompt_embeds": negative[:prompts], "negative_prompt_attention_mask": mask[:prompts]}
            if cfg
            else {}
        )
        return pipe(
            prompt_embeds=embeds[:prompts],
            prompt_attention_mask=mask[:prompts],
            negative_prompt=None,  # the default "" conflicts with negative_prompt_embeds
            **negatives,
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=STEPS,
            guidance_scale=4.5 if cfg else 1.0,
            generator=_generators(prompts),
            output_type="latent",
            use_resolution_binning=False,  # binning needs sample_size 32 / 64 / 128 / 256
        ).images

    return Tiny(pipe, call, 4.5)


BUILDERS = {"cogview4": _cogview4, "lumina2": _lumina2, "pixart_sigma": _pixart_sigma}


@pytest.fixture(scope="module")
def tinies():
    built: dict[str, Tiny] = {}

    def get(kind: str) -> Tiny:
        if kind not in built:
            built[kind] = BUILDERS[kind]()
        return built[kind]

    yield get
    for tiny in built.values():
        diffattn.remove(tiny.pipe)


@pytest.fixture(scope="module")
def stock():
    """Stock outputs, computed once per (pipeline, prompts, cfg)."""
    cache: dict[tuple, torch.Tensor] = {}

    def get(tiny: Tiny, kind: str, prompts: int = 1, cfg: bool = True) -> torch.Tensor:
        key = (kind, prompts, cfg)
        if key not in cache:
            cache[key] = tiny.run(prompts, cfg)
        return cache[key]

    return get


def _latents_shape(prompts: int) -> tuple[int, ...]:
    return (prompts, 4, HEIGHT // 8, WIDTH // 8)


# ------------------------------------------------------------------------------------------------------------------
# 1. Sparse attention acts on every step and is removed exactly
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_sliding_window_acts_on_every_step_and_remove_restores_stock(kind, tinies, stock):
    tiny = tinies(kind)
    base = stock(tiny, kind)
    assert base.shape == _latents_shape(1)
    handle = diffattn.apply(tiny.pipe, diffattn.SlidingWindowAttention(window=WINDOW))
    try:
        sparse = tiny.run()
        acted = handle.acted()
    finally:
        handle.remove()
    assert {step for step, _ in acted} == set(range(STEPS))
    layers = {layer for _, layer in acted}
    assert all((step, layer) in acted for step in range(STEPS) for layer in layers)  # every layer on every step
    assert not torch.equal(sparse, base)
    assert torch.isfinite(sparse).all()
    assert torch.equal(tiny.run(), base)


# ------------------------------------------------------------------------------------------------------------------
# 2. PAG with the pipeline's CFG on
# ------------------------------------------------------------------------------------------------------------------
def _pag_changes_and_disable_restores(tiny: Tiny, base: torch.Tensor, cfg: bool) -> None:
    with diffattn.guidance.enable(tiny.pipe, diffattn.PAG(scale=3.0)) as handle:
        guided = tiny.run(cfg=cfg)
        records = handle.records
    assert {r.step for r in records} == set(range(STEPS))
    assert all(r.scale == 3.0 and r.delta > 0 for r in records)
    assert not torch.equal(guided, base)
    assert torch.isfinite(guided).all()
    assert torch.equal(tiny.run(cfg=cfg), base)


@pytest.mark.parametrize(
    "kind",
    [
        "cogview4",
        "lumina2",
        "pixart_sigma",
    ],
)
def test_pag_with_cfg_changes_the_output_and_disable_restores_stock(kind, tinies, stock):
    tiny = tinies(kind)
    _pag_changes_and_disable_restores(tiny, stock(tiny, kind), cfg=True)


@pytest.mark.parametrize(
    "kind",
    ["cogview4", "lumina2", "pixart_sigma"],
)
def test_pag_without_cfg_changes_the_output_and_disable_restores_stock(kind, tinies, stock):
    tiny = tinies(kind)
    _pag_changes_and_disable_restores(tiny, stock(tiny, kind, cfg=False), cfg=False)


# ------------------------------------------------------------------------------------------------------------------
# 3. Prompt-to-Prompt keeps the source and edits the target
# ------------------------------------------------------------------------------------------------------------------
def _p2p_keeps_source_and_changes_target(tiny: Tiny, plain: torch.Tensor, cfg: bool) -> None:
    assert plain.shape == _latents_shape(2)
    assert not torch.equal(plain[0], plain[1])  # two different prompts from the same noise
    method = diffattn.PromptToPrompt(cross_replace=0.8, self_replace=0.4)
    with diffattn.apply(tiny.pipe, method) as handle, prompt_branches(("source", "target")):
        edited = tiny.run(2, cfg=cfg)
        acted = handle.acted()
    assert {step for step, _ in acted} == set(range(STEPS))
    assert torch.equal(edited[0], plain[0])
    assert not torch.equal(edited[1], plain[1])
    assert torch.isfinite(edited).all()
    with prompt_branches(("source", "target")):
        assert torch.equal(tiny.run(2, cfg=cfg), plain)


def _plain_pair(tiny: Tiny, kind: str, stock, cfg: bool) -> torch.Tensor:
    with prompt_branches(("source", "target")):
        return stock(tiny, kind, prompts=2, cfg=cfg)


@pytest.mark.parametrize(
    "kind",
    [
        "cogview4",
        "lumina2",
        "pixart_sigma",
    ],
)
def test_prompt_to_prompt_with_cfg_keeps_the_source_and_changes_the_target(kind, tinies, stock):
    tiny = tinies(kind)
    _p2p_keeps_source_and_changes_target(tiny, _plain_pair(tiny, kind, stock, cfg=True), cfg=True)


@pytest.mark.parametrize(
    "kind",
    ["cogview4", "lumina2", "pixart_sigma"],
)
def test_prompt_to_prompt_without_cfg_keeps_the_source_and_changes_the_target(kind, tinies, stock):
    tiny = tinies(kind)
    _p2p_keeps_source_and_changes_target(tiny, _plain_pair(tiny, kind, stock, cfg=False), cfg=False)


def test_the_pixart_pair_without_diffattn_methods_runs_and_differs(tinies, stock):
    """The tiny PixArt pipeline itself runs a pair of different prompts."""
    tiny = tinies("pixart_sigma")
    plain = _plain_pair(tiny, "pixart_sigma", stock, cfg=True)
    assert plain.shape == _latents_shape(2) and not torch.equal(plain[0], plain[1])
