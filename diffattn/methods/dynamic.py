"""Dynamic sparse attention: methods that look at q and k before deciding what to compute.

- :class:`DynamicSparseAttention` — block selection from pooled q·k with a top-k or top-p budget per head
  (SpargeAttn, Sparse VideoGen, VMoBA), optional self-similarity guard.
- :class:`PyramidSparseAttention` — PSA: instead of dropping a key block, attend to a 2x / 4x / 8x pooled copy of
  it according to its score band.
- :class:`Rettention` — Re-ttention: sparse attention whose softmax mass and missing part are calibrated against
  dense attention every few steps and corrected in between.
- :class:`TokenDownsampling` — ToDo: full-resolution queries attend to keys and values pooled over the grid.

All of them use the static patterns' machinery: kernel order ``[visual (tile order) | text]``, text rows and columns
dense, a per-head ``BlockMask`` built from a block relation, the ``torch`` block-sparse kernel. Each call reports
``density`` (fraction of query-key pairs computed), ``selection_seconds`` (pooling, scoring, choosing, building the
mask) and ``attention_seconds`` (the kernels) through ``ctx.report``; ``handle.metrics()`` averages them per layer.

Batch entries are selected separately (one loop iteration per entry): conditional and unconditional halves of a
CFG batch attend differently, and a selection pooled across the batch would be the wrong one for both. The kernel
takes one mask per call, so this costs nothing extra in attention; selection cost is per entry.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

import diffattn_kernels as kernels

from ..context import AttentionContext
from ..errors import LayoutError, MethodConfigError, NonFiniteInputError
from ..layout import TokenLayout
from ..patterns.compile import KernelOrder, relation_block_mask
from ..patterns.dynamic import (
    POOL_MODES,
    PYRAMID_LEVELS,
    block_order,
    block_probabilities,
    block_self_similarity,
    forced_blocks,
    pool_blocks,
    pool_grid,
    pyramid_levels,
    select_topk,
    select_topp,
    selection_block_mask,
)
from .base import SELF_AND_JOINT, AttentionMethod, check_roles
from .sparse import SparseAttention, _grid_words, block_attention, config_error, text_padding_per_batch

__all__ = [
    "DynamicSparseAttention",
    "PyramidSparseAttention",
    "Rettention",
    "TokenDownsampling",
    "VIDEO_TILE",
    "PSA_BANDS",
]

_ROLES = SELF_AND_JOINT
#: Tile of the kernel order (and block) for video grids when ``tile="auto"``: 4 frames x 4 x 8 tokens = 128.
VIDEO_TILE: tuple[int, int, int] = (4, 4, 8)
#: PSA's Wan-14B preset: cumulative fractions of key blocks at 1x, 2x, 4x, 8x pooling; the rest is skipped.
PSA_BANDS: tuple[float, float, float, float] = (0.4, 0.5, 0.6, 0.8)


# ----------------------------------------------------------------------------------------------------------------
# shared pieces


def _check_common(
    owner: str, roles: frozenset[str], backend: str, block_size: int, tile: Any, guard: float | None
) -> frozenset[str]:
    roles = check_roles(roles, owner, _ROLES)
    if backend != "auto" and backend not in kernels.BACKENDS:
        raise ValueError(f"{owner}: unknown backend {backend!r}; choose from {['auto', *kernels.BACKENDS]}")
    if block_size < 1:
        raise ValueError(f"{owner}: block_size must be positive, got {block_size}")
    if not (
        tile is None
        or tile == "auto"
        or isinstance(tile, int)
        and tile >= 1
        or isinstance(tile, tuple)
        and tile
        and all(isinstance(t, int) and t >= 1 for t in tile)
    ):
        raise ValueError(
            f"{owner}: tile must be 'auto', None (raster blocks), a positive int or a tuple of them, got {tile!r}"
        )
    if guard is not None and not -1.0 <= guard <= 1.0:
        raise ValueError(f"{owner}: a similarity threshold is a cosine similarity in [-1, 1], got {guard}")
    return roles


def _as_budget(value: float | tuple[float, ...] | None, owner: str, name: str) -> float | tuple[float, ...] | None:
    if value is None:
        return None
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"{owner}: {name} is a fraction in [0, 1] (or one per head), got {value!r}")
    return tuple(float(v) for v in values) if isinstance(value, (tuple, list)) else float(value)


def _per_head(value: Any, ctx: AttentionContext, heads: int, owner: str, name: str) -> Tensor:
    """A per-head parameter as a tensor over this call's heads (sliced under Ulysses context parallelism)."""
    t = torch.as_tensor(value, dtype=torch.float64)
    scalar_dims = 1 if name == "bands" else 0
    if t.ndim == scalar_dims:
        return t.expand(heads, *t.shape)
    total = ctx.total_heads if ctx.total_heads is not None else heads
    if t.shape[0] != total:
        raise LayoutError(
            f"{owner} on {ctx.layer}: {name} gives {t.shape[0]} heads but the layer has {total}; give "
            "one value per head or a single one"
        )
    return t[ctx.head_offset : ctx.head_offset + heads]


