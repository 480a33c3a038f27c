"""Semantic-aware permutation (Sparse VideoGen 2) as an option of DynamicSparseAttention: k-means, the per-head
orders and their inverses, exactness at a full budget, the gain on attention whose mass is clustered but scattered
over the token grid, the centroid cache across steps, and a run through a tiny diffusers pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import make_ctx, qkv

import diffattn
import diffattn_kernels as kernels
from diffattn import TokenLayout
from diffattn.methods import permutation
from diffattn.methods.dynamic_common import _Plan, _take
from diffattn.methods.dynamic_sparse import DynamicSparseAttention
from diffattn.methods.permutation import (
    SemanticPermutation,
    assign,
    attended_ranks,
    chain_ranks,
    cluster_order,
    head_kernel_order,
    inverse_order,
    kmeans,
    seed_centroids,
)
from diffattn.methods.rettention import Rettention
from diffattn.patterns.dynamic import block_order
from diffattn.testing import tiny_pipeline

LAYOUTS = [TokenLayout((4, 8, 8)), TokenLayout((4, 8, 8), text_len=5), TokenLayout((6, 7), text_len=3, text_first=True)]


def scattered_groups(rows: int, length: int, groups: int, dim: int, seed: int, spread: float = 0.05):
    """Points around ``groups`` well-separated centres, each token's group drawn at random (scattered over the
    sequence): ``(points (rows, length, dim), groups (rows, length))``."""
    g = torch.Generator().manual_seed(seed)
    centres = 4.0 * torch.randn(rows, groups, dim, generator=g)
    which = torch.randint(groups, (rows, length), generator=g)
    points = centres.gather(1, which.unsqueeze(-1).expand(rows, length, dim))
    return points + spread * torch.randn(rows, length, dim, generator=g), which


def same_partition(labels: torch.Tensor, truth: torch.Tensor) -> bool:
    """Whether two labelings of one row group the tokens alike (up to renaming the labels)."""
    pairs = set(zip(labels.tolist(), truth.tolist()))
    return len(pairs) == len(set(labels.tolist())) == len(set(truth.tolist()))


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out - reference).norm() / reference.norm())


# --------------------------------------------------------------------------------------------------------------------
# k-means and orders


def test_kmeans_recovers_scattered_groups_and_is_deterministic():
    x, truth = scattered_groups(rows=3, length=200, groups=6, dim=8, seed=0)
    centroids, labels = kmeans(x, seed_centroids(x, 6), iterations=3)
    for row in range(3):
        assert same_partition(labels[row], truth[row]), f"row {row}: k-means split or merged a group"
    # the centroids are the groups' means, and the labels their nearest centroid
    for row in range(3):
        for c in range(6):
            torch.testing.assert_close(centroids[row, c], x[row][labels[row] == c].mean(0))
    assert torch.equal(labels, assign(x, centroids))
    again_centroids, again_labels = kmeans(x.clone(), seed_centroids(x.clone(), 6), iterations=3)
    assert torch.equal(again_labels, labels) and torch.equal(again_centroids, centroids)


def test_seeds_reach_every_group_and_empty_clusters_keep_their_centroid():
    x, truth = scattered_groups(rows=2, length=64, groups=4, dim=4, seed=1)
    seeds = seed_centroids(x, 4)
    for row in range(2):  # one seed per group, whatever the groups' places in the sequence
        assert same_partition(assign(x[row : row + 1], seeds[row : row + 1])[0], truth[row])
    far = torch.full((1, 1, 4), 1e3)
    centroids, labels = kmeans(x[:1], torch.cat([seeds[:1], far], 1), iterations=2)
    assert not bool((labels == 4).any()) and torch.equal(centroids[0, 4], far[0, 0])
    with pytest.raises(ValueError, match="clusters <= tokens"):
        seed_centroids(x, 65)


def test_cluster_order_round_trip_and_head_kernel_order():
    labels = torch.randint(5, (3, 40), generator=torch.Generator().manual_seed(0))
    order = cluster_order(labels)
    x = torch.randn(3, 40, 2)
    permuted = x.gather(1, order.unsqueeze(-1).expand_as(x))
    assert bool((labels.gather(1, order).diff(dim=-1) >= 0).all())  # grouped by cluster
    assert torch.equal(permuted.gather(1, inverse_order(order).unsqueeze(-1).expand_as(x)), x)
    # a joint layout with padded text: gather then scatter returns every head to the sequence order, text unmoved
    layout = TokenLayout((4, 10), text_len=6, text_first=True)
    ko = block_order(layout, None, 16, text_padding=2)
    heads_order = cluster_order(torch.randint(4, (3, layout.num_visual), generator=torch.Generator().manual_seed(1)))
    gather, scatter = head_kernel_order(ko, layout, heads_order)
    q = torch.randn(2, 3, layout.num_tokens, 8)
    kernel = _take(q, gather)
    assert torch.equal(kernel[:, :, layout.num_visual :], q[:, :, layout.text_slice])
    for h in range(3):
        assert torch.equal(kernel[:, h, : layout.num_visual], q[:, h, layout.visual_slice][:, heads_order[h]])
    assert torch.equal(_take(kernel, scatter), q)
    plan = _Plan(slice(0, 2), gather, scatter, None, 1.0, gather)
    assert torch.equal(plan.output(plan.queries(q)), q) and torch.equal(plan.keys(q), kernel)
    lse = torch.randn(2, 3, layout.num_tokens)
    assert torch.equal(plan.output(_take(lse.unsqueeze(-1), gather).squeeze(-1)), lse)


@pytest.mark.parametrize("memory", ["bhsd", "bshd", "strided"])
def test_take_with_one_order_for_every_head_in_each_memory_layout(memory):
    """A shared (L,) order gives x[:, :, order] whatever the memory layout: contiguous (flat rows), sequence-major as
    attention processors pass q / k / v (whole token rows), or another stride (index_select along the sequence)."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 3, 50, 8, generator=g)
    x = {
        "bhsd": base,
        "bshd": base.transpose(1, 2).contiguous().transpose(1, 2),
        "strided": torch.randn(2, 3, 50, 16, generator=g)[..., ::2],
    }[memory]
    order = torch.randperm(50, generator=g)[:40]
    assert torch.equal(_take(x, order), x[:, :, order])
    assert torch.equal(_take(x[1:2], order), x[1:2, :, order])
    assert torch.equal(_take(x[..., 0], order.view(1, -1).expand(3, -1)), x[:, :, order, 0])


