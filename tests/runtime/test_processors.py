"""diffattn as attention processors (issue #27): ``model.set_attn_processor(diffattn.processors(model, method))``
gives bitwise what ``diffattn.apply`` gives, stacks with guidance, and setting a stock processor back removes it; a
bare method set as a processor raises at its first call, naming both ways."""

from __future__ import annotations

import numpy as np
import pytest
from support import generate

import diffattn
from diffattn.testing import tiny_pipeline

PIPELINES = {"sd": "unet", "flux": "transformer", "wan": "transformer"}


def _method(kind: str) -> diffattn.AttentionMethod:
    if kind == "wan":
        return diffattn.SlidingTileAttention(tile=(1, 2, 2), window=(1, 1, 1))
    return diffattn.SlidingWindowAttention(window=3)


@pytest.mark.parametrize("kind", PIPELINES)
def test_processors_equal_apply_bitwise_and_stock_processors_remove_them(kind):
    pipe = tiny_pipeline(kind, seed=0)
    model = getattr(pipe, PIPELINES[kind])
    stock = generate(pipe, steps=2)
    with diffattn.apply(pipe, _method(kind)):
        applied = generate(pipe, steps=2)
    assert not np.array_equal(applied, stock)
    original = dict(model.attn_processors)
    installed = diffattn.processors(model, _method(kind))
    model.set_attn_processor(installed)
    wrapped = [p for p in model.attn_processors.values() if isinstance(p, diffattn.DiffattnProcessor)]
    assert wrapped and wrapped[0].handle.layers
    np.testing.assert_array_equal(generate(pipe, steps=2), applied)
    assert wrapped[0].handle.acted()
    model.set_attn_processor(original)  # the stock processors back: the method goes
    np.testing.assert_array_equal(generate(pipe, steps=2), stock)
    assert not wrapped[0].handle.layers


def test_processors_stack_with_guidance_like_apply():
    pipe = tiny_pipeline("sd", seed=0)
    with diffattn.guidance.enable(pipe, diffattn.PAG(scale=2.0)):
        with diffattn.apply(pipe, _method("sd")):
            applied = generate(pipe, steps=2, guidance_scale=3.0)
        original = dict(pipe.unet.attn_processors)
        pipe.unet.set_attn_processor(diffattn.processors(pipe.unet, _method("sd")))
        processed = generate(pipe, steps=2, guidance_scale=3.0)
        pipe.unet.set_attn_processor(original)
    np.testing.assert_array_equal(processed, applied)


def test_bare_method_set_as_processor_names_both_ways():
    pipe = tiny_pipeline("sd", seed=0)
    pipe.unet.set_attn_processor(diffattn.SlidingWindowAttention(window=3))
    with pytest.raises(TypeError, match=r"diffattn.apply\(pipe.*diffattn.processors\(model"):
        generate(pipe, steps=1)


def test_processors_refuse_guidance_and_pipelines():
    pipe = tiny_pipeline("sd", seed=0)
    with pytest.raises(diffattn.DiffattnError, match="guidance.enable"):
        diffattn.processors(pipe.unet, diffattn.PAG())
    with pytest.raises(TypeError, match="pipe.unet"):
        diffattn.processors(pipe, diffattn.Dense())
