"""Dynamic block selection: :class:`DynamicSparseAttention` chooses key blocks from pooled q·k with a top-k or
top-p budget per head (SpargeAttn, Sparse VideoGen, VMoBA), optional self-similarity guard. Shared machinery:
:mod:`~diffattn.methods.dynamic_common`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..context import AttentionContext
from ..layout import TokenLayout
from ..patterns.compile import KernelOrder
from ..patterns.dynamic import block_order, select_topk, select_topp, selection_block_mask
from .base import AttentionMethod
from .checks import check_compute_dtype, given
from .dynamic_common import (
    _ROLES,
    _check_call,
    _check_common,
    _per_head,
    _Plan,
    _rows,
    _scale,
    _score,
    _take,
    _tile_for,
    _validate_tile,
)
from .permutation import PermutationState, SemanticPermutation, head_kernel_order
from .sparse import block_attention, text_padding_per_batch

__all__ = ["DynamicSparseAttention"]


def _as_budget(value: float | tuple[float, ...] | None, owner: str, name: str) -> float | tuple[float, ...] | None:
    if value is None:
        return None
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"{owner}: {name} is a fraction in [0, 1] (or one per head), got {value!r}")
    return tuple(float(v) for v in values) if isinstance(value, (tuple, list)) else float(value)


@dataclass(frozen=True)
class DynamicSparseAttention(AttentionMethod):
    """Block-sparse attention whose key blocks are chosen per call, per head and per query block from mean-pooled
    q and k (SpargeAttn / Sparse VideoGen / VMoBA style), training-free.

    Blocks are tiles of the token grid (``tile``; ``"auto"``: ``VIDEO_TILE`` for videos, raster blocks of
    ``block_size`` for images; ``None``: raster blocks always). Each query block keeps its own block, then either
    - ``topk``: the most probable key blocks up to ``ceil(topk · n_blocks)`` in all, or
    - ``topp``: the fewest most-probable key blocks whose pooled probability reaches ``topp``.
    Both take one fraction or one per head. ``similarity_guard`` (SpargeAttn uses 0.6): a query block whose tokens
    disagree (mean pairwise cosine similarity below it) computes its whole row; such a key block its whole column.
    Text tokens of joint attention stay dense and outside the budget. ``topk=1`` / ``topp=1`` is dense attention;
    ``0`` keeps only each block's own block (block-diagonal attention). NaN / Inf propagate as dense attention with
    the selected mask would: to the queries that see them, never to the others (see
    :func:`~diffattn.methods.sparse.block_attention`). A block score they make non-finite ranks last (probability
    0), so a block holding a NaN key is never selected for that score.

    ``compute_dtype=torch.bfloat16`` computes the selection and attention on q, k, v cast to that dtype and returns
    the call's dtype (SageAttention's trade: bf16 GEMMs run natively with AMX / AVX512-BF16; on the embedded video
    model bf16 attention stays 61 dB from float32's output, ``scripts/bf16_attention.py``). Measure it against dense
    for your model before relying on it; ``None`` computes in the call's dtype.

    ``permute=SemanticPermutation(...)`` (Sparse VideoGen 2): the visual queries and keys of each head are clustered
    by k-means (centroids kept per layer and refreshed every few steps, see
    :class:`~diffattn.methods.permutation.SemanticPermutation`), queries sorted by query cluster and keys (with their
    values) by key cluster, per head; blocks of ``block_size`` positions of these orders are then selected and
    attended as above, and the output goes back to the sequence order. The cluster order replaces the tile (leave
    ``tile`` at ``"auto"`` or give ``None``; an explicit tile is refused), and since a query block's position says
    nothing about its keys in another order, each query block keeps its most probable key block instead of its own.
    Text tokens are not clustered: they stay after the visual part, dense. Exact at a full budget (softmax over keys
    does not depend on their order). Needs the step (``ctx.step``): run it in a pipeline or inside
    ``diffattn.denoising_step``. Besides ``selection_seconds`` (now with the clustering and the q / k gathers) and
    ``attention_seconds`` (the v gather, the kernel and the scatter back, as without it) it reports their parts
    ``clustering_seconds`` (k-means), ``permute_seconds`` (every per-head gather and the scatter) and
    ``kernel_seconds``, and ``centroids_refreshed`` (1 when the call ran k-means, 0 when it reused the centroids;
    ``handle.metrics()`` averages it to the share of refreshing calls). One instance keeps one set of centroids per
    layer and call; ``reset()`` forgets them.
    """

    topk: float | tuple[float, ...] | None = None
    topp: float | tuple[float, ...] | None = None
    block_size: int = 128
    tile: int | tuple[int, ...] | str | None = "auto"
    similarity_guard: float | None = None
    backend: str = "auto"
    roles: frozenset[str] = field(default=_ROLES)
    permute: SemanticPermutation | None = None
    compute_dtype: torch.dtype | None = None
    _permutation: PermutationState = field(default_factory=PermutationState, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "roles",
            _check_common(self.name, self.roles, self.backend, self.block_size, self.tile, self.similarity_guard),
        )
        if (self.topk is None) == (self.topp is None):
            raise ValueError(
                f"{self.name}: give exactly one budget, topk=<fraction of key blocks> or "
                "topp=<probability mass>, e.g. topk=0.1"
            )
        object.__setattr__(self, "topk", _as_budget(self.topk, self.name, "topk"))
        object.__setattr__(self, "topp", _as_budget(self.topp, self.name, "topp"))
        check_compute_dtype(self.name, self.compute_dtype)
        if self.permute is not None:
            if not isinstance(self.permute, SemanticPermutation):
                raise TypeError(
                    f"{self.name}: permute is None or a SemanticPermutation, got {given(self.permute)}; "
                    "e.g. permute=SemanticPermutation(clusters_q=32, clusters_k=64)"
                )
            if self.tile not in ("auto", None):
                raise ValueError(
                    f"{self.name}: with permute=SemanticPermutation(...) the blocks follow the cluster order, not "
                    f"the grid, so tile={self.tile!r} would be ignored; leave tile at 'auto' or give tile=None "
                    "(blocks of block_size positions), or drop permute= to keep the tiles"
                )

    def validate(self, ctx: AttentionContext) -> None:
        if self.permute is None:
            _validate_tile(self.name, self.tile, self.block_size, ctx)
        elif ctx.q_layout.grid and ctx.q_layout == ctx.kv_layout:
            self.permute.check_tokens(self.name, ctx.layer, ctx.q_layout.num_visual, self.block_size)

    def reset(self) -> None:
        """Forget the permutation's centroids (the next call of each layer clusters from scratch)."""
        self._permutation.reset()

    def release(self, application_id: int) -> None:
        self._permutation.release(application_id)

    def order_for(self, layout: TokenLayout, text_padding: int) -> KernelOrder:
        """The shared kernel order of a call (with ``permute``: raster blocks, permuted per head by the caller)."""
        tile = None if self.permute is not None else _tile_for(self.tile, layout.grid)
        return block_order(layout, tile, self.block_size, text_padding)

    def select(self, qk: Tensor, kk: Tensor, ko: KernelOrder, scale: float, budget: Tensor) -> Tensor:
        """The kept visual blocks ``(H, nvb, nvb)`` of one batch entry (q, k ``(H, L, D)`` in kernel order)."""
        probs, forced, _ = _score(qk, kk, ko, scale, self.similarity_guard, own_block=self.permute is None)
        budget = budget.to(probs.device)
        if self.topk is not None:
            return select_topk(probs, forced, budget)
        return select_topp(probs, forced, budget)

    def _entries(self, q: Tensor, k: Tensor, ctx: AttentionContext, times: dict[str, float] | None = None):
        """Per batch entry: its plan and its q and k in kernel order. With ``permute``, ``times`` (if given) gets the
        clustering and gather seconds."""
        _check_call(self.name, ctx)
        clusters = None
        if self.permute is not None:
            clusters = self._permutation.orders(self.permute, self.name, q, k, ctx, self.block_size, _scale(ctx, q))
            if times is not None:
                times["clustering_seconds"] += clusters.seconds
                times["centroids_refreshed"] = float(clusters.refreshed)
        paddings = text_padding_per_batch(ctx.attn_mask, ctx.q_layout, q.shape[0], ctx.layer)
        heads = q.shape[1]
        budget = _per_head(
            self.topk if self.topk is not None else self.topp,
            ctx,
            heads,
            self.name,
            "topk" if self.topk is not None else "topp",
        )
        scale = _scale(ctx, q)
        for b, (rows, pad) in enumerate(zip(_rows(q.shape[0]), paddings)):
            ko = self.order_for(ctx.q_layout, pad)
            if clusters is None:
                gather, scatter, k_gather = ko.gather.to(q.device), ko.scatter.to(q.device), None
                qk, kk = (x[rows].index_select(-2, gather) for x in (q, k))
            else:
                start = time.perf_counter()
                gather, scatter = head_kernel_order(ko, ctx.q_layout, clusters.q[b])
                k_gather, _ = head_kernel_order(ko, ctx.q_layout, clusters.k[b])
                qk, kk = _take(q[rows], gather), _take(k[rows], k_gather)
                if times is not None:
                    times["permute_seconds"] += time.perf_counter() - start
            scoring_k = kk[0]
            if scoring_k.shape[0] != heads:  # grouped-query attention: score every query head against its key head
                scoring_k = scoring_k.repeat_interleave(heads // scoring_k.shape[0], dim=0)
            selected = self.select(qk[0], scoring_k, ko, scale, budget)
            block_mask, density = selection_block_mask(ko, selected, q.device)
            yield _Plan(rows, gather, scatter, block_mask, density, k_gather), qk, kk

    def plans(self, q: Tensor, k: Tensor, ctx: AttentionContext) -> list[_Plan]:
        """One plan per batch entry: the selection placed on the kernel order as a ``BlockMask``."""
        return [plan for plan, _, _ in self._entries(q, k, ctx)]

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        if self.compute_dtype is None or self.compute_dtype == q.dtype:
            return self._attend(q, k, v, ctx)
        cast = (x.to(self.compute_dtype) for x in (q, k, v))
        return self._attend(*cast, ctx).to(q.dtype)  # (the scale comes from the head dim, not the dtype)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        out = torch.empty_like(q)
        scale = _scale(ctx, q)
        densities, select_s, attend_s = [], 0.0, 0.0
        times = {"clustering_seconds": 0.0, "permute_seconds": 0.0, "kernel_seconds": 0.0}
        start = time.perf_counter()
        for plan, qk, kk in self._entries(q, k, ctx, times):
            selected = time.perf_counter()
            vk = plan.keys(v)
            gathered = time.perf_counter()
            o = block_attention(qk, kk, vk, plan.block_mask, scale=scale, backend=self.backend)
            attended = time.perf_counter()
            out[plan.rows] = plan.output(o)
            densities.append(plan.density)
            done = time.perf_counter()
            select_s, attend_s, start = select_s + selected - start, attend_s + done - selected, done
            times["permute_seconds"] += (gathered - selected) + (done - attended)
            times["kernel_seconds"] += attended - gathered
        extra = times if self.permute is not None else {}
        ctx.report(
            density=sum(densities) / len(densities), selection_seconds=select_s, attention_seconds=attend_s, **extra
        )
        return out
