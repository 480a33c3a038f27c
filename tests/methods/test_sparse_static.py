"""Static sparse attention: SlidingTile against the obvious dense mask, compiled block masks (text, padding,
partial blocks) against token truth, every kernel against the float64 reference, and the method on models."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffattn
import diffattn_kernels as kernels
from diffattn import TokenLayout
from diffattn.patterns import Radial
from diffattn.patterns.compile import compile_pattern
from diffattn.patterns.tile import SlidingTile
from diffattn.testing import tiny_inputs, tiny_model

# Written tolerance per dtype for kernel vs float64 reference (max abs error on unit-variance inputs).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def obvious_tile_mask(grid, tile, window, text_len=0, text_first=False, text_padding=0):
    """Sequence-order boolean mask straight from the definition, by looping over token pairs."""
    tiles = [math.ceil(n / t) for n, t in zip(grid, tile)]
    win = [min(w, n) for w, n in zip(window, tiles)]
    coords = list(itertools.product(*[range(n) for n in grid]))
    nv = len(coords)
    n = nv + text_len
    vis0 = text_len if text_first else 0
    txt0 = 0 if text_first else nv
    mask = np.zeros((n, n), dtype=bool)
    for i, a in enumerate(coords):
        for j, b in enumerate(coords):
            ok = True
            for ax in range(len(grid)):
                ta, tb = a[ax] // tile[ax], b[ax] // tile[ax]
                start = min(max(ta - win[ax] // 2, 0), tiles[ax] - win[ax])
                ok &= start <= tb < start + win[ax]
            mask[vis0 + i, vis0 + j] = ok
    mask[txt0 : txt0 + text_len, :] = True
    mask[:, txt0 : txt0 + text_len] = True
    if text_padding:
        mask[:, txt0 + text_len - text_padding : txt0 + text_len] = False
    return mask


def compiled_token_mask(plan, num_tokens):
    dense = kernels.block_mask_to_dense(plan.block_mask, plan.kernel_length, plan.kernel_length)
    return dense[plan.scatter][:, plan.scatter][:num_tokens, :num_tokens].numpy()


grids = st.one_of(
    st.tuples(st.integers(1, 9), st.integers(1, 9)),
    st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6)),
)


@settings(max_examples=40, deadline=None)
@given(grid=grids, data=st.data())
def test_sliding_tile_equals_obvious_mask(grid, data):
    tile = tuple(data.draw(st.integers(1, 3)) for _ in grid)
    window = tuple(data.draw(st.integers(1, 4)) for _ in grid)
    text_len = data.draw(st.integers(0, 5))
    text_first = data.draw(st.booleans())
    text_padding = data.draw(st.integers(0, text_len)) if text_len else 0
    layout = TokenLayout(grid, text_len=text_len, text_first=text_first)
    pattern = SlidingTile(tile, window)
    plan = compile_pattern(pattern, layout, block_size=pattern.tile_volume(grid), text_padding=text_padding)
    got = compiled_token_mask(plan, layout.num_tokens)
    expected = obvious_tile_mask(grid, tile, window, text_len, text_first, text_padding)
    real = np.ones(layout.num_tokens, dtype=bool)  # padded text query rows are discarded by the model
    if text_padding:
        real[layout.text_start + text_len - text_padding : layout.text_start + text_len] = False
    assert np.array_equal(got[real], expected[real])


@settings(max_examples=25, deadline=None)
@given(grid=grids, data=st.data())
def test_blocks_are_exact_for_tiles_and_conservative_with_text(grid, data):
    tile = tuple(data.draw(st.integers(1, 3)) for _ in grid)
    window = tuple(data.draw(st.integers(1, 3)) for _ in grid)
    text_len = data.draw(st.integers(0, 4))
    layout = TokenLayout(grid, text_len=text_len)
    pattern = SlidingTile(tile, window)
    block = pattern.tile_volume(grid)
    plan = compile_pattern(pattern, layout, block_size=block)
    bm = plan.block_mask
    n = plan.kernel_length
    order = pattern.token_order(grid)
    valid = torch.cat([order >= 0, torch.ones(text_len, dtype=torch.bool)])
    q = torch.arange(n).view(-1, 1)
    kv = torch.arange(n).view(1, -1)
    allowed = bm.mask_mod(torch.tensor(0), torch.tensor(0), q, kv).expand(n, n)
    for qb in range(math.ceil(n / block)):
        partial, full = kernels.block_sparse.kv_block_lists(bm, 0, qb)
        rows = slice(qb * block, (qb + 1) * block)
        for kb in range(math.ceil(n / block)):
            cols = slice(kb * block, (kb + 1) * block)
            tile_pairs = allowed[rows, cols] & valid[cols].view(1, -1)
            if kb in full:
                assert tile_pairs[valid[rows]].all(), "a full block must hold only allowed pairs"
            elif kb not in partial:
                assert not tile_pairs.any(), "a skipped block must hold no allowed pair"
        if text_len == 0 and bool(valid[rows].all()):
            assert not [kb for kb in partial if bool(valid[kb * block : (kb + 1) * block].all())], (
                "with whole tiles as blocks, blocks of real tokens are never partial"
            )


def random_qkv(batch, heads, n, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, dim, generator=g).to(dtype) for _ in range(3)]


KERNEL_CASES = [
    # (grid, tile, window, text_len, text_first, block override)
    ((3, 5, 9), (2, 2, 4), (1, 3, 3), 5, True, None),
    ((7, 6), (4, 4), (2, 1), 0, False, None),
    ((2, 4, 4), (1, 2, 2), (1, 1, 1), 3, False, None),
]


@pytest.mark.parametrize("backend", ["torch", "flex"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernels_match_float64_reference(backend, dtype, case):
    grid, tile, window, text_len, text_first, _ = case
    layout = TokenLayout(grid, text_len=text_len, text_first=text_first)
    pattern = SlidingTile(tile, window)
    plan = compile_pattern(pattern, layout, block_size=pattern.tile_volume(grid))
    q, k, v = random_qkv(2, 3, plan.kernel_length, 16, dtype)
    ref_out, ref_lse = kernels.attention(q, k, v, plan.block_mask, backend="reference")
    out, lse = kernels.attention(q, k, v, plan.block_mask, backend=backend)
    assert out.dtype == dtype
    ref64 = kernels.attention(q.double(), k.double(), v.double(), plan.block_mask, backend="reference")[0]
    err = (out.double() - ref64).abs().max().item()
    assert err <= TOLERANCE[dtype], f"{backend} {dtype}: {err}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite], ref_lse[finite].float(), rtol=0, atol=TOLERANCE[dtype] * 10)


def test_torch_kernel_partial_blocks_and_empty_rows():
    """Partial blocks (element mask), a last block shorter than the block size, and rows with no key at all."""
    from torch.nn.attention.flex_attention import create_block_mask

    n, block = 45, 16

    def mod(b, h, q, kv):
        return ((q - kv).abs() <= 5) & (q != 7)  # row 7 sees nothing

    bm = create_block_mask(mod, None, None, n, n, device="cpu", BLOCK_SIZE=block)
    q, k, v = random_qkv(1, 2, n, 8, torch.float32, seed=3)
    out, lse = kernels.attention(q, k, v, bm, backend="torch")
    ref, ref_lse = kernels.attention(q, k, v, bm, backend="reference")
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)
    assert (out[:, :, 7] == 0).all() and torch.isneginf(lse[:, :, 7]).all()
    assert torch.isfinite(out).all()


def test_auto_backend_explains_its_choice():
    q = torch.zeros(1, 1, 20000, 8, dtype=torch.float64)
    name, reasons = kernels.select_backend("auto", q, 20000)
    assert name == "torch" and reasons == []
    with pytest.raises(ValueError, match="materialises scores"):
        kernels.select_backend("flex", q, 20000)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.select_backend("cuda-magic", q, 10)


def test_bad_tile_parameters_say_how_to_fix():
    with pytest.raises(ValueError, match="positive ints"):
        SlidingTile(tile=(4, 0), window=3)
    with pytest.raises(ValueError, match="grid has 3 axes"):
        compile_pattern(SlidingTile((4, 4), 3), TokenLayout((2, 4, 4)), block_size=16)
    with pytest.raises(ValueError, match="needs kernel blocks of 16 tokens"):
        compile_pattern(SlidingTile((4, 4), 3), TokenLayout((8, 8)), block_size=128)


def tile_masked_equivalent(tile, window):
    """The same attention as SlidingTileAttention, as a Masked mask over the layout (independent path)."""

    def mod(q_idx, kv_idx, ctx):
        lay = ctx.q_layout
        qc, kc = lay.visual_coords(q_idx), lay.visual_coords(kv_idx)
        ok = torch.ones((), dtype=torch.bool)
        for ax, n in enumerate(lay.grid):
            tiles = math.ceil(n / tile[ax])
            w = min(window[ax], tiles)
            tq, tk = qc[ax] // tile[ax], kc[ax] // tile[ax]
            start = torch.clamp(tq - w // 2, 0, tiles - w)
            ok = ok & (tk >= start) & (tk < start + w)
        return ok | lay.is_text(q_idx) | lay.is_text(kv_idx)

    return diffattn.Masked(mod, roles={"self", "joint"})


@pytest.mark.parametrize(
    "family,grid,tile,window",
    [
        ("wan", (3, 4, 6), (1, 2, 2), (1, 2, 2)),
        ("flux", (5, 6), (2, 2), (2, 2)),
        ("cogvideox", (2, 5, 3), (1, 2, 2), (2, 1, 1)),
        ("hunyuan_video", (3, 4, 4), (1, 2, 2), (1, 1, 2)),
        ("ltx_video", (2, 4, 6), (2, 2, 2), (1, 1, 2)),
        ("sd3", (6, 4), (3, 2), (1, 2)),
    ],
)
def test_sliding_tile_method_on_models_matches_masked_reference(family, grid, tile, window):
    model = tiny_model(family)
    inputs = tiny_inputs(family, grid, batch=2, text_len=7)
    with torch.no_grad():
        with diffattn.apply(model, tile_masked_equivalent(tile, window)):
            expected = model(**inputs)[0]
        with diffattn.apply(model, diffattn.SlidingTileAttention(tile=tile, window=window)) as handle:
            got = model(**inputs)[0]
            density = handle.metrics()
        dense = model(**inputs)[0]
    assert not torch.allclose(expected, dense, atol=1e-4), "the pattern must be sparse for the test to mean anything"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert density and all(0 < m["density"] < 1 for m in density.values())


def pattern_as_masked(pattern):
    """A raster-order pattern as a Masked method over the layout: the independent dense path."""

    def mod(q_idx, kv_idx, ctx):
        lay = ctx.q_layout
        visual = pattern.mask_mod(lay.grid)
        last = lay.num_visual - 1
        qv = (q_idx - lay.visual_start).clamp(0, last)
        kv = (kv_idx - lay.visual_start).clamp(0, last)
        return visual(qv, kv) | lay.is_text(q_idx) | lay.is_text(kv_idx)

    return diffattn.Masked(mod, roles={"self", "joint"})


@pytest.mark.parametrize(
    "family,grid,method",
    [
        ("wan", (3, 4, 6), diffattn.SlidingWindowAttention(window=(3, 3, 3), block_size=16)),
        ("flux", (6, 5), diffattn.SlidingWindowAttention(window=3, stride=2, dilation=1, block_size=8)),
        ("cogvideox", (2, 6, 5), diffattn.SlidingWindowAttention(window=(2, 3, 3), dilation=(1, 2, 1), block_size=16)),
        ("hunyuan_video", (5, 16, 16), diffattn.RadialAttention(decay=0.5, block_size=64)),
        ("wan", (6, 8, 8), diffattn.RadialAttention(decay=0.5, block_size=64)),
        ("unet_sd15", (9, 7), diffattn.ShiftedWindowAttention(shift=0.25, block_size=16)),
    ],
)
def test_window_methods_on_models_match_masked_reference(family, grid, method):
    model = tiny_model(family)
    inputs = tiny_inputs(family, grid, batch=2, text_len=7)
    with torch.no_grad():
        with diffattn.apply(model, method) as handle:
            got = model(**inputs)[0]
            density = handle.metrics()
        layer = next(iter(density))
        # Rebuild the same pattern as this layer saw it and compute it densely through Masked.
        patterns = {}

        @dataclass(frozen=True)
        class Capture(diffattn.AttentionMethod):
            roles: frozenset = frozenset({"self", "joint"})

            def __call__(self, q, k, v, ctx):
                pattern = method.pattern_for(ctx)
                patterns[ctx.layer] = pattern
                return pattern_as_masked(pattern)(q, k, v, ctx)

        with diffattn.apply(model, Capture(), layers=list(density)):
            expected = model(**inputs)[0]
        dense = model(**inputs)[0]
    assert patterns and layer in patterns
    assert not torch.allclose(expected, dense, atol=1e-4), "the pattern must be sparse for the test to mean anything"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_gather_and_view_paths_agree(monkeypatch):
    """The torch kernel's two execution paths (views of runs, gathered blocks) on a scattered partial pattern."""
    from torch.nn.attention.flex_attention import create_block_mask

    from diffattn_kernels import block_sparse

    n = 300

    def mod(b, h, q, kv):
        return ((q // 16 - kv // 16) % 5 == 0) & ((q - kv) % 3 != 1)

    bm = create_block_mask(mod, None, None, n, n, device="cpu", BLOCK_SIZE=16)
    q, k, v = random_qkv(2, 3, n, 8, torch.float32, seed=5)
    ref, _ = kernels.attention(q, k, v, bm, backend="reference")
    for max_runs, min_run in ((1000, 0.0), (0, 1000.0)):
        monkeypatch.setattr(block_sparse, "MAX_VIEW_RUNS", max_runs)
        monkeypatch.setattr(block_sparse, "MIN_VIEW_RUN", min_run)
        out, _ = kernels.attention(q, k, v, bm, backend="torch")
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)


def test_union_intersection_and_per_head_patterns():
    from diffattn.patterns import SlidingWindow
    from diffattn.patterns.compose import Intersection, PerHead, Union

    grid = (5, 7)
    a, b = SlidingWindow((3, 3)), SlidingWindow((1, 7))
    q = torch.arange(35).view(-1, 1)
    kv = torch.arange(35).view(1, -1)
    ma, mb = a.mask_mod(grid)(q, kv), b.mask_mod(grid)(q, kv)
    assert torch.equal(Union((a, b)).mask_mod(grid)(q, kv), ma | mb)
    assert torch.equal(Intersection((a, b)).mask_mod(grid)(q, kv), ma & mb)
    layout = TokenLayout(grid, text_len=3)
    per_head = PerHead((a, b, a))
    plan = compile_pattern(per_head, layout, block_size=8)
    assert plan.block_mask.kv_num_blocks.shape[1] == 3
    for h, expected in enumerate((ma, mb, ma)):
        dense = kernels.block_mask_to_dense(plan.block_mask, plan.kernel_length, plan.kernel_length, head=h)
        visual = dense[plan.scatter][:, plan.scatter][:35, :35]
        assert torch.equal(visual, expected)
    qq, kk, vv = random_qkv(1, 3, plan.kernel_length, 8, torch.float32)
    out, _ = kernels.attention(qq, kk, vv, plan.block_mask, backend="torch")
    ref, _ = kernels.attention(qq, kk, vv, plan.block_mask, backend="reference")
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="order tokens differently"):
        Union((a, SlidingTile((2, 2), 1))).token_order(grid)


