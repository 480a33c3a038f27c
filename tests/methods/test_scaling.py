"""Attention-entropy scaling: the factor against the paper's sqrt(log_T N), the scaled call against a float64
reference with that logit scale, exactly the base method at the trained size, the entropy it restores, composition
with sparse methods, and the errors a user gets for a bad configuration."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from support import make_ctx, qkv

import diffattn
from diffattn import TokenLayout
from diffattn.methods.scaling import EntropyScaling, entropy_scale
from diffattn.testing import tiny_inputs, tiny_model


def reference(q, k, v, logit_scale):
    """Softmax attention in float64 with an explicit logit scale."""
    w = torch.softmax(q.double() @ k.double().transpose(-1, -2) * logit_scale, dim=-1)
    return (w @ v.double()).to(q.dtype)


def entropy(q, k, logit_scale):
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) * logit_scale, dim=-1)
    return float(-(p * p.clamp_min(1e-300).log()).sum(-1).mean())


@pytest.mark.parametrize("tokens,train", [(2048, 512), (4096, 512), (256, 1024), (512, 512)])
def test_factor_is_sqrt_of_log_base_train_tokens(tokens, train):
    assert entropy_scale(tokens, train) == pytest.approx(math.sqrt(math.log(tokens, train)), rel=1e-12)
    assert (entropy_scale(tokens, train) > 1) == (tokens > train)


def test_dense_call_equals_reference_with_scaled_logits():
    layout = TokenLayout(grid=(4, 8, 8))  # 256 keys
    q, k, v = qkv(1, 2, layout.num_tokens, dim=16)
    ctx, metrics = make_ctx(layout)
    out = EntropyScaling(train_tokens=64)(q, k, v, ctx)
    factor = math.sqrt(math.log(256) / math.log(64))
    torch.testing.assert_close(out, reference(q, k, v, factor / math.sqrt(16)), atol=2e-5, rtol=0)
    assert metrics["entropy_scale"] == pytest.approx(factor)
    # and differs from plain attention: the test can fail
    assert (out - reference(q, k, v, 1 / math.sqrt(16))).abs().max() > 1e-3


def test_at_the_trained_size_it_is_the_base_method_exactly():
    layout = TokenLayout(grid=(2, 8, 8))
    q, k, v = qkv(1, 2, layout.num_tokens)
    base = diffattn.SlidingTileAttention(tile=(1, 4, 4), window=(1, 1, 1))
    ctx, _ = make_ctx(layout)
    assert torch.equal(EntropyScaling(train_tokens=layout.num_tokens, base=base)(q, k, v, ctx), base(q, k, v, ctx))


def test_with_a_sparse_base_it_is_the_base_on_scaled_logits():
    layout = TokenLayout(grid=(4, 8, 8))
    q, k, v = qkv(1, 2, layout.num_tokens, dim=16, seed=3)
    base = diffattn.SlidingTileAttention(tile=(1, 4, 4), window=(1, 1, 1))
    ctx, _ = make_ctx(layout)
    factor = entropy_scale(layout.num_tokens, 64)
    torch.testing.assert_close(EntropyScaling(train_tokens=64, base=base)(q, k, v, ctx), base(q * factor, k, v, ctx))


def test_it_brings_the_entropy_back_towards_the_trained_one():
    """More keys raise the softmax entropy (about log N); the factor takes part of the rise back (the paper's
    approximation keeps it from returning exactly: on Gaussian logits about a third here)."""
    g = torch.Generator().manual_seed(0)
    d = 32
    q = torch.randn(1, 1, 64, d, generator=g, dtype=torch.float64) * 1.5
    keys = torch.randn(1, 1, 16384, d, generator=g, dtype=torch.float64) * 1.5
    trained, larger = 1024, 16384
    at_train = entropy(q, keys[..., :trained, :], 1 / math.sqrt(d))
    plain = entropy(q, keys[..., :larger, :], 1 / math.sqrt(d))
    scaled = entropy(q, keys[..., :larger, :], entropy_scale(larger, trained) / math.sqrt(d))
    assert plain > at_train + 0.5  # the problem the method addresses
    assert at_train < scaled < plain - 0.25 * (plain - at_train)


def test_on_a_tiny_wan_it_acts_on_self_attention_and_reports_the_factor():
    model = tiny_model("wan")
    inputs = tiny_inputs("wan", (2, 4, 4), batch=1, text_len=3)
    with torch.no_grad():
        stock = model(**inputs)[0]
        with diffattn.apply(model, EntropyScaling(train_tokens=8)) as handle:
            scaled = model(**inputs)[0]
            metrics = handle.metrics()
        with diffattn.apply(model, EntropyScaling(train_tokens=32)):
            same = model(**inputs)[0]
    factors = [m["entropy_scale"] for m in metrics.values()]
    assert factors and all(f == pytest.approx(math.sqrt(math.log(32) / math.log(8))) for f in factors)
    assert all("attn1" in layer for layer in metrics)  # cross-attention left alone
    assert not torch.allclose(stock, scaled, atol=1e-4)
    torch.testing.assert_close(same, stock, atol=1e-6, rtol=0)


def test_token_ratio_gives_each_layer_its_own_trained_count():
    """A UNet's levels see different token counts; with token_ratio every layer is scaled from its own."""
    method = EntropyScaling(token_ratio=4.0)
    for grid in [(16, 16), (32, 32)]:
        ctx, _ = make_ctx(TokenLayout(grid=grid))
        n = grid[0] * grid[1]
        assert method.factor(ctx, n) == pytest.approx(math.sqrt(math.log(n) / math.log(n / 4)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"train_tokens": 1}, "train_tokens"),
        ({}, "exactly one"),
        ({"train_tokens": 512, "token_ratio": 4.0}, "exactly one"),
        ({"token_ratio": -1.0}, "token_ratio"),
        ({"train_tokens": 512.0}, "train_tokens"),
        ({"train_tokens": 512, "base": "dense"}, "base must be"),
        ({"train_tokens": 512, "base": EntropyScaling(train_tokens=64)}, "base must be"),
        ({"train_tokens": 512, "roles": {"diagonal"}}, "roles"),
    ],
)
def test_bad_configuration_says_how_to_fix_it(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        EntropyScaling(**kwargs)


def test_plain_sdpa_reference_agrees_with_torch():
    """The reference itself: at the stock scale it is F.scaled_dot_product_attention."""
    q, k, v = qkv(1, 2, 32, dim=8)
    torch.testing.assert_close(
        reference(q, k, v, 1 / math.sqrt(8)), F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=0
    )