def test_clusters_are_placed_next_to_similar_ones():
    # centroids on a line, in shuffled cluster order: the chain walks the line from one end
    g = torch.Generator().manual_seed(2)
    along = torch.randperm(7, generator=g).float()
    line = torch.stack([along, torch.zeros(7)], -1).unsqueeze(0) + 0.01 * torch.randn(1, 7, 2, generator=g)
    ranks = chain_ranks(line)[0]
    by_rank = along[inverse_order(ranks)]  # positions on the line, in chain order
    assert torch.equal(by_rank, torch.arange(7.0)) or torch.equal(by_rank, torch.arange(6.0, -1.0, -1.0))
    # query clusters follow the key clusters they attend: a query centroid equal to a key centroid goes where it is
    keys = F.normalize(torch.randn(1, 5, 8, generator=g), dim=-1) * 6
    key_ranks = torch.randperm(5, generator=g).unsqueeze(0)
    queries = keys[:, [3, 0, 4, 1, 2]]
    query_ranks = attended_ranks(queries, keys, key_ranks, torch.full((1, 5), 10.0), scale=1.0)
    assert torch.equal(query_ranks[0], key_ranks[0, [3, 0, 4, 1, 2]])


# --------------------------------------------------------------------------------------------------------------------
# the method


def permuted(**kwargs) -> DynamicSparseAttention:
    options = dict(clusters_q=kwargs.pop("clusters_q", 4), clusters_k=kwargs.pop("clusters_k", 8))
    block_size = kwargs.pop("block_size", 32)
    return DynamicSparseAttention(block_size=block_size, permute=SemanticPermutation(**options), **kwargs)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_full_budget_is_dense_attention(layout):
    q, k, v = qkv(2, 4, layout.num_tokens, dim=16, seed=2, dtype=torch.float32)
    dense = F.scaled_dot_product_attention(q, k, v)
    for method in (permuted(topk=1.0), permuted(topp=1.0, clusters_q=None, clusters_k=None, block_size=16)):
        ctx, metrics = make_ctx(layout)
        torch.testing.assert_close(method(q, k, v, ctx), dense, rtol=0, atol=1e-5, msg=repr(method))
        assert metrics["density"] == pytest.approx(1.0)
        assert metrics["clustering_seconds"] > 0 and metrics["permute_seconds"] > 0
        assert metrics["selection_seconds"] >= metrics["clustering_seconds"]
    # grouped-query attention: keys clustered per key head
    layout = TokenLayout((4, 8, 8))
    q, k, v = qkv(1, 4, layout.num_tokens, dim=16, seed=3)
    k, v = k[:, :2], v[:, :2]
    out = permuted(topk=1.0)(q, k, v, make_ctx(layout)[0])
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, enable_gqa=True), rtol=0, atol=1e-5)