def _tile_for(tile: Any, grid: tuple[int, ...]) -> tuple[int, ...] | None:
    if tile == "auto":
        return VIDEO_TILE if len(grid) == 3 else None
    if isinstance(tile, int):
        return (tile,) * len(grid)
    return tile


def _validate_tile(owner: str, tile: Any, block_size: int, ctx: AttentionContext) -> None:
    """Build this layout's block order now (cached: the call reuses it), so a tile that does not fit the grid fails
    before any attention, naming the layer and the grid."""
    layout = ctx.q_layout
    if not layout.grid or layout != ctx.kv_layout:
        return  # the call refuses these itself (LayoutError)
    try:
        block_order(layout, _tile_for(tile, layout.grid), block_size, 0)
    except ValueError as e:
        kind, axes = _grid_words(layout.grid)
        example = tuple(
            min(t, n) for t, n in zip(VIDEO_TILE if len(layout.grid) == 3 else (8,) * len(layout.grid), layout.grid)
        )
        raise config_error(
            owner,
            ctx,
            str(e),
            f"use a {len(layout.grid)}-value tile {axes} on this {kind} grid, "
            f"e.g. tile={example}, or tile='auto' ({VIDEO_TILE} on videos, raster blocks of "
            "block_size on images)",
        ) from e


def _check_call(owner: str, ctx: AttentionContext) -> None:
    if ctx.q_layout != ctx.kv_layout or ctx.q_range is not None:
        raise LayoutError(f"{owner} needs queries and keys over the same tokens ({ctx.layer} is {ctx.role})")
    if not ctx.q_layout.grid:
        raise LayoutError(f"{owner} needs visual tokens; {ctx.layer} has text tokens only")


def _scale(ctx: AttentionContext, q: Tensor) -> float:
    return ctx.scale if ctx.scale is not None else 1.0 / math.sqrt(q.shape[-1])


def _rows(batch: int) -> list[slice]:
    return [slice(b, b + 1) for b in range(batch)]


@dataclass(frozen=True, eq=False)
class _Plan:
    """One group of batch entries in kernel order: its gather/scatter and block mask."""

    rows: slice | list[int]
    gather: Tensor
    scatter: Tensor
    block_mask: BlockMask
    density: float


def _run_plans(
    q: Tensor, k: Tensor, v: Tensor, plans: list[_Plan], scale: float, backend: str, need_lse: bool
) -> tuple[Tensor, Tensor | None]:
    """Attention of every plan's batch rows, back in sequence order: ``(out, lse)`` (lse float32 or None)."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device) if need_lse else None
    for plan in plans:
        qk, kk, vk = (x[plan.rows].index_select(-2, plan.gather) for x in (q, k, v))
        o, l = kernels.attention(qk, kk, vk, plan.block_mask, scale=scale, backend=backend, return_lse=need_lse)
        out[plan.rows] = o.index_select(-2, plan.scatter)
        if need_lse:
            lse[plan.rows] = l.index_select(-1, plan.scatter)
    return out, lse


def _score(
    qk: Tensor, kk: Tensor, ko: KernelOrder, scale: float, guard: float | None, k_similarity: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Pooled block probabilities ``(H, nvb, nvb)``, forced blocks and (if asked) the key blocks' self-similarity,
    from one batch entry's q and k ``(H, L, D)`` in kernel order. Only visual positions are pooled."""
    n_vis, block = ko.num_visual, ko.block_size
    valid = ko.valid[:n_vis]
    q_vis, k_vis = qk[:, :n_vis], kk[:, :n_vis]
    q_means, _ = pool_blocks(q_vis, valid, block)
    k_means, k_counts = pool_blocks(k_vis, valid, block)
    probs = block_probabilities(q_means, k_means, k_counts, scale)
    q_sim = block_self_similarity(q_vis, valid, block) if guard is not None else None
    k_sim = block_self_similarity(k_vis, valid, block) if guard is not None or k_similarity else None
    nvb = probs.shape[-1]
    forced = forced_blocks(nvb, nvb, q_similarity=q_sim, k_similarity=k_sim, threshold=guard, device=probs.device)
    return probs, forced.expand_as(probs), k_sim