def test_compiled_flex_agrees_and_refuses_lse_on_cpu():
    layout = TokenLayout((4, 8, 8), text_len=5)
    pattern = SlidingTile((2, 4, 4), (1, 1, 2))
    plan = compile_pattern(pattern, layout, block_size=32)
    q, k, v = random_qkv(1, 2, plan.kernel_length, 16, torch.float32)
    out, lse = kernels.attention(q, k, v, plan.block_mask, backend="flex-compiled", return_lse=False)
    assert lse is None
    ref, _ = kernels.attention(q, k, v, plan.block_mask, backend="reference")
    torch.testing.assert_close(out, ref, rtol=0, atol=TOLERANCE[torch.float32])
    with pytest.raises(ValueError, match="log-sum-exp"):
        kernels.attention(q, k, v, plan.block_mask, backend="flex-compiled")


@pytest.mark.parametrize("chunk,budget,max_rows", [(None, 1 << 30, 8192), (16, 1 << 30, 8192), (None, 1, 16)])
def test_key_major_query_groups_match_reference(monkeypatch, chunk, budget, max_rows):
    """Full-block query blocks are computed key piece by key piece, every query block needing a piece stacked into
    one long call; also with pieces cut at chunk boundaries, waves of one block (tiny budget) and short calls."""
    from diffattn_kernels import block_sparse, cpu_block_sparse

    monkeypatch.setattr(cpu_block_sparse, "DTYPES", ())  # the SDPA path (the compiled loop has its own test)
    rows = []
    real = block_sparse._fused
    monkeypatch.setattr(block_sparse, "_fused", lambda q, *a: (rows.append(q.shape[-2]), real(q, *a))[1])
    monkeypatch.setattr(block_sparse, "KEY_CHUNK_TOKENS", chunk)
    monkeypatch.setattr(block_sparse, "PARTS_BUDGET_BYTES", budget)
    monkeypatch.setattr(block_sparse, "MAX_CALL_ROWS", max_rows)
    # Tiles of 8 tokens on a 1-D grid of 12 tiles, window 5: border tiles share their runs, interior ones overlap;
    # the 2-D case adds several runs per query tile.
    for grid, tile, window in [((96,), (8,), (5,)), ((4, 24), (2, 8), (1, 3))]:
        pattern = SlidingTile(tile, window)
        plan = compile_pattern(pattern, TokenLayout(grid), block_size=pattern.tile_volume(grid))
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = random_qkv(2, 3, plan.kernel_length, 16, dtype, seed=7)
            out, lse = kernels.attention(q, k, v, plan.block_mask, backend="torch")
            ref64, lse64 = kernels.attention(q.double(), k.double(), v.double(), plan.block_mask, backend="reference")
            assert (out.double() - ref64).abs().max().item() <= TOLERANCE[dtype]
            torch.testing.assert_close(lse, lse64.float(), rtol=0, atol=1e-3)
    block = 8
    if budget == 1 or max_rows == 16:
        assert max(rows) <= max(block, max_rows), "waves of one query block or calls of at most max_rows"
    else:
        assert max(rows) > block, "query blocks were not stacked"