def clustered_attention(heads: int, layout: TokenLayout, groups: int, seed: int):
    """q, k, v whose attention mass is clustered but scattered over the grid: each key comes from one of ``groups``
    centres at a random place, each query points at one centre (so it attends that centre's keys)."""
    g = torch.Generator().manual_seed(seed)
    n, dim = layout.num_tokens, 16
    centres = F.normalize(torch.randn(heads, groups, dim, generator=g), dim=-1)

    def around(scale: float) -> torch.Tensor:
        which = torch.randint(groups, (heads, n), generator=g)
        picked = centres.gather(1, which.unsqueeze(-1).expand(heads, n, dim))
        return (scale * picked + 0.3 * torch.randn(heads, n, dim, generator=g)).unsqueeze(0)

    return around(6.0), around(6.0), torch.randn(1, heads, n, dim, generator=g)


def test_permutation_keeps_more_attention_mass_at_the_same_budget():
    layout = TokenLayout((4, 8, 8))
    q, k, v = clustered_attention(heads=3, layout=layout, groups=8, seed=4)
    dense = F.scaled_dot_product_attention(q, k, v)
    plain = DynamicSparseAttention(topk=0.25, block_size=16, tile=None)
    perm = permuted(topk=0.25, clusters_q=8, clusters_k=8, block_size=16)
    plain_ctx, plain_metrics = make_ctx(layout)
    perm_ctx, perm_metrics = make_ctx(layout)
    plain_error = relative_error(plain(q, k, v, plain_ctx), dense)
    perm_error = relative_error(perm(q, k, v, perm_ctx), dense)
    assert perm_metrics["density"] == pytest.approx(plain_metrics["density"])  # the same work
    assert perm_error < 0.5 * plain_error, (perm_error, plain_error)
    assert perm_error < 0.4, perm_error


def test_centroids_refresh_every_few_steps_warm_started(monkeypatch):
    layout = TokenLayout((4, 8, 8), text_len=3)
    method = DynamicSparseAttention(
        topk=0.5, block_size=32, permute=SemanticPermutation(clusters_q=4, clusters_k=8, refresh_every=3)
    )
    calls = []
    real = permutation.kmeans

    def counted(x, centroids, iterations):
        out = real(x, centroids, iterations)
        calls.append((centroids.clone(), out[0].clone()))
        return out

    monkeypatch.setattr(permutation, "kmeans", counted)
    q, k, v = qkv(2, 2, layout.num_tokens, dim=16, seed=5)

    def run(step, timestep=None):
        before = len(calls)
        ctx, _ = make_ctx(layout, step=step, timestep=timestep)
        out = method(q, k, v, ctx)
        return out, (len(calls) - before) // 2  # queries and keys: two k-means calls per refresh

    refreshed = [run(step)[1] for step in range(7)]
    assert refreshed == [1, 0, 0, 1, 0, 0, 1]
    # step 0 started from the farthest-point seeds, step 3 from the centroids of step 0 (warm start)
    seeds_q, centroids_q = calls[0]
    assert torch.equal(seeds_q, seed_centroids(q[:, :, layout.visual_slice].flatten(0, 1), 4))
    assert torch.equal(calls[2][0], centroids_q) and not torch.equal(calls[2][0], seeds_q)
    # between refreshes the cached centroids order the tokens (no k-means): equal inputs, equal output
    (out_7, refreshed_7), (out_8, refreshed_8) = run(7), run(8)
    assert refreshed_7 == refreshed_8 == 0 and torch.equal(out_7, out_8)
    # a new generation (step back, or the timestep up) starts from seeds again; a second call in a step has its own
    assert run(2)[1] == 1 and run(3)[1] == 0
    assert run(4, timestep=900.0)[1] == 0 and run(5, timestep=950.0)[1] == 1
    assert run(5, timestep=950.0)[1] == 1 and run(6, timestep=940.0)[1] == 0
    assert len(method._permutation.cache) == 2
    method.reset()
    assert not method._permutation.cache and run(6)[1] == 1


