"""Full tiny pipelines: Dense is bitwise stock end to end; layer and step scheduling act exactly where asked,
including a second generation; each batch entry's role (uncond / cond) reaches the method."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import diffattn
from diffattn.testing import tiny_pipeline

STEPS = 4


@functools.cache
def pipeline(kind: str):
    return tiny_pipeline(kind, seed=0)


def generate(pipe, kind: str, steps: int = STEPS, guidance: float | None = None) -> np.ndarray:
    kwargs = dict(num_frames=5, height=16, width=16) if kind == "wan" else dict(height=32, width=32)
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    out = pipe(
        "a red circle",
        num_inference_steps=steps,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    return np.asarray(out.frames if kind == "wan" else out.images)


def denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


@dataclass(frozen=True)
class Recording(diffattn.AttentionMethod):
    """Dense attention that remembers (step, layer, batch roles, num_steps) of every call it handles."""

    seen: list = field(default_factory=list, compare=False)
    roles: frozenset = frozenset({"self", "cross", "joint"})

    def __call__(self, q, k, v, ctx):
        self.seen.append((ctx.step, ctx.layer, ctx.batch_roles, ctx.num_steps))
        return ctx.dense(q, k, v)


@pytest.mark.parametrize("kind", ["sd", "sdxl", "flux", "wan"])
def test_dense_pipeline_bitwise(kind):
    pipe = pipeline(kind)
    stock = generate(pipe, kind, steps=2)
    with diffattn.apply(pipe, diffattn.Dense()) as handle:
        assert np.array_equal(generate(pipe, kind, steps=2), stock)
        assert {s for s, _ in handle.acted()} == {0, 1}
    assert np.array_equal(generate(pipe, kind, steps=2), stock)


@pytest.mark.parametrize(
    "kind,layers,steps,active_steps",
    [
        ("sd", [r"down_blocks\.0", "mid_block"], [1, 3], {1, 3}),
        ("sdxl", ["up_blocks.0.attentions.1"], range(2, 4), {2, 3}),
        ("flux", ["single_transformer_blocks.0"], 0, {0}),
        ("wan", ["blocks.1"], 0.5, {2, 3}),
    ],
)
def test_step_and_layer_scheduling(kind, layers, steps, active_steps):
    pipe = pipeline(kind)
    model = denoiser(pipe)
    all_names = [n for n, _ in diffattn.attention_modules(model)]
    handle = diffattn.apply(pipe, diffattn.Dense(), layers=layers, steps=steps)
    try:
        selected = set(handle.layers)
        assert selected and selected < set(all_names)
        for generation in range(2):  # the second generation restarts at step 0
            handle.clear_records()
            generate(pipe, kind)
            expected = {(s, layer) for s in active_steps for layer in selected}
            assert handle.acted() == expected, f"generation {generation}"
            dense = {(c.step, c.layer) for c in handle.calls if not c.acted}
            assert dense == {(s, layer) for s in set(range(STEPS)) - active_steps for layer in selected}
    finally:
        handle.remove()


def test_batch_roles_for_batched_and_separate_cfg():
    sd = pipeline("sd")
    method = Recording()
    with diffattn.apply(sd, method, layers=["mid_block"]):
        generate(sd, "sd", steps=2, guidance=7.5)
        assert {roles for _, _, roles, _ in method.seen} == {("uncond", "cond")}
        assert {n for *_, n in method.seen} == {2}
        method.seen.clear()
        generate(sd, "sd", steps=2, guidance=1.0)
        assert {roles for _, _, roles, _ in method.seen} == {("cond",)}

    wan = pipeline("wan")
    method = Recording()
    with diffattn.apply(wan, method, layers=["blocks.0.attn1"]):
        generate(wan, "wan", steps=3, guidance=5.0)
    per_step = {}
    for step, _, roles, num_steps in method.seen:
        per_step.setdefault(step, []).append(roles)
        assert num_steps == 3
    assert per_step == {s: [("cond",), ("uncond",)] for s in range(3)}


def test_method_keeps_acting_when_processors_are_replaced():
    """The method is a hook on the attention module, not a processor: set_attn_processor (another library resetting
    every processor) keeps it acting; a processor without an SDPA core raises at the next call; remove() leaves the
    user's newer processors in place."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    pipe = pipeline("sd")
    stock = generate(pipe, "sd", steps=2)
    handle = diffattn.apply(pipe, diffattn.Masked(lambda q, kv, ctx: (q - kv).abs() < 3, roles={"self"}))
    masked = generate(pipe, "sd", steps=2)
    assert not np.array_equal(masked, stock)
    mine = AttnProcessor2_0()
    pipe.unet.set_attn_processor(mine)
    assert np.array_equal(generate(pipe, "sd", steps=2), masked)
    pipe.unet.set_attn_processor(AttnProcessor())  # computes softmax(QK^T) by hand: nothing to intercept
    with pytest.raises(diffattn.InterceptionError, match="set_default_attn_processor"):
        generate(pipe, "sd", steps=2)
    pipe.unet.set_attn_processor(mine)
    handle.remove()
    assert all(m.processor is mine for _, m in diffattn.attention_modules(pipe.unet))
    assert np.array_equal(generate(pipe, "sd", steps=2), stock)
