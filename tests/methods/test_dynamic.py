"""Dynamic sparse attention: block selection against a brute-force selection, the limiting budgets (everything =
dense, nothing = block-diagonal), pyramid pooling, Re-ttention's calibration, ToDo's pooling, and every method on
tiny models through ``diffattn.apply`` with dense warm-up."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from support import make_ctx, qkv

import diffattn
import diffattn_kernels as kernels
from diffattn import TokenLayout
from diffattn.methods.downsampling import TokenDownsampling
from diffattn.methods.dynamic_sparse import DynamicSparseAttention
from diffattn.methods.pyramid import PyramidSparseAttention
from diffattn.methods.rettention import Rettention
from diffattn.patterns.dynamic import (
    PYRAMID_LEVELS,
    block_order,
    block_self_similarity,
    pool_blocks,
    pool_grid,
    pyramid_levels,
    select_topk,
    select_topp,
    selection_block_mask,
)
from diffattn.testing import tiny_inputs

F32 = 2e-5  # kernel vs float64 reference on unit-variance inputs (as test_sparse_static)


# --------------------------------------------------------------------------------------------------------------------
# helpers


def tiles_of(layout, tile):
    """Tile id of every sequence token (text: -1), from coordinates: the obvious definition of a block."""
    ids = []
    for i in range(layout.num_tokens):
        coords = [int(c) for c in layout.visual_coords(torch.tensor(i))]
        ids.append(-1 if coords[0] < 0 else tuple(c // t for c, t in zip(coords, tile)))
    return ids


def raster_tiles(layout, block):
    """Block id of every sequence token for raster blocks of ``block`` visual tokens (text: -1)."""
    return [
        (-1 if layout.is_text(torch.tensor(i)) else (i - layout.visual_start) // block)
        for i in range(layout.num_tokens)
    ]


def plan_token_mask(plan, num_tokens, head):
    dense = kernels.block_mask_to_dense(plan.block_mask, plan.gather.numel(), plan.gather.numel(), head=head)
    return dense[plan.scatter][:, plan.scatter][:num_tokens, :num_tokens]


def obvious_mask(ids, selected):
    """Token mask: text rows/columns dense, visual pairs by the selected (query tile -> key tiles) relation."""
    n = len(ids)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            mask[i, j] = ids[i] == -1 or ids[j] == -1 or ids[j] in selected[ids[i]]
    return mask


def brute_force_choice(probs, forced, *, topk=None, topp=None):
    """Indices kept from one row by enumerating subsets (no sorting): the smallest / best superset of ``forced``."""
    n = len(probs)
    must = {j for j in range(n) if forced[j]}
    others = [j for j in range(n) if j not in must]

    def mass(s):
        return sum(probs[j] for j in s)

    if topk is not None:
        size = max(math.ceil(topk * n - 1e-9), len(must)) - len(must)
        best = max(itertools.combinations(others, size), key=lambda c: mass(must | set(c)))
        return must | set(best)
    if topp >= 1.0:
        return set(range(n))
    for size in range(len(others) + 1):
        best = max(itertools.combinations(others, size), key=lambda c: mass(must | set(c)))
        if mass(must | set(best)) >= topp:
            return must | set(best)
    return set(range(n))


def brute_force_selection(q, k, ids, *, topk=None, topp=None, guard=None, scale):
    """Per head: {query tile: kept key tiles}, from explicit token lists per tile (float64, no kernel order)."""
    tiles = sorted({t for t in ids if t != -1})
    members = {t: [i for i, x in enumerate(ids) if x == t] for t in tiles}
    result = []
    for h in range(q.shape[0]):
        qm = {t: q[h, members[t]].double().mean(0) for t in tiles}
        km = {t: k[h, members[t]].double().mean(0) for t in tiles}

        def sim(x, t, h=h):
            m = members[t]
            if len(m) < 2:
                return 1.0
            u = F.normalize(x[h, m].double(), dim=-1)
            c = u @ u.T
            return float((c.sum() - c.diagonal().sum()) / (len(m) * (len(m) - 1)))

        qs = {t: sim(q, t) for t in tiles}
        ks = {t: sim(k, t) for t in tiles}
        selected = {}
        for tq in tiles:
            logits = torch.stack([scale * qm[tq] @ km[tk] + math.log(len(members[tk])) for tk in tiles])
            probs = torch.softmax(logits, 0).tolist()
            forced = [tk == tq or (guard is not None and (qs[tq] < guard or ks[tk] < guard)) for tk in tiles]
            kept = brute_force_choice(
                probs, forced, topk=None if topk is None else topk[h], topp=None if topp is None else topp[h]
            )
            selected[tq] = {tiles[j] for j in kept}
            # near-ties make "the" selection ambiguous: skip such draws
            free = sorted(p for p, f in zip(probs, forced) if not f)
            assume(all(b - a > 1e-9 for a, b in zip(free, free[1:])))
            if topp is not None:
                masses = {round(sum(s), 12) for r in range(len(tiles) + 1) for s in itertools.combinations(probs, r)}
                assume(all(abs(m - topp[h]) > 1e-9 for m in masses))
        result.append(selected)
    return result


# --------------------------------------------------------------------------------------------------------------------
# selection rules against brute force


rows_strategy = st.integers(1, 3).flatmap(
    lambda heads: st.integers(1, 6).flatmap(
        lambda n: st.tuples(
            st.just(heads),
            st.just(n),
            st.lists(st.floats(-3, 3), min_size=heads * 2 * n, max_size=heads * 2 * n),
            st.lists(st.booleans(), min_size=heads * 2 * n, max_size=heads * 2 * n),
        )
    )
)


@settings(max_examples=60, deadline=None)
@given(rows=rows_strategy, budget=st.lists(st.floats(0, 1), min_size=3, max_size=3), rule=st.sampled_from(["k", "p"]))
def test_select_rules_equal_brute_force(rows, budget, rule):
    heads, n, logits, flags = rows
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float64).view(heads, 2, n), -1)
    forced = torch.tensor(flags).view(heads, 2, n)
    budgets = torch.tensor(budget[:heads], dtype=torch.float64)
    got = (select_topk if rule == "k" else select_topp)(probs, forced, budgets)
    for h in range(heads):
        for r in range(2):
            p = probs[h, r].tolist()
            free = sorted(x for x, f in zip(p, forced[h, r].tolist()) if not f)
            assume(all(b - a > 1e-9 for a, b in zip(free, free[1:])))
            if rule == "p":
                masses = [sum(s) for m in range(n + 1) for s in itertools.combinations(p, m)]
                assume(all(abs(m - budget[h]) > 1e-9 for m in masses))
            expected = brute_force_choice(p, forced[h, r].tolist(), **{"topk" if rule == "k" else "topp": budget[h]})
            assert set(torch.nonzero(got[h, r]).flatten().tolist()) == expected


@settings(max_examples=60, deadline=None)
@given(rows=rows_strategy, edges=st.lists(st.floats(0, 1), min_size=4, max_size=4), data=st.data())
def test_pyramid_levels_equal_brute_force(rows, edges, data):
    heads, n, logits, flags = rows
    edges = sorted(edges)
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float64).view(heads, 2, n), -1)
    forced = torch.tensor(flags).view(heads, 2, n)
    poolable = torch.tensor(data.draw(st.lists(st.booleans(), min_size=2 * n, max_size=2 * n))).view(2, n)
    got = pyramid_levels(probs, forced, edges, poolable)
    for h in range(heads):
        for r in range(2):
            p, f = probs[h, r].tolist(), forced[h, r].tolist()
            ranked = sorted(range(n), key=lambda j: (not f[j], -p[j], j))  # forced first, then most probable
            for j in range(n):
                rank = ranked.index(j)
                level = next((lv for e, lv in zip(edges, PYRAMID_LEVELS) if rank < math.ceil(e * n - 1e-9)), 0)
                if f[j] or (level > 1 and not poolable[r, j]):
                    level = 1
                assert int(got[h, r, j]) == level


@settings(max_examples=30, deadline=None)
@given(
    grid=st.one_of(
        st.tuples(st.integers(1, 5), st.integers(1, 6)),
        st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)),
    ),
    data=st.data(),
)
def test_block_selection_equals_brute_force(grid, data):
    """The whole pipeline (kernel order, pooling, scores, forced blocks, budget, block mask) against explicit token
    lists per tile, per head, with per-head budgets, text tokens and the self-similarity guard."""
    use_tile = data.draw(st.booleans())
    tile = tuple(data.draw(st.integers(1, 3)) for _ in grid) if use_tile else None
    block = data.draw(st.integers(2, 6))
    text_len = data.draw(st.integers(0, 3))
    layout = TokenLayout(grid, text_len=text_len, text_first=data.draw(st.booleans()))
    ids = tiles_of(layout, tile) if use_tile else raster_tiles(layout, block)
    assume(len({t for t in ids if t != -1}) <= 7)
    heads = data.draw(st.integers(1, 2))
    rule = data.draw(st.sampled_from(["topk", "topp"]))
    budgets = tuple(data.draw(st.floats(0, 1)) for _ in range(heads))
    guard = data.draw(st.one_of(st.none(), st.floats(-0.5, 0.5)))
    method = DynamicSparseAttention(**{rule: budgets}, tile=tile, block_size=block, similarity_guard=guard)
    q, k, _ = qkv(1, heads, layout.num_tokens, dim=4, seed=data.draw(st.integers(0, 1000)), dtype=torch.float64)
    ctx, _ = make_ctx(layout)
    if guard is not None:  # similarities right at the threshold make the guard ambiguous
        for x in (q, k):
            ko = block_order(layout, tile, block)
            sims = block_self_similarity(
                x[0].index_select(-2, ko.gather)[:, : ko.num_visual], ko.valid[: ko.num_visual], ko.block_size
            )
            assume(bool(((sims - guard).abs() > 1e-9).all()))
    expected = brute_force_selection(q[0], k[0], ids, **{rule: budgets}, guard=guard, scale=1 / math.sqrt(4))
    (plan,) = method.plans(q, k, ctx)
    for h in range(heads):
        assert torch.equal(plan_token_mask(plan, layout.num_tokens, h), obvious_mask(ids, expected[h]))


def test_pool_blocks_and_similarity_by_hand():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, 5.0], [2.0, 0.0]]])
    valid = torch.tensor([True, True, False, True, True])
    means, counts = pool_blocks(x, valid, 3)
    torch.testing.assert_close(means, torch.tensor([[[0.5, 0.5], [3.5, 2.5]]]))
    assert counts.tolist() == [2.0, 2.0]
    sims = block_self_similarity(x, valid, 3)
    torch.testing.assert_close(sims, torch.tensor([[0.0, math.sqrt(0.5)]]))


# --------------------------------------------------------------------------------------------------------------------
# limiting budgets


LAYOUTS = [
    TokenLayout((3, 5, 6), text_len=4),
    TokenLayout((2, 4, 8)),
    TokenLayout((7, 9), text_len=3, text_first=True),
]


def methods_with_budget(everything: bool, layout):
    tile = (2, 2, 4) if len(layout.grid) == 3 else (2, 4)
    b = 1.0 if everything else 0.0
    return [
        DynamicSparseAttention(topk=b, tile=tile),
        DynamicSparseAttention(topp=b, tile=None, block_size=8),
        DynamicSparseAttention(topk=(b, b), tile=tile, similarity_guard=-1.0),
        PyramidSparseAttention(bands=(b,) * 4, tile=tile),
    ]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_budget_everything_is_dense(layout):
    q, k, v = qkv(2, 2, layout.num_tokens)
    dense = kernels.reference_attention(q, k, v)[0]
    for method in methods_with_budget(True, layout):
        ctx, metrics = make_ctx(layout)
        out = method(q, k, v, ctx)
        torch.testing.assert_close(out, dense, rtol=0, atol=F32, msg=repr(method))
        assert metrics["density"] == pytest.approx(1.0)
        assert metrics["selection_seconds"] >= 0 and metrics["attention_seconds"] > 0


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_budget_nothing_is_block_diagonal(layout):
    q, k, v = qkv(2, 2, layout.num_tokens, seed=1)
    for method in methods_with_budget(False, layout):
        tile = method.tile
        ids = tiles_of(layout, tile) if tile is not None else raster_tiles(layout, method.block_size)
        mask = torch.tensor([[a == -1 or b == -1 or a == b for b in ids] for a in ids])
        expected = kernels.reference_attention(q, k, v, mask=mask)[0]
        ctx, metrics = make_ctx(layout)
        torch.testing.assert_close(method(q, k, v, ctx), expected, rtol=0, atol=F32, msg=repr(method))
        assert 0 < metrics["density"] < 1


def test_per_head_budgets_and_guard():
    layout = TokenLayout((4, 8), text_len=2)
    q, k, v = qkv(1, 3, layout.num_tokens, seed=2)
    ids = tiles_of(layout, (2, 4))
    diagonal = torch.tensor([[a == -1 or b == -1 or a == b for b in ids] for a in ids])
    method = DynamicSparseAttention(topk=(0.0, 1.0, 0.0), tile=(2, 4))
    out = method(q, k, v, make_ctx(layout)[0])
    dense = kernels.reference_attention(q, k, v)[0]
    diag = kernels.reference_attention(q, k, v, mask=diagonal)[0]
    torch.testing.assert_close(out[:, 1], dense[:, 1], rtol=0, atol=F32)
    torch.testing.assert_close(out[:, [0, 2]], diag[:, [0, 2]], rtol=0, atol=F32)
    # a guard above every block's self-similarity computes everything; one below it changes nothing
    guarded = DynamicSparseAttention(topk=0.0, tile=(2, 4), similarity_guard=0.999)
    torch.testing.assert_close(guarded(q, k, v, make_ctx(layout)[0]), dense, rtol=0, atol=F32)
    loose = DynamicSparseAttention(topk=0.0, tile=(2, 4), similarity_guard=-1.0)
    torch.testing.assert_close(loose(q, k, v, make_ctx(layout)[0]), diag, rtol=0, atol=F32)
    with pytest.raises(diffattn.LayoutError, match="gives 2 heads"):
        DynamicSparseAttention(topk=(0.1, 0.2), tile=(2, 4))(q, k, v, make_ctx(layout)[0])


def test_batch_entries_select_separately():
    layout = TokenLayout((4, 8))
    q, k, v = qkv(2, 1, layout.num_tokens, seed=3)
    method = DynamicSparseAttention(topk=0.25, tile=(2, 4))
    ctx, _ = make_ctx(layout)
    both = method(q, k, v, ctx)
    for b in range(2):
        alone = method(q[b : b + 1], k[b : b + 1], v[b : b + 1], ctx)
        torch.testing.assert_close(both[b : b + 1], alone, rtol=0, atol=0)


def test_bad_parameters_say_how_to_fix():
    with pytest.raises(ValueError, match="exactly one budget"):
        DynamicSparseAttention()
    with pytest.raises(ValueError, match="exactly one budget"):
        DynamicSparseAttention(topk=0.1, topp=0.9)
    with pytest.raises(ValueError, match=r"fraction in \[0, 1\]"):
        DynamicSparseAttention(topk=1.5)
    with pytest.raises(ValueError, match="non-decreasing"):
        PyramidSparseAttention(bands=(0.5, 0.4, 0.6, 0.8))
    with pytest.raises(ValueError, match="self and joint"):
        DynamicSparseAttention(topk=0.1, roles={"cross"})
    with pytest.raises(TypeError, match="base must be"):
        Rettention(base=diffattn.Dense())
    with pytest.raises(ValueError, match="positive int"):
        TokenDownsampling(factor=0)
    with pytest.raises(ValueError, match="tile"):
        DynamicSparseAttention(topk=0.1, tile=(2, 2))(*qkv(1, 1, 12), make_ctx(TokenLayout((1, 3, 4)))[0])


# --------------------------------------------------------------------------------------------------------------------
# pyramid pooling


def test_pyramid_pooling_is_exact_on_constant_blocks():
    """Keys and values constant inside every block: a pooled block (with its +log L) is the block itself, so any
    band assignment without skipping equals dense attention."""
    layout = TokenLayout((4, 16), text_len=3)
    q, k, v = qkv(1, 2, layout.num_tokens, seed=4)
    tile = (2, 8)  # 16 tokens per block: levels 2, 4, 8 all divide it; the grid is whole tiles (no padding)
    ids = tiles_of(layout, tile)
    for x in (k, v):
        for t in {i for i in ids if i != -1}:
            members = [i for i, y in enumerate(ids) if y == t]
            x[:, :, members] = x[:, :, members[:1]]
    dense = kernels.reference_attention(q, k, v)[0]
    ctx, metrics = make_ctx(layout)
    out = PyramidSparseAttention(bands=(0.0, 0.25, 0.5, 1.0), tile=tile)(q, k, v, ctx)
    torch.testing.assert_close(out, dense, rtol=0, atol=F32)
    assert metrics["density"] < 0.6
    # on ordinary keys the same bands are an approximation
    q, k, v = qkv(1, 2, layout.num_tokens, seed=5)
    approx = PyramidSparseAttention(bands=(0.0, 0.25, 0.5, 1.0), tile=tile)(q, k, v, make_ctx(layout)[0])
    assert not torch.allclose(approx, kernels.reference_attention(q, k, v)[0], atol=1e-3)


def test_pyramid_never_pools_dissimilar_blocks():
    layout = TokenLayout((4, 16))
    q, k, v = qkv(1, 1, layout.num_tokens, seed=6)
    method = PyramidSparseAttention(bands=(0.0, 0.0, 0.0, 1.0), tile=(2, 8), pool_similarity=0.99)
    ctx, metrics = make_ctx(layout)
    torch.testing.assert_close(method(q, k, v, ctx), kernels.reference_attention(q, k, v)[0], rtol=0, atol=F32)
    assert metrics["density"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------------------------
# Re-ttention


def rettention_expected(q, k, v, mask, ratio_source):
    """r · sparse + R with r, R from ``ratio_source`` = (q, k, v) at calibration; every part from float64 masks."""
    qc, kc, vc = ratio_source
    dense_c, lse_dense = kernels.reference_attention(qc, kc, vc)
    sparse_c, lse_sparse = kernels.reference_attention(qc, kc, vc, mask=mask)
    ratio = torch.exp(lse_sparse - lse_dense).unsqueeze(-1)
    residual = dense_c.double() - ratio * sparse_c.double()
    sparse = kernels.reference_attention(q, k, v, mask=mask)[0].double()
    return (ratio * sparse + residual).float()


@pytest.mark.parametrize(
    "base",
    [
        DynamicSparseAttention(topk=0.25, tile=(2, 4)),
        diffattn.SlidingTileAttention(tile=(2, 4), window=(1, 1)),
    ],
    ids=["dynamic", "sliding-tile"],
)
def test_rettention_calibrates_and_corrects(base):
    layout = TokenLayout((4, 8), text_len=2)
    ids = tiles_of(layout, (2, 4))
    method = Rettention(base=base, calibrate_every=3)
    first = qkv(1, 2, layout.num_tokens, seed=7)
    second = [x + 0.3 * y for x, y in zip(first, qkv(1, 2, layout.num_tokens, seed=8))]
    dense = kernels.reference_attention(*first)[0]
    ctx, metrics = make_ctx(layout, step=0)
    torch.testing.assert_close(method(*first, ctx), dense, rtol=0, atol=F32)
    assert metrics["calibration"] == 1.0 and metrics["density"] > 1.0
    # the mask the calibration chose, as a token mask
    plan = method._cache[next(iter(method._cache))].plans[0]
    mask = torch.stack([plan_token_mask(plan, layout.num_tokens, h) for h in range(2)]).unsqueeze(0)
    if isinstance(base, DynamicSparseAttention):
        mask_ids = brute_force_selection(first[0][0], first[1][0], ids, topk=(0.25, 0.25), scale=1 / math.sqrt(8))
        assert torch.equal(mask[0, 0], obvious_mask(ids, mask_ids[0]))
    # same inputs at the next step: r · sparse + R is dense again
    ctx, metrics = make_ctx(layout, step=1)
    torch.testing.assert_close(method(*first, ctx), dense, rtol=0, atol=1e-5)
    assert metrics["calibration"] == 0.0 and metrics["density"] < 1 and metrics["selection_seconds"] == 0.0
    # new inputs: the sparse attention of the new inputs, renormalised with the cached ratio, plus the cached residual
    ctx, _ = make_ctx(layout, step=2)
    out = method(*second, ctx)
    torch.testing.assert_close(out, rettention_expected(*second, mask, first), rtol=0, atol=1e-5)
    assert not torch.allclose(out, kernels.reference_attention(*second)[0], atol=1e-3)
    # step 3 recalibrates (every 3 steps): dense on the new inputs
    ctx, metrics = make_ctx(layout, step=3)
    torch.testing.assert_close(method(*second, ctx), kernels.reference_attention(*second)[0], rtol=0, atol=F32)
    assert metrics["calibration"] == 1.0


def test_rettention_state_per_generation_and_call():
    layout = TokenLayout((4, 8))
    method = Rettention(base=DynamicSparseAttention(topk=0.25, tile=(2, 4)), calibrate_every=10)
    a, b = qkv(1, 1, layout.num_tokens, seed=9), qkv(1, 1, layout.num_tokens, seed=10)

    def call(x, step, timestep=None):
        ctx, metrics = make_ctx(layout, step=step, timestep=timestep)
        out = method(*x, ctx)
        return out, metrics["calibration"]

    # two calls per step with the same shape (e.g. separate cond / uncond forwards) keep separate calibrations
    call(a, 2, 900.0), call(b, 2, 900.0)
    out_a, cal_a = call(a, 3, 800.0)
    out_b, cal_b = call(b, 3, 800.0)
    assert (cal_a, cal_b) == (0.0, 0.0)
    torch.testing.assert_close(out_a, kernels.reference_attention(*a)[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out_b, kernels.reference_attention(*b)[0], rtol=0, atol=1e-5)
    # a new generation (the timestep goes up, or the step back) recalibrates, even after a dense warm-up
    assert call(a, 4, 950.0)[1] == 1.0
    assert call(a, 5, 900.0)[1] == 0.0
    assert call(a, 3)[1] == 1.0
    assert call(a, 4)[1] == 0.0
    assert call(a, 0)[1] == 1.0
    # step 0 always calibrates, also when a call reuses an entry made at step 0 (one-step generations)
    assert [call(a, 0)[1] for _ in range(9)] == [1.0] * 9
    assert len(method._cache) <= 8
    method.reset()
    assert not method._cache


def test_rettention_full_budget_and_drift_stay_dense():
    layout = TokenLayout((4, 8), text_len=2)
    method = Rettention(base=DynamicSparseAttention(topk=1.0, tile=(2, 4)), ratio_drift=0.04)
    first, second = qkv(1, 2, layout.num_tokens, seed=11), qkv(1, 2, layout.num_tokens, seed=12)
    method(*first, make_ctx(layout, step=0)[0])
    out = method(*second, make_ctx(layout, step=3)[0])
    torch.testing.assert_close(out, kernels.reference_attention(*second)[0], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# ToDo


@settings(max_examples=25, deadline=None)
@given(
    grid=st.one_of(
        st.tuples(st.integers(1, 7), st.integers(1, 7)),
        st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5)),
    ),
    factor=st.integers(1, 4),
    mode=st.sampled_from(["avg", "max", "top-left"]),
)
def test_pool_grid_equals_cells_by_hand(grid, factor, mode):
    """diffattn's cell pools (ceil sizes); the authors' interpolating modes: tests/methods/test_parity.py."""
    n = math.prod(grid)
    x = torch.randn(2, 3, n, 4, dtype=torch.float64)
    got, pooled_grid = pool_grid(x, grid, factor, mode)
    *lead, h, w = grid
    frames = math.prod(lead) if lead else 1
    ph, pw = math.ceil(h / factor), math.ceil(w / factor)
    assert pooled_grid == (*lead, ph, pw) and got.shape == (2, 3, frames * ph * pw, 4)
    for f in range(frames):
        for i in range(ph):
            for j in range(pw):
                cell = [
                    f * h * w + r * w + c
                    for r in range(i * factor, min((i + 1) * factor, h))
                    for c in range(j * factor, min((j + 1) * factor, w))
                ]
                values = x[:, :, cell]
                expected = {"avg": values.mean(-2), "max": values.amax(-2), "top-left": values[:, :, 0]}[mode]
                torch.testing.assert_close(got[:, :, f * ph * pw + i * pw + j], expected)


def test_todo_attention_by_hand_with_text_and_padding():
    layout = TokenLayout((3, 5, 5), text_len=4, text_first=True)
    q, k, v = qkv(2, 2, layout.num_tokens, seed=13)
    mask = torch.ones(2, 1, 1, layout.num_tokens, dtype=torch.bool)
    mask[1, ..., 2:4] = False  # entry 1: its last two text tokens are padding
    ctx, metrics = make_ctx(layout, attn_mask=mask)
    out = TokenDownsampling(factor=2)(q, k, v, ctx)
    kp, vp = (torch.cat([x[:, :, :4], pool_grid(x[:, :, 4:], (3, 5, 5), 2)[0]], dim=-2) for x in (k, v))
    keep = torch.cat([mask[..., :4], torch.ones(2, 1, 1, kp.shape[-2] - 4, dtype=torch.bool)], dim=-1)
    torch.testing.assert_close(out, kernels.reference_attention(q, kp, vp, mask=keep)[0], rtol=0, atol=F32)
    assert metrics["density"] == pytest.approx((4 + 3 * 4) / layout.num_tokens)  # nearest-exact: 2 x 2 of 5 x 5


def todo_metrics(model, method, inputs):
    with diffattn.apply(model, method) as handle:
        out = model(**inputs)[0]
        return out, handle.metrics()


def test_todo_on_unet_levels_thresholds_and_bitwise_factor_one(tiny_model):
    model = tiny_model("unet_sd15")
    inputs = tiny_inputs("unet_sd15", (9, 7), batch=2)  # timestep 500, odd sizes
    with torch.no_grad():
        stock = model(**inputs)[0]
        out, metrics = todo_metrics(model, TokenDownsampling(factor=1), inputs)
        assert torch.equal(out, stock)
        out, metrics = todo_metrics(model, TokenDownsampling(factor=2, timestep_threshold_stop=0.6), inputs)
        assert torch.equal(out, stock) and all(m["density"] == 1.0 for m in metrics.values())
        out, metrics = todo_metrics(model, TokenDownsampling(factor=2), inputs)
        assert not torch.allclose(out, stock, atol=1e-4)
        top = {n: m["density"] for n, m in metrics.items() if n.startswith(("down_blocks.0", "up_blocks.1"))}
        low = {n: m["density"] for n, m in metrics.items() if n.startswith("mid_block")}
        assert top and all(d == pytest.approx(12 / 63) for d in top.values())  # nearest-exact: 4 x 3 of 9 x 7
        assert low and all(d == 1.0 for d in low.values())
        _, metrics = todo_metrics(model, TokenDownsampling(factor=2, factor_level_2=2), inputs)
        assert all(metrics[n]["density"] == pytest.approx(4 / 20) for n in low)  # 2 x 2 of 5 x 4


# --------------------------------------------------------------------------------------------------------------------
# methods on models through diffattn.apply


@dataclass(frozen=True)
class SelectionAsMask(diffattn.AttentionMethod):
    """The same attention as a DynamicSparseAttention, as per-entry token masks computed by the float64 reference."""

    method: DynamicSparseAttention
    roles: frozenset = frozenset({"self", "joint"})

    def __call__(self, q, k, v, ctx):
        masks = []
        for plan in self.method.plans(q, k, ctx):
            masks.append(torch.stack([plan_token_mask(plan, q.shape[-2], h) for h in range(q.shape[1])]))
        mask = torch.stack(masks)
        if ctx.attn_mask is not None:
            mask = mask & ctx.attn_mask
        return kernels.reference_attention(q, k, v, mask=mask, scale=ctx.scale)[0]


MODEL_CASES = [
    ("wan", (3, 4, 6), (1, 2, 3)),
    ("flux", (5, 6), (2, 3)),
    ("cogvideox", (2, 5, 3), (1, 2, 2)),
    ("hunyuan_video", (3, 4, 4), (1, 2, 2)),
    ("ltx_video", (2, 4, 6), (2, 2, 2)),
    ("sd3", (6, 4), (2, 2)),
    ("unet_sd15", (9, 7), (3, 3)),
]


@pytest.mark.parametrize("family,grid,tile", MODEL_CASES)
def test_dynamic_methods_on_models(tiny_model, family, grid, tile):
    """Full budget = the stock model; a sparse budget = the same selection as masks in float64; PSA and ToDo run,
    report their numbers, and stay near dense at generous budgets."""
    model = tiny_model(family)
    inputs = tiny_inputs(family, grid, batch=2, text_len=7)
    with torch.no_grad():
        stock = model(**inputs)[0]
        for everything in (
            DynamicSparseAttention(topk=1.0, tile=tile),
            PyramidSparseAttention(bands=(1,) * 4, tile=tile),
        ):
            with diffattn.apply(model, everything):
                torch.testing.assert_close(model(**inputs)[0], stock, rtol=1e-4, atol=1e-4)
        sparse = DynamicSparseAttention(topk=0.3, tile=tile)
        with diffattn.apply(model, sparse) as handle:
            got = model(**inputs)[0]
            metrics = handle.metrics()
        with diffattn.apply(model, SelectionAsMask(sparse)):
            expected = model(**inputs)[0]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(got, stock, atol=1e-4), "the selection must be sparse for the test to mean anything"
        assert metrics and all(0 < m["density"] < 1 and m["selection_seconds"] > 0 for m in metrics.values())
        for method in (PyramidSparseAttention(bands=(0.3, 0.5, 0.7, 0.9), tile=tile), TokenDownsampling(factor=2)):
            with diffattn.apply(model, method) as handle:
                out = model(**inputs)[0]
                metrics = handle.metrics()
            assert torch.isfinite(out).all() and out.shape == stock.shape
            assert metrics and all({"density", "selection_seconds"} <= set(m) for m in metrics.values())


@pytest.mark.parametrize("family,grid,tile", [MODEL_CASES[0], MODEL_CASES[3], MODEL_CASES[6]])
def test_dense_warmup_and_rettention_through_apply(tiny_model, family, grid, tile):
    """steps=range(1, ...) keeps step 0 dense; Re-ttention calibrates on its first active step (dense output) and
    corrects the sparse attention on the next."""
    model = tiny_model(family)
    inputs = tiny_inputs(family, grid, batch=2, text_len=7)
    timesteps = (900.0, 800.0, 700.0)

    def run(method=None, steps=None):
        outs, handle = [], None
        if method is not None:
            handle = diffattn.apply(model, method, steps=steps)
        try:
            for i, t in enumerate(timesteps):
                with diffattn.denoising_step(i, len(timesteps)):  # a bare model's loop declares its step
                    outs.append(model(**(inputs | {"timestep": torch.full((2,), t)}))[0])
            return outs, ({} if handle is None else handle.metrics()), ([] if handle is None else handle.acted())
        finally:
            if handle is not None:
                handle.remove()

    with torch.no_grad():
        stock, _, _ = run()
        method = Rettention(base=DynamicSparseAttention(topk=0.3, tile=tile), calibrate_every=5)
        outs, metrics, acted = run(method, steps=range(1, 10))
        plain, _, _ = run(DynamicSparseAttention(topk=0.3, tile=tile), steps=range(1, 10))
    assert {s for s, _ in acted} == {1, 2}
    assert torch.equal(outs[0], stock[0])  # dense warm-up: the stock processors ran
    torch.testing.assert_close(outs[1], stock[1], rtol=1e-4, atol=1e-4)  # calibration step: dense
    assert not torch.allclose(outs[2], stock[2], atol=1e-4)
    assert all(m["calibration"] == pytest.approx(0.5) for m in metrics.values())
    # the correction brings the sparse attention closer to dense than the same selection without it
    assert (outs[2] - stock[2]).abs().mean() < (plain[2] - stock[2]).abs().mean()


@pytest.mark.parametrize(
    "make",
    [
        lambda: PyramidSparseAttention(bands=(0.3, 0.5, 0.7, 0.9), tile=(1, 4, 4), block_size=16),
        lambda: Rettention(base=DynamicSparseAttention(topk=0.3, tile=(1, 4, 4), block_size=16)),
    ],
)
def test_psa_and_rettention_report_non_finite_inputs(make):
    """Their pooled keys / cached residuals cannot propagate NaN as dense attention restricted to a mask would, so
    they report it (NonFiniteInputError naming the layer and the tensor); finite inputs pass untouched."""
    layout = TokenLayout((2, 8, 8))
    method = make()
    q, k, v = qkv(1, 2, layout.num_tokens)
    ctx, _ = make_ctx(layout, layer="blocks.3.attn1")
    assert torch.isfinite(method(q, k, v, ctx)).all()
    k = k.clone()
    k[0, 1, 5, 0] = float("nan")
    with pytest.raises(diffattn.NonFiniteInputError, match=r"blocks\.3\.attn1.*k contain NaN"):
        method(q, k, v, make_ctx(layout, layer="blocks.3.attn1", step=1)[0])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("budget", [{"topk": 0.5}, {"topp": 0.9}], ids=str)
def test_dynamic_sparse_non_finite_key_block_is_never_selected_for_its_score(value, budget):
    """A NaN / Inf key pools into a NaN / Inf block score. That score ranks lowest instead of first: other query
    blocks keep what the finite scores choose (same density as without it), so the NaN reaches only the queries whose
    selection holds it for another reason (their own block, text rows), as dense attention restricted to the mask."""
    layout = TokenLayout((4, 8), text_len=2)
    method = DynamicSparseAttention(tile=(2, 4), backend="torch", **budget)
    q, k, v = qkv(1, 2, layout.num_tokens, seed=4)
    clean_ctx, clean = make_ctx(layout)
    method(q, k, v, clean_ctx)
    token = 2 + 9  # visual token (1, 1): tile (0, 0)
    k = k.clone()
    k[0, :, token, 3] = value
    ctx, metrics = make_ctx(layout)
    out = method(q, k, v, ctx)
    plan = method.plans(q, k, ctx)[0]
    n = plan.gather.numel()
    mask = torch.stack(
        [kernels.block_mask_to_dense(plan.block_mask, n, n, head=h)[plan.scatter][:, plan.scatter] for h in range(2)]
    )
    ids = tiles_of(layout, (2, 4))
    own_or_text = torch.tensor([i == -1 or i == ids[token] for i in ids])
    assert torch.equal(mask[..., token], own_or_text.expand(2, -1)), "the non-finite block was selected"
    if "topk" in budget:
        assert metrics["density"] == pytest.approx(clean["density"])
    diagonal_ctx, diagonal = make_ctx(layout)
    DynamicSparseAttention(topk=0.0, tile=(2, 4), backend="torch")(q, k, v, diagonal_ctx)
    assert metrics["density"] > diagonal["density"], "the other query blocks no longer select by score"
    expected = torch.empty_like(q)
    for h in range(2):
        heads = slice(h, h + 1)
        expected[:, heads] = kernels.reference_attention(q[:, heads], k[:, heads], v[:, heads], mask=mask[h])[0]
    bad = ~torch.isfinite(out).all(-1)[0]
    if value != value:  # NaN reaches exactly the queries that see it
        assert torch.equal(bad, own_or_text.expand(2, -1))
    assert not bad[:, ~own_or_text].any(), "the non-finite key reached queries that do not see it"
    torch.testing.assert_close(out[:, :, ~own_or_text], expected[:, :, ~own_or_text], rtol=0, atol=F32)


def test_compute_dtype_casts_the_call_and_returns_its_dtype():
    """bf16 compute: the output keeps float32, equals the method run on bf16-cast inputs (cast back), and at a full
    budget stays within bf16 rounding of dense float32 attention."""
    layout = TokenLayout((4, 8, 8))
    q, k, v = qkv(2, 4, layout.num_tokens, dim=16, seed=5)
    ctx, _ = make_ctx(layout)
    fast = diffattn.DynamicSparseAttention(topk=1.0, tile=(2, 4, 4), block_size=32, compute_dtype=torch.bfloat16)
    out = fast(q, k, v, ctx)
    assert out.dtype == torch.float32
    plain = diffattn.DynamicSparseAttention(topk=1.0, tile=(2, 4, 4), block_size=32)
    cast = plain(q.bfloat16(), k.bfloat16(), v.bfloat16(), ctx).float()
    assert torch.equal(out, cast)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert 0 < (out - dense).abs().max() < 0.03
    sparse = diffattn.DynamicSparseAttention(topk=0.25, tile=(2, 4, 4), block_size=32, compute_dtype=torch.bfloat16)
    assert sparse(q, k, v, ctx).dtype == torch.float32


@pytest.mark.parametrize("value", [torch.int8, "bfloat16", 16])
def test_compute_dtype_must_be_a_float_torch_dtype(value):
    with pytest.raises(ValueError, match="compute_dtype is None .* e.g. compute_dtype=torch.bfloat16"):
        diffattn.DynamicSparseAttention(topk=0.5, compute_dtype=value)


def test_selection_mask_skips_query_lists_only_without_gradients():
    """The per-call mask of a selection leaves out the query-side lists (read only by FlexAttention's backward)
    when no gradient can flow, and keeps them, equal to a full build, when one can; the kernel's output is the same."""
    layout = TokenLayout((4, 8, 8))
    ko = block_order(layout, (2, 4, 4), 32, 0)
    selected = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.4
    with torch.no_grad():
        lean, _ = selection_block_mask(ko, selected)
    full, _ = selection_block_mask(ko, selected)
    assert lean.q_indices is None and full.q_indices is not None
    q, k, v = qkv(1, 2, ko.length, 16, seed=0)
    with torch.no_grad():
        a = kernels.attention(q, k, v, lean, backend="torch")[0]
        b = kernels.attention(q, k, v, full, backend="torch")[0]
    assert torch.equal(a, b)