# ----------------------------------------------------------------------------------------------------------------
# block selection


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
    :func:`~diffattn.methods.sparse.block_attention`).
    """

    topk: float | tuple[float, ...] | None = None
    topp: float | tuple[float, ...] | None = None
    block_size: int = 128
    tile: int | tuple[int, ...] | str | None = "auto"
    similarity_guard: float | None = None
    backend: str = "auto"
    roles: frozenset[str] = field(default=_ROLES)

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

    def validate(self, ctx: AttentionContext) -> None:
        _validate_tile(self.name, self.tile, self.block_size, ctx)

    def order_for(self, layout: TokenLayout, text_padding: int) -> KernelOrder:
        return block_order(layout, _tile_for(self.tile, layout.grid), self.block_size, text_padding)

    def select(self, qk: Tensor, kk: Tensor, ko: KernelOrder, scale: float, budget: Tensor) -> Tensor:
        """The kept visual blocks ``(H, nvb, nvb)`` of one batch entry (q, k ``(H, L, D)`` in kernel order)."""
        probs, forced, _ = _score(qk, kk, ko, scale, self.similarity_guard)
        budget = budget.to(probs.device)
        if self.topk is not None:
            return select_topk(probs, forced, budget)
        return select_topp(probs, forced, budget)

    def _entries(self, q: Tensor, k: Tensor, ctx: AttentionContext):
        """Per batch entry: its plan and its q and k in kernel order."""
        _check_call(self.name, ctx)
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
        for rows, pad in zip(_rows(q.shape[0]), paddings):
            ko = self.order_for(ctx.q_layout, pad)
            gather = ko.gather.to(q.device)
            qk, kk = (x[rows].index_select(-2, gather) for x in (q, k))
            scoring_k = kk[0]
            if scoring_k.shape[0] != heads:  # grouped-query attention: score every query head against its key head
                scoring_k = scoring_k.repeat_interleave(heads // scoring_k.shape[0], dim=0)
            selected = self.select(qk[0], scoring_k, ko, scale, budget)
            block_mask, density = selection_block_mask(ko, selected, q.device)
            yield _Plan(rows, gather, ko.scatter.to(q.device), block_mask, density), qk, kk

    def plans(self, q: Tensor, k: Tensor, ctx: AttentionContext) -> list[_Plan]:
        """One plan per batch entry: the selection placed on the kernel order as a ``BlockMask``."""
        return [plan for plan, _, _ in self._entries(q, k, ctx)]

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        out = torch.empty_like(q)
        scale = _scale(ctx, q)
        densities, select_s, attend_s = [], 0.0, 0.0
        start = time.perf_counter()
        for plan, qk, kk in self._entries(q, k, ctx):
            selected = time.perf_counter()
            vk = v[plan.rows].index_select(-2, plan.gather)
            o = block_attention(qk, kk, vk, plan.block_mask, scale=scale, backend=self.backend)
            out[plan.rows] = o.index_select(-2, plan.scatter)
            densities.append(plan.density)
            done = time.perf_counter()
            select_s, attend_s, start = select_s + selected - start, attend_s + done - selected, done
        ctx.report(density=sum(densities) / len(densities), selection_seconds=select_s, attention_seconds=attend_s)
        return out


# ----------------------------------------------------------------------------------------------------------------
# pyramid pooling (PSA)


def _pool_sequence(x: Tensor, length: int, factor: int) -> Tensor:
    """Mean of runs of ``factor`` consecutive positions of ``x[..., :length, :]`` (zero-padded to ``length``)."""
    x = x[..., :length, :]
    if x.shape[-2] < length:
        x = torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[-2]))
    return x.reshape(*x.shape[:-2], length // factor, factor, x.shape[-1]).mean(-2)


def _merge_lse(parts: list[tuple[Tensor, Tensor]], dtype: torch.dtype) -> Tensor:
    """Outputs over disjoint key sets merged by their log-sum-exp (rows empty everywhere stay 0)."""
    lses = torch.stack([l for _, l in parts])
    total = torch.logsumexp(lses, dim=0)
    total = torch.where(torch.isneginf(total), 0.0, total)
    out = torch.zeros(parts[0][0].shape, dtype=torch.float32, device=parts[0][0].device)
    for o, l in parts:  # in place: one full-size temporary per part instead of three
        out.addcmul_(torch.exp(l - total).unsqueeze(-1), o if o.dtype == torch.float32 else o.float())
    return out.to(dtype)


@dataclass(frozen=True)
class PyramidSparseAttention(AttentionMethod):
    """Pyramid sparse attention (PSA): each (query block, key block) pair is computed at full resolution, against
    the key block pooled 2x, 4x or 8x (runs of consecutive tokens in tile order averaged, for keys and values), or
    skipped, by the key block's rank in the query block's pooled scores.

    ``bands`` are cumulative fractions of key blocks per level ``(1x, 2x, 4x, 8x)``; the rest is skipped (PSA's
    Wan preset ``PSA_BANDS`` = 40 % / 10 % / 10 % / 20 %, 20 % skipped); one tuple, or one per head. A pooled key
    stands for ``L`` tokens: its logit gets ``+log L``, so a block of identical tokens is attended exactly.
    Own blocks, blocks with grid padding or text, and key blocks whose tokens disagree (self-similarity below
    ``pool_similarity``) are never pooled. ``bands=(1, 1, 1, 1)`` is dense attention, ``(0, 0, 0, 0)``
    block-diagonal. Tiles and guard as :class:`DynamicSparseAttention`.
    """

    bands: tuple[float, ...] | tuple[tuple[float, ...], ...] = PSA_BANDS
    block_size: int = 128
    tile: int | tuple[int, ...] | str | None = "auto"
    pool_similarity: float | None = None
    similarity_guard: float | None = None
    backend: str = "auto"
    roles: frozenset[str] = field(default=_ROLES)

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "roles",
            _check_common(self.name, self.roles, self.backend, self.block_size, self.tile, self.similarity_guard),
        )
        if self.pool_similarity is not None and not -1.0 <= self.pool_similarity <= 1.0:
            raise ValueError(
                f"{self.name}: pool_similarity is a cosine similarity in [-1, 1], got {self.pool_similarity}"
            )
        per_head = bool(self.bands) and isinstance(self.bands[0], (tuple, list))
        rows = [tuple(r) for r in self.bands] if per_head else [tuple(self.bands)]
        for row in rows:
            ok = len(row) == len(PYRAMID_LEVELS) and all(
                isinstance(e, (int, float)) and not isinstance(e, bool) and 0.0 <= e <= 1.0 for e in row
            )
            if not ok or any(a > b for a, b in zip(row, row[1:])):
                raise ValueError(
                    f"{self.name}: bands are {len(PYRAMID_LEVELS)} non-decreasing fractions in [0, 1] "
                    f"(cumulative, for pooling {PYRAMID_LEVELS}), or one such tuple per head; got "
                    f"{self.bands!r}"
                )
        rows = [tuple(float(e) for e in r) for r in rows]
        object.__setattr__(self, "bands", tuple(rows) if per_head else rows[0])

    def validate(self, ctx: AttentionContext) -> None:
        _validate_tile(self.name, self.tile, self.block_size, ctx)

    def levels(self, qk: Tensor, kk: Tensor, ko: KernelOrder, scale: float, bands: Tensor) -> Tensor:
        """Pooling level (0 = skip, 1, 2, 4, 8) of every visual block pair ``(H, nvb, nvb)`` of one batch entry."""
        probs, forced, k_sim = _score(
            qk, kk, ko, scale, self.similarity_guard, k_similarity=self.pool_similarity is not None
        )
        nvb = probs.shape[-1]
        clean = ~(ko.has_pad | ko.has_text)[:nvb].to(probs.device)
        poolable = (~ko.has_text[:nvb].to(probs.device)).view(-1, 1) & clean.view(1, -1)
        if self.pool_similarity is not None:
            poolable = poolable & (k_sim >= self.pool_similarity).unsqueeze(-2)
        levels = pyramid_levels(probs, forced, bands.to(probs.device), poolable)
        for level in PYRAMID_LEVELS[1:]:  # blocks of a size the level does not divide use the next finer level
            if ko.block_size % level:
                finer = max(l for l in PYRAMID_LEVELS if l < level and ko.block_size % l == 0)
                levels = torch.where(levels == level, finer, levels)
        return levels

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        _check_call(self.name, ctx)
        paddings = text_padding_per_batch(ctx.attn_mask, ctx.q_layout, q.shape[0], ctx.layer)
        heads = q.shape[1]
        bands = _per_head(self.bands, ctx, heads, self.name, "bands")
        scale = _scale(ctx, q)
        if k.shape[1] != heads:
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
        out = torch.empty_like(q)
        densities, select_s, attend_s = [], 0.0, 0.0
        for rows, pad in zip(_rows(q.shape[0]), paddings):
            start = time.perf_counter()
            ko = block_order(ctx.q_layout, _tile_for(self.tile, ctx.q_layout.grid), self.block_size, pad)
            gather = ko.gather.to(q.device)
            qk, kk, vk = (x[rows].index_select(-2, gather) for x in (q, k, v))
            levels = self.levels(qk[0], kk[0], ko, scale, bands)
            block, nvb = ko.block_size, levels.shape[-1]
            masks = {1: selection_block_mask(ko, levels == 1, q.device)[0]}
            for level in PYRAMID_LEVELS[1:]:
                chosen = levels == level
                if bool(chosen.any()):
                    relation = torch.zeros(heads, ko.num_blocks, nvb, dtype=torch.bool)
                    relation[:, :nvb] = chosen.cpu()
                    masks[level] = relation_block_mask(
                        relation, relation, (block, block // level), (ko.length, nvb * block // level), _everything
                    )
            densities.append(_pyramid_density(levels, ko))
            mid = time.perf_counter()
            parts = []
            for level, mask in masks.items():
                if level == 1:
                    o, l = kernels.attention(qk, kk, vk, mask, scale=scale, backend=self.backend)
                else:
                    kl, vl = (_pool_sequence(x, nvb * block, level) for x in (kk, vk))
                    o, l = kernels.attention(qk, kl, vl, mask, scale=scale, backend=self.backend)
                    l = l + math.log(level)
                parts.append((o, l))
            out[rows] = _merge_lse(parts, q.dtype).index_select(-2, ko.scatter.to(q.device))
            select_s += mid - start
            attend_s += time.perf_counter() - mid
        ctx.report(density=sum(densities) / len(densities), selection_seconds=select_s, attention_seconds=attend_s)
        return _finite_or_report(out, q, k, v, ctx, self.name)


def _finite_or_report(out: Tensor, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext, owner: str) -> Tensor:
    """PSA and Re-ttention report non-finite inputs instead of propagating them: a NaN / Inf pooled into a key
    block (PSA) or cached in a residual (Re-ttention) would spread to queries that never saw that token. The check
    costs one sum of the output when everything is finite."""
    if bool(torch.isfinite(out.float().sum())):
        return out
    bad = [name for name, x in (("q", q), ("k", k), ("v", v)) if not bool(torch.isfinite(x).all())]
    if not bad:
        return out  # the output overflowed on its own (as dense attention would)
    raise NonFiniteInputError(
        f"{owner} on {ctx.layer} (step {ctx.step}): {', '.join(bad)} contain NaN or Inf. {owner} reports this "
        "instead of propagating it (pooled keys and cached residuals would spread it to queries that never saw the "
        "token); find where the model produces it, or use a static sparse method, which propagates NaN as dense "
        "attention restricted to its mask does."
    )


def _everything(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return torch.ones((), dtype=torch.bool, device=q_idx.device)


def _pyramid_density(levels: Tensor, ko: KernelOrder) -> float:
    """Computed (query, key) pairs over real pairs: text rows/columns dense, a pooled block costs 1/level."""
    block, length = ko.block_size, ko.length
    per_block = torch.zeros(ko.num_blocks).index_add_(0, torch.arange(length) // block, ko.valid.float())
    nvb = levels.shape[-1]
    cost = torch.where(levels > 0, 1.0 / levels.clamp(min=1).float(), 0.0).cpu()  # (H, nvb, nvb)
    work = torch.zeros(levels.shape[0], ko.num_blocks, ko.num_blocks)
    work[:, :nvb, :nvb] = cost
    text = ko.has_text
    work[:, text, :] = 1.0
    work[:, :, text] = 1.0
    pairs = (per_block.view(1, -1, 1) * work * per_block.view(1, 1, -1)).sum((-1, -2)).mean()
    real = float(ko.valid.sum())
    return float(pairs) / max(real * real, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Re-ttention


_MAX_CALLS_PER_STEP = 8


@dataclass
class _Calibration:
    plans: list[_Plan]
    ratio: Tensor  # (B, H, S) float32: sparse softmax mass / dense softmax mass, per query
    residual: Tensor  # (B, H, S, Dv) float32: dense output - ratio * sparse output
    calibrated_step: int
    last_step: int
    timestep: float | None


@dataclass(frozen=True)
class Rettention(AttentionMethod):
    """Re-ttention: sparse attention with its softmax renormalised to the dense one.

    At a calibration step it computes dense and sparse (``base``) attention together and caches, per query and
    head, the ratio ``r`` of the sparse softmax mass to the dense one (``exp(lse_sparse - lse_dense)``) and the
    residual ``R = dense - r · sparse`` (the part the sparse keys miss); it returns the dense output. At the
    following steps it computes only the sparse attention, with the same block mask, and returns
    ``r · sparse + R``: the sparse softmax rescaled to the dense denominator plus the cached rest. It recalibrates
    every ``calibrate_every`` steps, at step 0 and whenever a new generation starts (the step goes back or the
    timestep up). ``ratio_drift`` adds to ``r`` per step since calibration (the original uses 0.04 on CogVideoX),
    never beyond 1.

    ``base``: a static sparse method (``SlidingTileAttention``, ``SlidingWindowAttention``, ...) or
    :class:`DynamicSparseAttention`, whose selection is then made at calibration and kept until the next one (no
    selection cost in between). Use ``diffattn.apply(..., steps=...)`` for the dense warm-up (the original: 5 steps).

    State: the cache lives on this instance, one entry per (layer, batch roles or size, shape, heads slice, call
    order within the step): a residual as large as the layer's attention output. Use one instance per pipeline and
    one per denoiser (Wan 2.2's two transformers share layer names).
    """

    base: AttentionMethod = field(default_factory=lambda: DynamicSparseAttention(topk=0.1))
    calibrate_every: int = 5
    ratio_drift: float = 0.0
    roles: frozenset[str] = field(default=_ROLES)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _calls: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "roles", check_roles(self.roles, self.name, _ROLES))
        if not isinstance(self.base, (SparseAttention, DynamicSparseAttention)):
            raise TypeError(
                f"{self.name}: base must be a static sparse method (e.g. SlidingTileAttention) or "
                f"DynamicSparseAttention, got {type(self.base).__name__}"
            )
        if not isinstance(self.calibrate_every, int) or self.calibrate_every < 1:
            raise ValueError(f"{self.name}: calibrate_every is a positive number of steps, got {self.calibrate_every}")
        if self.ratio_drift < 0:
            raise ValueError(f"{self.name}: ratio_drift must be >= 0, got {self.ratio_drift}")

    def validate(self, ctx: AttentionContext) -> None:
        self.base.validate(ctx)

    def reset(self) -> None:
        """Forget every calibration (the next call of each layer calibrates)."""
        self._cache.clear()
        self._calls.clear()

    def _key(self, q: Tensor, v: Tensor, ctx: AttentionContext) -> tuple:
        who = (
            ctx.layer,
            ctx.batch_roles if ctx.batch_roles is not None else q.shape[0],
            tuple(q.shape),
            tuple(v.shape),
            ctx.head_offset,
        )
        step, count = self._calls.get(who, (None, -1))
        # the n-th call of this shape in a step (e.g. separate cond / uncond forwards); wrapped, so that repeated
        # one-step generations (indistinguishable from more calls in one step) reuse entries instead of piling up
        count = (count + 1) % _MAX_CALLS_PER_STEP if step == ctx.step else 0
        self._calls[who] = (ctx.step, count)
        return (*who, count)

    def _base_plans(self, q: Tensor, k: Tensor, ctx: AttentionContext) -> list[_Plan]:
        if isinstance(self.base, DynamicSparseAttention):
            return self.base.plans(q, k, ctx)
        base = self.base
        _check_call(self.name, ctx)
        paddings = text_padding_per_batch(ctx.attn_mask, ctx.q_layout, q.shape[0], ctx.layer)
        pattern = base.pattern_for_heads(ctx, q.shape[1])
        plans = []
        for pad in sorted(set(paddings)):
            rows = [b for b, p in enumerate(paddings) if p == pad]
            sel = slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else rows
            c = base.compiled(ctx, pad, q.device, pattern)
            plans.append(_Plan(sel, c.gather, c.scatter, c.block_mask, c.density))
        return plans

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        if ctx.step is None:
            raise MethodConfigError(
                f"{self.name} on {ctx.layer}: calibration follows the denoising steps, but this call's step is unknown "
                "(the model was not called from a diffusers pipeline). Wrap each call in "
                "diffattn.denoising_step(i, num_steps)."
            )
        key = self._key(q, v, ctx)
        state = self._cache.get(key)
        new_generation = state is not None and (
            ctx.step < state.last_step
            or (ctx.timestep is not None and state.timestep is not None and ctx.timestep > state.timestep)
        )
        calibrate = (
            state is None or new_generation or ctx.step == 0 or ctx.step - state.calibrated_step >= self.calibrate_every
        )
        scale = _scale(ctx, q)
        backend = getattr(self.base, "backend", "auto")
        start = time.perf_counter()
        if calibrate:
            plans = self._base_plans(q, k, ctx)
            selected = time.perf_counter()
            sparse, lse_sparse = _run_plans(q, k, v, plans, scale, backend, need_lse=True)
            dense, lse_dense = kernels.dense_attention(q, k, v, attn_mask=ctx.attn_mask, scale=scale)
            ratio = torch.exp(lse_sparse - lse_dense).clamp(max=1.0).nan_to_num(1.0)
            residual = dense.float() - ratio.unsqueeze(-1) * sparse.float()
            self._cache[key] = _Calibration(plans, ratio, residual, ctx.step, ctx.step, ctx.timestep)
            density = 1.0 + sum(p.density for p in plans) / len(plans)
            ctx.report(
                density=density,
                selection_seconds=selected - start,
                attention_seconds=time.perf_counter() - selected,
                calibration=1.0,
            )
            return _finite_or_report(dense, q, k, v, ctx, self.name)
        sparse, _ = _run_plans(q, k, v, state.plans, scale, backend, need_lse=False)
        ratio = state.ratio
        if self.ratio_drift:
            ratio = (ratio + self.ratio_drift * (ctx.step - state.calibrated_step)).clamp(max=1.0)
        state.last_step, state.timestep = ctx.step, ctx.timestep
        out = (ratio.unsqueeze(-1) * sparse.float() + state.residual).to(q.dtype)
        ctx.report(
            density=sum(p.density for p in state.plans) / len(state.plans),
            selection_seconds=0.0,
            attention_seconds=time.perf_counter() - start,
            calibration=0.0,
        )
        return _finite_or_report(out, q, k, v, ctx, self.name)


# ----------------------------------------------------------------------------------------------------------------
# ToDo


@dataclass(frozen=True)
class TokenDownsampling(AttentionMethod):
    """ToDo (token downsampling): queries at full resolution attend to keys and values downsampled by ``factor``
    on the token grid (each frame of a video separately). Cheap and training-free; meant for UNets at high
    resolution.

    As the original, the factor depends on the resolution level of the call: ``factor`` at the model's highest
    resolution, ``factor_level_2`` at half of it (default 1: untouched), none below; so SDXL, whose top level has no
    attention, is untouched with the defaults. Downsampling stops once ``t / 1000 <= timestep_threshold_stop``
    (``t`` the model's timestep on the 0..1000 scale; 0 = never stops). ``mode`` (see
    :func:`~diffattn.patterns.dynamic.pool_grid`): ``"nearest-exact"`` (default, the authors' library default:
    ``F.interpolate`` to ``floor(h / factor) x floor(w / factor)``) or ``"nearest"`` (the authors' demo app);
    diffattn's ``"avg"`` / ``"max"`` (its earlier default: the mean / max of each ``factor x factor`` cell, ``ceil``
    sizes with smaller border cells) or ``"top-left"`` (each cell's first token). Text tokens of joint attention
    are kept. Where the factor is 1 the stock attention runs unchanged (bitwise).
    """

    factor: int = 2
    factor_level_2: int = 1
    mode: str = "nearest-exact"
    timestep_threshold_stop: float = 0.0
    roles: frozenset[str] = field(default=_ROLES)

    def __post_init__(self) -> None:
        object.__setattr__(self, "roles", check_roles(self.roles, self.name, _ROLES))
        for name in ("factor", "factor_level_2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: {name} is a positive int (1 = no downsampling), got {value!r}")
        if self.mode not in POOL_MODES:
            raise ValueError(
                f"{self.name}: mode is one of {POOL_MODES} (default 'nearest-exact', the authors'), got {self.mode!r}"
            )
        if not 0.0 <= self.timestep_threshold_stop <= 1.0:
            raise ValueError(
                f"{self.name}: timestep_threshold_stop is t/1000 in [0, 1], got {self.timestep_threshold_stop}"
            )

    def level(self, ctx: AttentionContext) -> int:
        """1 at the model's highest resolution, 2 at half of it, and so on (from the call's and input's grids)."""
        grid, base = ctx.q_layout.grid, ctx.input_grid
        if not base or len(base) != len(grid):
            return 1
        ratio = math.prod(base) / max(math.prod(grid), 1)
        return 1 + max(0, round(math.log2(max(ratio, 1.0)) / len(grid)))

    def validate(self, ctx: AttentionContext) -> None:
        """Refuse a factor that pools every frame of this layer into one key token (its cells cover the frame), or,
        with the interpolating modes (``floor`` sizes), into none on its shorter side."""
        grid, level = ctx.kv_layout.grid, self.level(ctx)
        factor = {1: self.factor, 2: self.factor_level_2}.get(level, 1)
        if factor <= 1 or len(grid) < 2:
            return
        name = "factor" if level == 1 else "factor_level_2"
        if factor >= max(grid[-2:]):
            raise config_error(
                self.name,
                ctx,
                f"{name}={factor} pools each {grid[-2]}x{grid[-1]} frame into a single key token",
                f"use {name} < {max(grid[-2:])} (ToDo uses 2 to 4 at high resolution) or apply it to "
                "higher-resolution layers (layers=...)",
            )
        if self.mode in ("nearest-exact", "nearest") and factor > min(grid[-2:]):
            raise config_error(
                self.name,
                ctx,
                f"{name}={factor} with mode={self.mode!r} keeps floor({min(grid[-2:])} / {factor}) = 0 "
                f"rows or columns of each {grid[-2]}x{grid[-1]} frame",
                f"use {name} <= {min(grid[-2:])}, mode='avg' (ceil sizes), or apply it to higher-resolution layers "
                "(layers=...)",
            )

    def factor_for(self, ctx: AttentionContext) -> int:
        if ctx.timestep is not None and ctx.timestep / 1000.0 <= self.timestep_threshold_stop:
            return 1
        return {1: self.factor, 2: self.factor_level_2}.get(self.level(ctx), 1)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        _check_call(self.name, ctx)
        factor = self.factor_for(ctx)
        grid = ctx.kv_layout.grid
        if factor == 1 or len(grid) < 2:
            ctx.report(density=1.0, selection_seconds=0.0)
            return ctx.dense(q, k, v)
        start = time.perf_counter()
        layout = ctx.kv_layout
        mask = None
        if ctx.attn_mask is not None:  # only key padding of trailing text tokens (else refused)
            paddings = text_padding_per_batch(ctx.attn_mask, layout, q.shape[0], ctx.layer)
        pooled = [pool_grid(x[:, :, layout.visual_slice], grid, factor, self.mode)[0] for x in (k, v)]
        m_vis = pooled[0].shape[-2]
        if layout.text_len:
            text = [x[:, :, layout.text_slice] for x in (k, v)]
            parts = [(t, p) if layout.text_first else (p, t) for p, t in zip(pooled, text)]
            pooled = [torch.cat(pair, dim=-2) for pair in parts]
            if ctx.attn_mask is not None:
                keep = torch.ones(q.shape[0], m_vis + layout.text_len, dtype=torch.bool, device=q.device)
                text0 = 0 if layout.text_first else m_vis
                for b, pad in enumerate(paddings):
                    if pad:
                        keep[b, text0 + layout.text_len - pad : text0 + layout.text_len] = False
                mask = keep.view(q.shape[0], 1, 1, -1)
        kp, vp = pooled
        selected = time.perf_counter()
        out = torch.nn.functional.scaled_dot_product_attention(
            q, kp, vp, attn_mask=mask, scale=ctx.scale, enable_gqa=ctx.enable_gqa
        )
        ctx.report(
            density=kp.shape[-2] / k.shape[-2],
            selection_seconds=selected - start,
            attention_seconds=time.perf_counter() - selected,
        )
        return out