def test_rettention_reuses_a_permuted_selection():
    layout = TokenLayout((4, 8, 8), text_len=3)
    q, k, v = qkv(1, 2, layout.num_tokens, dim=16, seed=6)
    method = Rettention(base=permuted(topk=0.25), calibrate_every=5)
    dense = kernels.reference_attention(q, k, v)[0]
    torch.testing.assert_close(method(q, k, v, make_ctx(layout)[0]), dense, rtol=0, atol=1e-5)  # calibration
    # the next step recomputes the same sparse attention from the cached per-head plan: ratio · sparse + residual
    ctx, metrics = make_ctx(layout, step=1)
    torch.testing.assert_close(method(q, k, v, ctx), dense, rtol=0, atol=1e-5)
    assert metrics["calibration"] == 0.0 and metrics["density"] < 1


def test_bad_settings_say_how_to_fix():
    with pytest.raises(ValueError, match="tile=None"):
        DynamicSparseAttention(topk=0.1, tile=(2, 4, 4), permute=SemanticPermutation())
    with pytest.raises(TypeError, match="SemanticPermutation"):
        DynamicSparseAttention(topk=0.1, permute=True)
    with pytest.raises(ValueError, match="clusters_q"):
        SemanticPermutation(clusters_q=0)
    with pytest.raises(TypeError, match="refresh_every"):
        SemanticPermutation(refresh_every=2.5)
    layout = TokenLayout((2, 3, 4))
    method = DynamicSparseAttention(topk=0.1, permute=SemanticPermutation(clusters_k=25))
    ctx, _ = make_ctx(layout)
    with pytest.raises(diffattn.MethodConfigError, match=r"clusters_k <= 24"):
        method.validate(ctx)
    with pytest.raises(diffattn.MethodConfigError, match=r"clusters_k <= 24"):
        method(*qkv(1, 1, 24), ctx)
    with pytest.raises(diffattn.MethodConfigError, match="denoising_step"):
        permuted(topk=0.5, clusters_q=2, clusters_k=2)(*qkv(1, 1, 24), make_ctx(layout, step=None)[0])
    # without permute the method is unchanged: no step needed, no centroids, no permutation numbers
    plain = DynamicSparseAttention(topk=0.5, tile=(2, 2, 2))
    ctx, metrics = make_ctx(layout, step=None)
    plain(*qkv(1, 1, 24), ctx)
    assert "clustering_seconds" not in metrics and not plain._permutation.cache


# --------------------------------------------------------------------------------------------------------------------
# in a pipeline


def test_runs_in_a_tiny_flux_pipeline():
    """Joint attention (text tokens unclustered) with Flux's separate cond / uncond calls: a full budget gives the
    stock images, a sparse one finite images that differ, with the permutation's numbers reported."""
    pipe = tiny_pipeline("flux", seed=0)

    def generate() -> np.ndarray:
        out = pipe(
            "a red circle",
            negative_prompt="a blue square",
            true_cfg_scale=4.0,
            num_inference_steps=3,
            height=32,
            width=32,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        )
        return np.asarray(out.images)

    with torch.no_grad():
        stock = generate()
        with diffattn.apply(pipe, permuted(topk=1.0, clusters_q=4, clusters_k=6, block_size=16)):
            full = generate()
        method = permuted(topk=0.3, clusters_q=4, clusters_k=6, block_size=16)
        with diffattn.apply(pipe, method) as handle:
            sparse = generate()
            metrics = handle.metrics()
    np.testing.assert_allclose(full, stock, rtol=0, atol=1e-4)
    assert np.isfinite(sparse).all() and np.abs(sparse - stock).max() > 1e-4
    assert metrics and all(0 < m["density"] < 1 and m["clustering_seconds"] > 0 for m in metrics.values())


def test_bf16_compute_keeps_the_centroids_across_steps():
    """``compute_dtype`` runs the same instance on cast inputs: its centroids persist and refresh on schedule."""
    layout = TokenLayout((4, 8, 8))
    method = DynamicSparseAttention(
        topk=0.5,
        block_size=32,
        permute=SemanticPermutation(clusters_q=4, clusters_k=8, refresh_every=3),
        compute_dtype=torch.bfloat16,
    )
    q, k, v = qkv(2, 2, layout.num_tokens, dim=16, seed=5)
    refreshed = []
    for step in range(4):
        ctx, metrics = make_ctx(layout, step=step, num_steps=4)
        assert method(q, k, v, ctx).dtype == torch.float32
        refreshed.append(metrics["centroids_refreshed"])
    assert refreshed == [1.0, 0.0, 0.0, 1.0]
