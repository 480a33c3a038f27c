"""Static window patterns (SlidingWindow, ShiftedWindow, Radial) against masks built the obvious, slow way.

The references below follow the written definitions (METHODS.md §1.1) with plain loops and numpy; they share no
code with :mod:`diffattn.patterns.sliding_window`, :mod:`diffattn.patterns.shifted_window` and
:mod:`diffattn.patterns.radial`. NATTEN's own flex backend is the external oracle for SlidingWindow.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from diffattn.patterns import (
    Pattern,
    Radial,
    ShiftedWindow,
    SlidingWindow,
    hidiffusion_shift,
    inward_window,
    radial_density,
)

FP32_TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- references


def token_mask(pattern: Pattern, grid) -> torch.Tensor:
    n = math.prod(grid)
    pos = torch.arange(n)
    return pattern.mask_mod(grid)(pos[:, None], pos[None, :])


def combine_axes(grid, tables) -> np.ndarray:
    """Dense (n, n) mask from per-axis (L, L) tables: pair allowed iff allowed on every axis."""
    coords = np.unravel_index(np.arange(math.prod(grid)), grid)
    out = np.ones((math.prod(grid),) * 2, dtype=bool)
    for c, table in zip(coords, tables):
        out &= table[c[:, None], c[None, :]]
    return out


def ref_neighborhood_axis(length, k, s, d, causal) -> np.ndarray:
    """NATTEN/GNA on one axis, from the definitions: dilation groups, run leaders, window start clamped inward."""
    table = np.zeros((length, length), dtype=bool)
    for g in range(d):
        members = list(range(g, length, d))
        lg = len(members)
        for u, x in enumerate(members):
            if causal:
                leader = min((u // s) * s + s - 1, lg - 1)
                keys = [v for v in range(lg) if v <= u and leader - v < k]
            else:
                leader = min((u // s) * s + s // 2, lg - 1)
                start = min(max(leader - k // 2, 0), lg - k)
                keys = list(range(start, start + k))
            for v in keys:
                table[x, members[v]] = True
    return table


def ref_sliding(grid, k, s, d, c) -> torch.Tensor:
    return torch.from_numpy(combine_axes(grid, [ref_neighborhood_axis(*a) for a in zip(grid, k, s, d, c)]))


def ref_shifted(grid, windows, shift) -> torch.Tensor:
    """Roll each spatial axis by -shift, cut windows of ceil(L/n), roll back; leading axes: same frame only."""
    lead = len(grid) - len(windows)
    tables = [np.eye(n, dtype=bool) for n in grid[:lead]]
    for length, n, sh in zip(grid[lead:], windows, shift):
        size = -(-length // n)
        rolled = np.roll(np.arange(length), -sh)  # rolled[i] = token at position i after the roll
        window_of = np.empty(length, dtype=int)
        for i, token in enumerate(rolled):
            window_of[token] = i // size
        tables.append(window_of[:, None] == window_of[None, :])
    return torch.from_numpy(combine_axes(grid, tables))


def exact_block_truth(mask: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level truth per block pair: some pair allowed / every real pair allowed (last block may be partial)."""
    n = mask.shape[0]
    nb = -(-n // block)
    pad = nb * block - n
    tiles = F.pad(mask, (0, pad, 0, pad)).reshape(nb, block, nb, block)
    real = F.pad(torch.ones(n, n, dtype=torch.bool), (0, pad, 0, pad)).reshape(nb, block, nb, block)
    return tiles.any(3).any(1), (tiles | ~real).all(3).all(1)


def assert_block_relation(pattern: Pattern, grid, block: int, mask: torch.Tensor) -> None:
    any_, full = pattern.block_relation(grid, block)
    exact_any, exact_full = exact_block_truth(mask, block)
    assert any_.shape == full.shape == exact_any.shape
    assert not (exact_any & ~any_).any(), "a block holding an allowed pair was dropped"
    assert not (full & ~exact_full).any(), "a block marked full holds a masked pair"
    # the derivation is tight for these product-form patterns
    assert torch.equal(any_, exact_any) and torch.equal(full, exact_full)


# ---------------------------------------------------------------------------------------------------- strategies


@st.composite
def neighborhood(draw, causal_allowed=True):
    ndim = draw(st.integers(1, 3))
    grid = tuple(draw(st.lists(st.integers(1, 9 if ndim < 3 else 5), min_size=ndim, max_size=ndim)))
    d = tuple(draw(st.integers(1, max(1, n // 2))) for n in grid)
    k = tuple(draw(st.integers(1, n // di)) for n, di in zip(grid, d))
    s = tuple(draw(st.integers(1, ki)) for ki in k)
    c = tuple(draw(st.booleans()) if causal_allowed else False for _ in grid)
    return grid, k, s, d, c


def pattern_args(k, s, d, c, draw_int):
    """Exercise the int-broadcast form when all axes agree."""

    def pack(v):
        return v[0] if draw_int and len(set(v)) == 1 else v

    return pack(k), pack(s), pack(d), pack(c)


@st.composite
def shifted(draw):
    ndim = draw(st.integers(1, 3))
    grid = tuple(draw(st.lists(st.integers(1, 9 if ndim < 3 else 5), min_size=ndim, max_size=ndim)))
    spatial = draw(st.integers(1, min(2, ndim)))
    windows = tuple(draw(st.integers(1, n)) for n in grid[ndim - spatial :])
    shift = tuple(draw(st.integers(-12, 12)) for _ in windows)
    return grid, windows, shift


# ---------------------------------------------------------------------------------------------------- SlidingWindow


@settings(max_examples=120, deadline=None)
@given(case=neighborhood(), as_int=st.booleans())
def test_sliding_window_mask_matches_reference(case, as_int):
    grid, k, s, d, c = case
    pattern = SlidingWindow(*pattern_args(k, s, d, c, as_int))
    assert torch.equal(token_mask(pattern, grid), ref_sliding(grid, k, s, d, c))


@settings(max_examples=80, deadline=None)
@given(case=neighborhood(), data=st.data())
def test_sliding_window_block_relation_is_conservative_and_tight(case, data):
    grid, k, s, d, c = case
    n = math.prod(grid)
    block = data.draw(st.integers(1, n + 3), label="block")
    pattern = SlidingWindow(k, s, d, c)
    assert_block_relation(pattern, grid, block, ref_sliding(grid, k, s, d, c))


@settings(max_examples=60, deadline=None)
@given(case=neighborhood(causal_allowed=False))
def test_sliding_window_rows_see_exactly_prod_k_keys(case):
    grid, k, s, d, c = case
    counts = token_mask(SlidingWindow(k, s, d), grid).sum(1)
    assert (counts == math.prod(k)).all()


@pytest.mark.parametrize("grid", [(7,), (5, 6), (3, 4, 5)])
def test_sliding_window_full_extent_is_dense(grid):
    assert token_mask(SlidingWindow(grid), grid).all()
    assert token_mask(SlidingWindow(None), grid).all()  # None = whole axis
    any_, full = SlidingWindow(grid).block_relation(grid, 16)
    assert any_.all() and full.all()


def test_sliding_window_validation_messages():
    with pytest.raises(ValueError, match=r"window \(9, 9\) is larger than the 6x8 grid on axis 0"):
        SlidingWindow((9, 9)).mask_mod((6, 8))
    with pytest.raises(ValueError, match="dilation"):
        SlidingWindow(3, dilation=3).mask_mod((8, 9))  # 3 * 3 > 8
    with pytest.raises(ValueError, match="stride"):
        SlidingWindow(3, stride=4)
    with pytest.raises(ValueError, match="different lengths"):
        SlidingWindow((3, 3), stride=(1, 1, 1))
    with pytest.raises(ValueError, match="2-D grids but the layer's tokens form a 3-D grid"):
        SlidingWindow((3, 3)).mask_mod((4, 5, 6))
    with pytest.raises(ValueError, match="positive"):
        SlidingWindow(0)
    with pytest.raises(ValueError, match="causal"):
        SlidingWindow(3, causal=1)
    with pytest.raises(ValueError, match="stride"):
        SlidingWindow(None, stride=5).mask_mod((4,))  # resolved window 4 < stride 5
    # clip_to_grid: an oversized window becomes the whole axis
    assert token_mask(SlidingWindow((9, 9), clip_to_grid=True), (6, 8)).all()
    # frozen, hashable, lists normalised to tuples (usable as cache keys)
    assert SlidingWindow([3, 5]) == SlidingWindow((3, 5)) and hash(SlidingWindow([3, 5])) == hash(SlidingWindow((3, 5)))


@pytest.mark.parametrize(
    "shape, half", [((12, 17), (3, 5)), ((9, 4), (4, 1)), ((3, 10, 11), (None, 2, 4)), ((5, 6), (15, 26))]
)
def test_inward_window_matches_freeswim_ranges(shape, half):
    """FreeSwim: rows [q - d - max(0, d + q - h + 1), q + d + max(0, d - q)] (clipped to the map), columns alike;
    a window wider than the map covers it; None = every frame visible."""
    tables = []
    for length, d in zip(shape, half):
        table = np.zeros((length, length), dtype=bool)
        for q in range(length):
            if d is None:
                table[q] = True
                continue
            lo = q - d - max(0, d + q - length + 1)
            hi = q + d + max(0, d - q)
            table[q, max(lo, 0) : min(hi, length - 1) + 1] = True
        tables.append(table)
    expected = torch.from_numpy(combine_axes(shape, tables))
    assert torch.equal(token_mask(inward_window(half), shape), expected)


# ---------------------------------------------------------------------------------------------------- ShiftedWindow


@settings(max_examples=100, deadline=None)
@given(case=shifted(), data=st.data())
def test_shifted_window_mask_and_blocks_match_reference(case, data):
    grid, windows, shift = case
    pattern = ShiftedWindow(windows, shift)
    mask = ref_shifted(grid, windows, shift)
    assert torch.equal(token_mask(pattern, grid), mask)
    ids = pattern.window_ids(grid)
    assert torch.equal(ids[:, None] == ids[None, :], mask)
    block = data.draw(st.integers(1, math.prod(grid) + 3), label="block")
    assert_block_relation(pattern, grid, block, mask)


@pytest.mark.parametrize("grid", [(6, 7), (2, 5, 3)])
def test_shifted_window_single_window_is_global_per_frame(grid):
    mask = token_mask(ShiftedWindow((1, 1), 0), grid)
    frame = torch.arange(math.prod(grid)) // math.prod(grid[-2:])
    assert torch.equal(mask, frame[:, None] == frame[None, :])


def test_shifted_window_partition_round_trip_and_window_independence():
    grid = (7, 9)  # odd sizes: windows of 4 and 3 rows, 5 and 4 columns
    g = torch.Generator().manual_seed(0)
    for fraction in (0.0, 0.25, 0.5, 0.75):
        pattern = ShiftedWindow.from_fraction(grid, fraction)
        ids = pattern.window_ids(grid)
        x = torch.randn(1, 2, 63, 8, generator=g)
        order = torch.argsort(ids, stable=True)  # window_partition
        parts = x[..., order, :]
        back = torch.empty_like(parts)
        back[..., order, :] = parts  # window_reverse
        assert torch.equal(back, x)

        mask = token_mask(pattern, grid)
        q, k, v = (torch.randn(1, 2, 63, 8, generator=g) for _ in range(3))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        for w in ids.unique():
            outside = ids != w
            k2, v2 = k.clone(), v.clone()
            k2[..., outside, :] = torch.randn_like(k2[..., outside, :])
            v2[..., outside, :] = 100 * torch.randn_like(v2[..., outside, :])
            out2 = F.scaled_dot_product_attention(q, k2, v2, attn_mask=mask)
            torch.testing.assert_close(out2[..., ids == w, :], out[..., ids == w, :], rtol=0, atol=0)


def test_shifted_window_from_fraction_and_hidiffusion_shift():
    assert ShiftedWindow.from_fraction((64, 96), 0.25).shift == (8, 12)
    assert ShiftedWindow.from_fraction((7, 9), 0.75).shift == (3, 3)  # floor(0.75 * 4), floor(0.75 * 5)
    state = torch.get_rng_state()
    draws = [hidiffusion_shift(step, f"down_blocks.0.attentions.{i}", seed=1) for step in range(30) for i in range(2)]
    assert torch.equal(state, torch.get_rng_state()), "the global RNG must not be used"
    assert draws == [hidiffusion_shift(s, f"down_blocks.0.attentions.{i}", seed=1) for s in range(30) for i in range(2)]
    assert set(draws) == {0.0, 0.25, 0.5, 0.75}
    assert draws != [hidiffusion_shift(s, f"down_blocks.0.attentions.{i}", seed=2) for s in range(30) for i in range(2)]
    with pytest.raises(ValueError, match="do not fit"):
        ShiftedWindow((4, 2)).mask_mod((3, 8))
    with pytest.raises(ValueError, match="describe 2 axes"):
        ShiftedWindow((2, 2)).mask_mod((8,))
    with pytest.raises(ValueError, match="shift"):
        ShiftedWindow((2, 2), (1, 2, 3))
    with pytest.raises(ValueError, match="fraction"):
        ShiftedWindow.from_fraction((8, 8), 1.0)


# ---------------------------------------------------------------------------------------------------- FlexAttention


@pytest.mark.parametrize(
    "pattern, grid",
    [
        (SlidingWindow((3, 4), stride=(2, 3), dilation=(2, 1), causal=(False, True)), (7, 9)),
        (ShiftedWindow((2, 2), (1, 3)), (3, 5, 7)),
        (Radial(0.5, block_size=16), (5, 4, 8)),
    ],
)
def test_mask_mod_works_as_flex_mask_mod(pattern, grid):
    from torch.nn.attention.flex_attention import create_mask

    n = math.prod(grid)
    f = pattern.mask_mod(grid)
    flex = create_mask(lambda b, h, q, kv: f(q, kv), None, None, n, n, device="cpu")
    assert torch.equal(flex[0, 0], token_mask(pattern, grid))


# ---------------------------------------------------------------------------------------------------- NATTEN


NATTEN_CASES = [
    # grid, kernel, stride, dilation, causal
    ((13,), 5, 1, 1, False),
    ((16,), 4, 3, 2, False),
    ((11,), 3, 2, 3, True),
    ((7, 9), (3, 5), 1, 1, False),
    ((8, 10), (4, 3), (2, 3), 1, False),
    ((9, 7), 3, (2, 1), (3, 2), False),
    ((6, 11), (3, 4), (3, 2), (2, 2), (True, False)),
    ((5, 6), (5, 6), 1, 1, False),  # full extent: NATTEN's dense fast path
    ((4, 5, 6), (2, 3, 3), (1, 2, 3), (2, 1, 2), False),
    ((5, 4, 7), (3, 2, 4), (2, 2, 1), 1, (True, False, True)),
    ((3, 6, 5), (3, 3, 3), (3, 1, 2), (1, 2, 1), (False, True, False)),
]


@pytest.mark.parametrize("grid, kernel, stride, dilation, causal", NATTEN_CASES)
def test_sliding_window_matches_natten(grid, kernel, stride, dilation, causal):
    import natten  # installed by scripts/bootstrap.sh; a missing NATTEN must fail, not skip

    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(grid)]
    g = torch.Generator().manual_seed(len(grid) * 100 + sum(grid))
    q, k, v = (torch.randn(2, *grid, 2, 16, generator=g) for _ in range(3))  # heads-last layout
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fn(
            q,
            k,
            v,
            kernel_size=kernel,
            stride=stride,
            dilation=dilation,
            is_causal=causal,
            backend="flex-fna",
            attention_kwargs={"backend": "flex-fmha"},
        )
    n = math.prod(grid)
    mask = token_mask(SlidingWindow(kernel, stride, dilation, causal), grid)
    flat = [x.reshape(2, n, 2, 16).transpose(1, 2) for x in (q, k, v)]
    ref = F.scaled_dot_product_attention(*flat, attn_mask=mask).transpose(1, 2).reshape(out.shape)
    torch.testing.assert_close(out, ref, **FP32_TOL)


# ---------------------------------------------------------------------------------------------------- Radial


def slow_radial(frames, tokens, decay, block, sink=True, band_frames=1):
    """Radial Attention's construction at token level, pair by pair, as METHODS.md §Radial writes it.
    Returns the kept-block mask and the final token-level mask."""
    n = frames * tokens
    nb = -(-n // block)
    kept = np.zeros((nb, nb), dtype=bool)
    p = np.arange(tokens)[:, None]
    q = np.arange(tokens)[None, :]

    def bitlen(x):
        return int(math.floor(math.log2(x))) + 1

    for i in range(frames):
        for j in range(frames):
            d = abs(i - j)
            if (sink and j == 0) or d <= band_frames:
                # frame sink / dense band (the split is not applied to the dense band; for S_f >= 128 it never
                # triggers there anyway)
                local = np.ones((tokens, tokens), dtype=bool)
            else:
                width = max(block, 2 ** bitlen(tokens) / 2 ** bitlen(d) * decay)
                local = np.abs(p - q) <= width
                lam = 2 ** bitlen(tokens) / 2 ** bitlen(d)
                if lam < 128 and d % int(128 / lam) != 0:
                    local = np.zeros_like(local)
            r, c = (i * tokens) % block, (j * tokens) % block
            rows, cols = -(-(r + tokens) // block) * block, -(-(c + tokens) // block) * block
            canvas = np.zeros((rows, cols), dtype=bool)
            canvas[r : r + tokens, c : c + tokens] = local
            for tr in range(rows // block):
                for tc in range(cols // block):
                    tile = canvas[tr * block : (tr + 1) * block, tc * block : (tc + 1) * block]
                    col_density = tile.sum(0) / block
                    nonempty = (col_density > 0).sum()
                    high = (col_density > 1 / 3).sum()
                    if nonempty and high / nonempty > 0.6:
                        kept[(i * tokens) // block + tr, (j * tokens) // block + tc] = True
    kept |= np.eye(nb, dtype=bool)  # diffattn keeps the diagonal block (no query without keys)
    token = np.repeat(np.repeat(kept, block, 0), block, 1)[:n, :n]
    return torch.from_numpy(kept), torch.from_numpy(token)


@pytest.mark.parametrize(
    "grid, decay, block",
    [
        ((8, 16, 16), 1.0, 64),
        ((8, 16, 16), 0.5, 128),
        ((13, 16, 20), 1.0, 128),
        ((13, 16, 20), 0.3, 64),
        ((21, 8, 25), 0.2, 128),
    ],
)
def test_radial_matches_slow_construction(grid, decay, block):
    frames, tokens = grid[0], grid[1] * grid[2]
    for sink in (True, False):
        pattern = Radial(decay, block_size=block, frame_sink=sink)
        kept, token = slow_radial(frames, tokens, decay, block, sink)
        assert torch.equal(pattern.kept_blocks(grid), kept)
        assert torch.equal(token_mask(pattern, grid), token)
        density = radial_density(frames, tokens, decay, block, frame_sink=sink)
        assert density == pytest.approx(token.double().mean().item(), abs=1e-12)
        assert pattern.density(grid) == density
        any_, full = pattern.block_relation(grid, block)
        assert torch.equal(any_, kept) and torch.equal(full, kept)
        assert 0 < density < 1


@pytest.mark.parametrize("other_block", [32, 48, 100, 200])
def test_radial_reblocks_exactly(other_block):
    grid = (13, 16, 20)
    pattern = Radial(0.3, block_size=64)
    mask = token_mask(pattern, grid)
    any_, full = pattern.block_relation(grid, other_block)
    exact_any, exact_full = exact_block_truth(mask, other_block)
    assert torch.equal(any_, exact_any) and torch.equal(full, exact_full)


@pytest.mark.parametrize(
    "grid, block", [((8, 16, 16), 128), ((8, 16, 16), 64), ((13, 16, 20), 64), ((13, 16, 20), 128)]
)
def test_radial_invariants(grid, block):
    frames, tokens = grid[0], grid[1] * grid[2]
    pattern = Radial(0.4, block_size=block)
    # pre-shrink: frame sink and |i - j| <= 1 dense; otherwise the rule depends on |i - j| only
    by_distance = {}
    for i in range(frames):
        for j in range(frames):
            rule = pattern.pair_rule(grid, i, j)
            if j == 0 or abs(i - j) <= 1:
                assert rule == "dense"
            if j != 0:
                assert by_distance.setdefault(abs(i - j), rule) == rule
    no_sink = Radial(0.4, block_size=block, frame_sink=False)
    assert no_sink.pair_rule(grid, frames - 1, 0) == pattern.pair_rule(grid, 0, frames - 1)
    # after the shrink: token pairs of dense frame pairs stay allowed in every block lying inside such a pair
    # (frames aligned to blocks: all of them)
    mask = token_mask(pattern, grid)
    frame = torch.arange(frames * tokens) // tokens
    dense_pairs = ((frame[:, None] - frame[None, :]).abs() <= 1) | (frame[None, :] == 0)
    if tokens % block == 0:
        assert mask[dense_pairs].all()
    nb = mask.shape[0] // block
    for bi in range(nb):
        for bj in range(nb):
            sl = (slice(bi * block, (bi + 1) * block), slice(bj * block, (bj + 1) * block))
            if dense_pairs[sl].all():
                assert mask[sl].all()
    # density reported = recomputed from the mask
    assert pattern.density(grid) == pytest.approx(mask.double().mean().item(), abs=1e-12)


def test_radial_cache_key_and_validation():
    grid = (9, 16, 16)
    base = Radial(0.5, block_size=64)
    variants = [Radial(0.25, block_size=64), Radial(0.5, block_size=128), Radial(0.5, block_size=64, frame_sink=False)]
    for other in variants:
        assert other != base and hash(other) != hash(base)
    masks = {g: base.kept_blocks(g) for g in [(9, 16, 16), (12, 16, 16), (9, 16, 32)]}
    assert len({tuple(m.shape) for m in masks.values()}) == 3
    kept = base.kept_blocks(grid)
    kept.fill_(False)  # a caller's copy: must not leak into the next build
    assert base.kept_blocks(grid).any()
    assert radial_density(9, 256, 1.0, 64) != radial_density(9, 256, 0.25, 64)
    for bad in (
        dict(decay=0),
        dict(decay=float("nan")),
        dict(block_size=0),
        dict(dense_band_frames=-1),
        dict(frame_sink=1),
    ):
        with pytest.raises(ValueError):
            Radial(**bad)
    with pytest.raises(ValueError, match="video pattern"):
        Radial().mask_mod((64,))
