"""Semantic-aware permutation (Sparse VideoGen 2, Yang et al. 2025) for :class:`DynamicSparseAttention`: queries and
keys are clustered per head by k-means, each cluster is gathered into contiguous kernel positions, the block
selection runs on that order, and the output goes back to the sequence order.

Tokens that attend alike (similar queries) and tokens that are attended alike (similar keys) are often far apart in
the token grid (the same object in every frame, a texture across the image); sorted by cluster they fill a few
kernel blocks, so a top-k / top-p budget of blocks covers more of the attention mass than blocks of the grid do.

- :class:`SemanticPermutation`: the option (cluster counts, k-means iterations, how often centroids are refreshed).
- :func:`seed_centroids`, :func:`assign`, :func:`kmeans`: k-means batched over rows (batch entries x heads), torch
  only and deterministic (seeded by farthest-point traversal, ties to the lower index, no randomness).
- :func:`chain_ranks`, :func:`attended_ranks`: the order of the clusters: key clusters along a nearest-neighbour
  chain of their centroids, query clusters by where in that key order their attention falls (with blocks of fixed
  size a block often straddles two clusters: they should be alike).
- :func:`cluster_order`, :func:`inverse_order`: each row's tokens sorted by cluster (stable: grid order inside a
  cluster), and back.
- :func:`head_kernel_order`: a shared :class:`~diffattn.patterns.compile.KernelOrder` with its visual part
  permuted per head (text tokens stay where the kernel order puts them).
- :class:`PermutationState`: the centroids a method keeps per layer and call between refreshes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..context import AttentionContext
from ..errors import MethodConfigError
from ..layout import TokenLayout
from ..patterns.compile import KernelOrder
from .checks import check_int, check_optional_int
from .dynamic_common import _call_key, _evict_finished, _new_generation, _release_application

__all__ = [
    "SemanticPermutation",
    "seed_centroids",
    "assign",
    "kmeans",
    "chain_ranks",
    "attended_ranks",
    "cluster_order",
    "inverse_order",
    "head_kernel_order",
    "PermutationState",
]

# score entries (rows x tokens x clusters, float32) per chunk of :func:`assign`: bounds its memory to ~64 MB
_ASSIGN_CHUNK = 1 << 24
# seed candidates per cluster (see seed_centroids)
_SEED_SAMPLE = 16


@dataclass(frozen=True)
class SemanticPermutation:
    """Cluster queries and keys per head and attend in cluster order (Sparse VideoGen 2's semantic-aware
    permutation), an option of :class:`~diffattn.methods.dynamic_sparse.DynamicSparseAttention` (``permute=``).

    ``clusters_q`` / ``clusters_k``: k-means clusters of the visual queries / keys of each head (``None``: one per
    kernel block of visual tokens, ``ceil(n_visual / block_size)``, so a cluster fills about one block at any
    resolution). ``iterations``: Lloyd iterations at each refresh. ``refresh_every``: denoising steps between
    refreshes. At a generation's first call (step 0, the step going back or the timestep up) the centroids are
    seeded by farthest-point traversal (:func:`seed_centroids`); every ``refresh_every`` steps after that,
    ``iterations`` more iterations start from the cached centroids (warm start); in between, each call only assigns
    its tokens to the cached centroids (one pass). Everything is deterministic: the same inputs and steps give the
    same order.
    """

    clusters_q: int | None = None
    clusters_k: int | None = None
    iterations: int = 4
    refresh_every: int = 5

    def __post_init__(self) -> None:
        for name in ("clusters_q", "clusters_k"):
            value = check_optional_int(
                self.name, name, getattr(self, name), minimum=1, example=32, meaning="a number of clusters per head"
            )
            object.__setattr__(self, name, value)
        check_int(self.name, "iterations", self.iterations, minimum=1, example=4, meaning="k-means iterations")
        check_int(self.name, "refresh_every", self.refresh_every, minimum=1, example=5, meaning="a number of steps")

    @property
    def name(self) -> str:
        return type(self).__name__

    def clusters(self, num_visual: int, block_size: int) -> tuple[int, int]:
        """``(clusters_q, clusters_k)`` for ``num_visual`` visual tokens (``None`` counts: one per kernel block)."""
        auto = math.ceil(num_visual / block_size)
        return tuple(auto if c is None else c for c in (self.clusters_q, self.clusters_k))  # type: ignore[return-value]

    def check_tokens(self, owner: str, layer: str, num_visual: int, block_size: int) -> None:
        """Refuse more clusters than the layer has visual tokens (each cluster is seeded from a token)."""
        for name, count in zip(("clusters_q", "clusters_k"), self.clusters(num_visual, block_size)):
            if count > num_visual:
                raise MethodConfigError(
                    f"{owner} on layer {layer}: permute={self.name}({name}={count}) asks for more clusters than the "
                    f"layer's {num_visual} visual tokens. Fix: give {name} <= {num_visual}, e.g. "
                    f"{name}={max(1, num_visual // 16)}, or {name}=None (one cluster per kernel block)"
                )


def seed_centroids(x: Tensor, clusters: int) -> Tensor:
    """Initial centroids ``(N, C, D)`` of rows ``x`` ``(N, L, D)`` by farthest-point traversal: the token nearest to
    the row's mean, then, ``C - 1`` times, the token farthest from every centroid chosen so far (ties: the lower
    index). Deterministic, and every well-separated group of tokens gets a seed wherever its tokens sit in the
    sequence (seeds at evenly spaced positions miss groups that are scattered: two seeds land in one group, none in
    another, and Lloyd iterations cannot undo it). A token far from all others gets a cluster of its own. The
    candidates are at most ``16 C`` evenly spaced tokens (the traversal makes ``C`` passes over them; a group of
    fewer than ``L / 16 C`` tokens may get no seed of its own). As float32 (float64 stays float64)."""
    length = x.shape[-2]
    if not 1 <= clusters <= length:
        raise ValueError(f"k-means needs 1 <= clusters <= tokens, got {clusters} clusters for {length} tokens")
    x = _float(x)
    if length > _SEED_SAMPLE * clusters:  # seeds from evenly spaced candidates: C sequential passes over them
        candidates = _SEED_SAMPLE * clusters
        x = x.index_select(1, torch.div(torch.arange(candidates) * length, candidates, rounding_mode="floor"))
    n, _, dim = x.shape
    norms = x.square().sum(-1)  # (N, L)

    def distance_to(index: Tensor) -> Tensor:  # squared distance of every token to token ``index`` of its row
        point = x.gather(1, index.view(n, 1, 1).expand(n, 1, dim))  # (N, 1, D)
        return norms - 2 * torch.bmm(x, point.transpose(1, 2)).squeeze(-1) + point.square().sum(-1)

    chosen = torch.empty(n, clusters, dtype=torch.long, device=x.device)
    chosen[:, 0] = (x - x.mean(1, keepdim=True)).square().sum(-1).argmin(-1)
    nearest = distance_to(chosen[:, 0])
    for c in range(1, clusters):
        chosen[:, c] = nearest.argmax(-1)
        nearest = torch.minimum(nearest, distance_to(chosen[:, c]))
    return x.gather(1, chosen.unsqueeze(-1).expand(n, clusters, dim))


def _float(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def assign(x: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid (Euclidean) of every token, ``(N, L)`` int64, from finite rows ``x``
    ``(N, L, D)`` and ``centroids`` ``(N, C, D)``. Ties go to the lower index."""
    x = _float(x)
    centroids = centroids.to(x.dtype)
    n, length, _ = x.shape
    clusters = centroids.shape[1]
    # argmin |x - c|² = argmax x·c - |c|²/2
    bias = (-0.5 * centroids.square().sum(-1)).unsqueeze(1)  # (N, 1, C)
    labels = torch.empty(n, length, dtype=torch.long, device=x.device)
    step = max(1, _ASSIGN_CHUNK // max(length * clusters, 1))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        scores = torch.bmm(x[lo:hi], centroids[lo:hi].transpose(1, 2))
        scores += bias[lo:hi]  # (bmm then an in-place add, and max rather than argmax: ~2x faster on CPU)
        labels[lo:hi] = scores.max(-1).indices
    return labels


def _update(x: Tensor, labels: Tensor, centroids: Tensor) -> Tensor:
    """Mean of each cluster's tokens; a cluster left empty keeps its centroid."""
    n, _, dim = x.shape
    clusters = centroids.shape[1]
    flat = (labels + torch.arange(n, device=labels.device).view(-1, 1) * clusters).reshape(-1)
    sums = torch.zeros(n * clusters, dim, dtype=centroids.dtype, device=x.device)
    sums.index_add_(0, flat, x.reshape(-1, dim).to(centroids.dtype))
    counts = torch.bincount(flat, minlength=n * clusters).to(centroids.dtype).view(n, clusters, 1)
    means = sums.view(n, clusters, dim) / counts.clamp(min=1)
    return torch.where(counts > 0, means, centroids)


def kmeans(x: Tensor, centroids: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    """``iterations`` Lloyd iterations (assign, then move each centroid to its tokens' mean) on rows ``x``
    ``(N, L, D)`` from ``centroids`` ``(N, C, D)``: returns the new centroids (float32 or float64) and the labels
    ``(N, L)`` of the tokens' nearest new centroid."""
    x = _float(x)
    centroids = centroids.to(x.dtype)
    for _ in range(iterations):
        centroids = _update(x, assign(x, centroids), centroids)
    return centroids, assign(x, centroids)


def cluster_order(labels: Tensor) -> Tensor:
    """The tokens of rows of cluster labels ``(..., L)`` sorted by cluster: ``order[..., p]`` is the token at
    position ``p`` (stable: tokens keep their original order inside a cluster)."""
    return torch.argsort(labels, dim=-1, stable=True)


def inverse_order(order: Tensor) -> Tensor:
    """The inverse of permutations ``order`` ``(..., L)``: ``inverse[..., order[..., p]] = p``."""
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def head_kernel_order(ko: KernelOrder, layout: TokenLayout, order: Tensor) -> tuple[Tensor, Tensor]:
    """Per-head ``(gather (H, L), scatter (H, S))`` of the kernel order ``ko`` (raster visual part, no grid padding)
    with its visual part put in ``order`` ``(H, n_visual)`` (raster indices of the visual tokens); text positions,
    padded text included, stay where ``ko`` has them."""
    n_vis = layout.num_visual
    if ko.num_visual != n_vis:
        raise ValueError(
            f"a per-head cluster order needs a kernel order without grid padding ({ko.num_visual} visual positions "
            f"for {n_vis} tokens): build it with tile=None"
        )
    heads, device = order.shape[0], order.device
    gather = ko.gather.to(device).expand(heads, -1).clone()
    gather[:, :n_vis] = order + layout.visual_start
    scatter = ko.scatter.to(device).expand(heads, -1).clone()
    scatter[:, layout.visual_slice] = inverse_order(order)
    return gather, scatter


def chain_ranks(centroids: Tensor) -> Tensor:
    """Rank ``(N, C)`` of each cluster along a greedy nearest-neighbour chain through its row's centroids
    ``(N, C, D)``, from the centroid farthest from their mean: neighbours in the chain are similar, so a kernel block
    that straddles two clusters pools similar tokens."""
    n, clusters, _ = centroids.shape
    rows = torch.arange(n, device=centroids.device)
    distance = torch.cdist(centroids, centroids)
    visited = torch.zeros(n, clusters, dtype=torch.bool, device=centroids.device)
    ranks = torch.empty(n, clusters, dtype=torch.long, device=centroids.device)
    current = (centroids - centroids.mean(1, keepdim=True)).square().sum(-1).argmax(-1)
    for r in range(clusters):
        ranks[rows, current] = r
        visited[rows, current] = True
        if r + 1 < clusters:
            current = distance[rows, current].masked_fill(visited, math.inf).argmin(-1)
    return ranks


def attended_ranks(centroids_q: Tensor, centroids_k: Tensor, ranks_k: Tensor, sizes_k: Tensor, scale: float) -> Tensor:
    """Rank ``(N, Cq)`` of each query cluster by where its centroid's attention falls in the key order: the mean
    position of the key clusters (in ``ranks_k`` order, ``sizes_k`` tokens each) under the softmax of
    ``scale · q̄·k̄ + log size``. Query clusters that attend the same keys end up next to each other, so a query block
    that straddles two of them still needs the same key blocks."""
    logits = scale * torch.bmm(centroids_q, centroids_k.transpose(1, 2)) + sizes_k.log().unsqueeze(1)
    ordered_sizes = torch.zeros_like(sizes_k).scatter_(1, ranks_k, sizes_k)  # size of the cluster at each rank
    centre_at_rank = ordered_sizes.cumsum(1) - ordered_sizes / 2
    centre = centre_at_rank.gather(1, ranks_k)  # (N, Ck) position of each key cluster's middle
    where = torch.bmm(torch.softmax(logits, -1), centre.unsqueeze(-1)).squeeze(-1)  # (N, Cq)
    order = torch.argsort(where, dim=-1, stable=True)
    return inverse_order(order)


@dataclass
class _Centroids:
    q: Tensor  # (B, H, Cq, D) float32
    k: Tensor  # (B, H_kv, Ck, D) float32
    chain_k: Tensor  # (B·H_kv, Ck): rank of each key cluster in the key order (chain_ranks)
    refreshed_step: int
    last_step: int
    timestep: float | None


@dataclass(frozen=True, eq=False)
class ClusterOrders:
    """One call's visual tokens in cluster order: ``q`` ``(B, H, n_visual)`` and ``k`` ``(B, H_kv, n_visual)``
    (raster indices of the visual tokens), whether the centroids were (re)computed, and the seconds it took."""

    q: Tensor
    k: Tensor
    refreshed: bool
    seconds: float


@dataclass
class PermutationState:
    """The centroids one method instance keeps, one entry per (application, layer, batch roles or size, shapes,
    heads slice, call order within the step), as :class:`~diffattn.methods.rettention.Rettention` keeps its
    calibration: a new generation on a layer drops the finished one's entries, removing an application drops its
    own."""

    cache: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)

    def reset(self) -> None:
        self.cache.clear()
        self.calls.clear()

    def release(self, application_id: int) -> None:
        _release_application(self.cache, self.calls, application_id)

    def orders(
        self,
        config: SemanticPermutation,
        owner: str,
        q: Tensor,
        k: Tensor,
        ctx: AttentionContext,
        block_size: int,
        scale: float,
    ) -> ClusterOrders:
        """Cluster this call's visual queries and keys (refreshing or reusing the layer's centroids) and sort them."""
        if ctx.step is None:
            raise MethodConfigError(
                f"{owner} on {ctx.layer}: permute={config.name}(...) refreshes its centroids every "
                f"{config.refresh_every} denoising steps, but this call's step is unknown (the model was not called "
                "from a diffusers pipeline). Wrap each call in diffattn.denoising_step(i, num_steps), or drop permute="
            )
        start = time.perf_counter()
        layout = ctx.q_layout
        n_vis = layout.num_visual
        config.check_tokens(owner, ctx.layer, n_vis, block_size)
        clusters_q, clusters_k = config.clusters(n_vis, block_size)
        rows_q, rows_k = (_visual_rows(x, layout) for x in (q, k))
        key = _call_key(self.calls, q, k, ctx)
        state = self.cache.get(key)
        new_generation = _new_generation(state, ctx)
        if state is None or new_generation:
            _evict_finished(self.cache, self.calls, key[:2], ctx.step)
        cold = state is None or new_generation or ctx.step == 0
        refresh = cold or ctx.step - state.refreshed_step >= config.refresh_every
        if refresh:
            seeds_q = seed_centroids(rows_q, clusters_q) if cold else state.q.flatten(0, 1)
            seeds_k = seed_centroids(rows_k, clusters_k) if cold else state.k.flatten(0, 1)
            centroids_q, labels_q = kmeans(rows_q, seeds_q, config.iterations)
            centroids_k, labels_k = kmeans(rows_k, seeds_k, config.iterations)
            state = _Centroids(
                centroids_q.unflatten(0, q.shape[:2]),
                centroids_k.unflatten(0, k.shape[:2]),
                chain_ranks(centroids_k),
                ctx.step,
                ctx.step,
                ctx.timestep,
            )
            self.cache[key] = state
        else:
            labels_q = assign(rows_q, state.q.flatten(0, 1))
            labels_k = assign(rows_k, state.k.flatten(0, 1))
            state.last_step, state.timestep = ctx.step, ctx.timestep
        ranks_q, ranks_k = _placement(state, labels_k, k.shape[1], q.shape[1], scale)
        return ClusterOrders(
            cluster_order(ranks_q.gather(1, labels_q)).unflatten(0, q.shape[:2]),
            cluster_order(ranks_k.gather(1, labels_k)).unflatten(0, k.shape[:2]),
            refresh,
            time.perf_counter() - start,
        )


def _placement(state: _Centroids, labels_k: Tensor, kv_heads: int, heads: int, scale: float) -> tuple[Tensor, Tensor]:
    """Where each cluster goes: ``(ranks_q (B·H, Cq), ranks_k (B·H_kv, Ck))`` (see :func:`chain_ranks`,
    :func:`attended_ranks`); under grouped-query attention each query head ranks against its key head."""
    centroids_k, ranks_k = state.k.flatten(0, 1), state.chain_k
    clusters_k = centroids_k.shape[1]
    sizes_k = torch.zeros(labels_k.shape[0], clusters_k, dtype=centroids_k.dtype, device=labels_k.device)
    sizes_k.scatter_add_(1, labels_k, torch.ones_like(labels_k, dtype=sizes_k.dtype))

    def per_query_head(x: Tensor) -> Tensor:
        return x.unflatten(0, (-1, kv_heads)).repeat_interleave(heads // kv_heads, dim=1).flatten(0, 1)

    centroids_q = state.q.flatten(0, 1)
    ranks_q = attended_ranks(
        centroids_q, per_query_head(centroids_k), per_query_head(ranks_k), per_query_head(sizes_k), scale
    )
    return ranks_q, ranks_k


def _visual_rows(x: Tensor, layout: TokenLayout) -> Tensor:
    """The visual tokens of ``x`` ``(B, H, S, D)`` as rows ``(B·H, n_visual, D)`` for clustering, NaN / Inf entries
    as 0 (they would stall the seeds and the centroids; the attention itself still gets them)."""
    return torch.nan_to_num(x[:, :, layout.visual_slice].flatten(0, 1), nan=0.0, posinf=0.0, neginf=0.0)