@pytest.mark.parametrize("text_len", [0, 5])
def test_key_order_shortens_radial_runs_and_matches_reference(monkeypatch, text_len):
    """Radial's key sets form fewer, longer runs in a reordered copy of k and v; the result is unchanged."""
    from diffattn_kernels import block_sparse, cpu_block_sparse

    monkeypatch.setattr(cpu_block_sparse, "DTYPES", ())  # the key order serves the SDPA path

    plan = compile_pattern(Radial(decay=0.2, block_size=64), TokenLayout((16, 8, 16), text_len=text_len), block_size=64)
    mask, n = plan.block_mask, plan.kernel_length
    partial = block_sparse._lists(mask.kv_num_blocks, mask.kv_indices)[0]
    full = block_sparse._lists(mask.full_kv_num_blocks, mask.full_kv_indices)[0]
    members = [
        (qb, [(a, b) for a, b, _ in runs])
        for qb in range(len(partial))
        if (runs := block_sparse._runs(partial[qb], full[qb])) and not partial[qb] and (qb + 1) * 64 <= n
    ]
    blocks = math.ceil(n / 64)
    order = block_sparse._key_order(members, blocks, n // 64)
    assert (
        order is not None and sorted(order) == list(range(blocks)) and order[n // 64 :] == list(range(n // 64, blocks))
    )
    before, after = block_sparse.key_major_runs(mask, n, n)
    assert before == sum(len(runs) for _, runs in members) / len(members)
    assert after <= (1 - block_sparse.KEY_ORDER_GAIN) * before
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = random_qkv(1, 2, plan.kernel_length, 16, dtype, seed=3)
        out, lse = kernels.attention(q, k, v, mask, backend="torch")
        ref64, lse64 = kernels.attention(q.double(), k.double(), v.double(), mask, backend="reference")
        assert (out.double() - ref64).abs().max().item() <= TOLERANCE[dtype]
        torch.testing.assert_close(lse, lse64.float(), rtol=0, atol=1e-3)


# The compiled CPU loop's own tests (every build the CPU runs, bf16 in float32): tests/kernels/test_cpu_block_sparse.py


@pytest.mark.parametrize("grid,tile,window", [((4, 16, 32), (4, 8, 8), (1, 1, 3)), ((8, 16, 32), (2, 8, 8), (3, 1, 4))])
def test_sliding_tile_equals_natten_generalized_neighborhood_attention(grid, tile, window):
    """With odd (or whole-axis) windows, sliding tile is NATTEN's GNA with kernel = window x tile, stride = tile:
    the equivalence the benchmark relies on to time NATTEN on the same pattern."""
    import natten

    pattern = SlidingTile(tile, window)
    plan = compile_pattern(pattern, TokenLayout(grid), block_size=pattern.tile_volume(grid))
    q, k, v = random_qkv(1, 2, plan.kernel_length, 16, torch.float32, seed=11)
    ours = kernels.attention(q, k, v, plan.block_mask, backend="torch")[0].index_select(2, plan.scatter)

    def heads_last(x):
        return x.index_select(2, plan.scatter)[0].permute(1, 0, 2).reshape(1, *grid, 2, 16)

    kernel = tuple(w * t for w, t in zip(window, tile))
    theirs = natten.na3d(
        heads_last(q), heads_last(k), heads_last(v), kernel_size=kernel, stride=tile, backend="flex-fna"
    )
    torch.testing.assert_close(theirs, ours[0].permute(1, 0, 2).reshape(1, *grid, 2, 16), rtol=0, atol=2e-6)
