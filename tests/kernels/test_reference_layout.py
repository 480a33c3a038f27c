"""The float64 reference kernel and token layouts, checked against the obvious computations."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from diffattn import TokenLayout
from diffattn_kernels.reference import merge_attention, reference_attention

FP32_TOL = dict(rtol=1e-5, atol=1e-5)


def qkv(b=2, h=3, sq=9, skv=11, d=8, hkv=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, h, sq, d, generator=g, dtype=dtype),
        torch.randn(b, hkv or h, skv, d, generator=g, dtype=dtype),
        torch.randn(b, hkv or h, skv, d, generator=g, dtype=dtype),
    )


@settings(max_examples=30, deadline=None)
@given(sq=st.integers(1, 40), skv=st.integers(1, 40), d=st.sampled_from([4, 8, 16]), seed=st.integers(0, 10_000))
def test_reference_equals_sdpa_with_boolean_mask(sq, skv, d, seed):
    q, k, v = qkv(sq=sq, skv=skv, d=d, seed=seed)
    mask = torch.rand(1, 1, sq, skv, generator=torch.Generator().manual_seed(seed)) < 0.6
    mask[..., 0] = True  # keep every row non-empty so SDPA is defined
    out, lse = reference_attention(q, k, v, mask=mask, scale=0.3)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3), **FP32_TOL)
    scores = (q.double() @ k.double().transpose(-1, -2)) * 0.3
    torch.testing.assert_close(lse, torch.logsumexp(scores.masked_fill(~mask, -math.inf), -1))


def test_reference_additive_bias_gqa_and_empty_rows():
    q, k, v = qkv(h=4, hkv=2)
    bias = torch.randn(2, 1, 9, 11)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    torch.testing.assert_close(reference_attention(q, k, v, bias=bias)[0], ref, **FP32_TOL)
    mask = torch.ones(9, 11, dtype=torch.bool)
    mask[4] = False
    out, lse = reference_attention(q, k, v, mask=mask)
    assert torch.isfinite(out).all() and (out[:, :, 4] == 0).all() and torch.isneginf(lse[:, :, 4]).all()


def test_lse_merge_of_disjoint_key_sets_equals_one_attention():
    q, k, v = qkv(skv=20)
    full, full_lse = reference_attention(q, k, v)
    parts = [reference_attention(q, k[:, :, s], v[:, :, s]) for s in (slice(0, 13), slice(13, 20))]
    out, lse = merge_attention(parts)
    torch.testing.assert_close(out, full, **FP32_TOL)
    torch.testing.assert_close(lse, full_lse)


@settings(max_examples=60, deadline=None)
@given(
    grid=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
    text_len=st.integers(0, 5),
    text_first=st.booleans(),
)
def test_layout_indexing_matches_numpy(grid, text_len, text_first):
    layout = TokenLayout(grid, text_len=text_len, text_first=text_first)
    idx = torch.arange(layout.num_tokens)
    is_text = layout.is_text(idx)
    assert int(is_text.sum()) == text_len
    assert is_text[layout.text_slice].all() and not is_text[layout.visual_slice].any()
    visual = idx[layout.visual_slice]
    coords = layout.visual_coords(visual)
    expected = np.unravel_index(np.arange(math.prod(grid)), grid)
    for axis, values in enumerate(coords):
        assert values.tolist() == expected[axis].tolist()
    for values in layout.visual_coords(idx[is_text]):
        assert (values == -1).all()
    assert layout.text_index(idx[is_text]).tolist() == list(range(text_len))
