"""What the dynamic sparse methods share (:mod:`~diffattn.methods.dynamic_sparse`, :mod:`~diffattn.methods.pyramid`,
:mod:`~diffattn.methods.rettention`, :mod:`~diffattn.methods.downsampling`): parameter checks, the tile of the kernel
order, the per-batch-entry plan, pooled block scores and the non-finite input report.

They use the static patterns' machinery: kernel order ``[visual (tile order) | text]``, text rows and columns
dense, a per-head ``BlockMask`` built from a block relation, the ``torch`` block-sparse kernel. Each call reports
``density`` (fraction of query-key pairs computed), ``selection_seconds`` (pooling, scoring, choosing, building the
mask) and ``attention_seconds`` (the kernels) through ``ctx.report``; ``handle.metrics()`` averages them per layer.

Batch entries are selected separately (one loop iteration per entry): conditional and unconditional halves of a
CFG batch attend differently, and a selection pooled across the batch would be the wrong one for both. The kernel
takes one mask per call, so this costs nothing extra in attention; selection cost is per entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

import diffattn_kernels as kernels

from ..context import AttentionContext
from ..errors import LayoutError, NonFiniteInputError
from ..patterns.compile import KernelOrder
from ..patterns.dynamic import block_order, block_probabilities, block_self_similarity, forced_blocks, pool_blocks
from .base import SELF_AND_JOINT
from .checks import check_block_size, check_number, check_roles_arg, given
from .sparse import _grid_words, config_error

__all__ = ["VIDEO_TILE"]


_ROLES = SELF_AND_JOINT


#: Tile of the kernel order (and block) for video grids when ``tile="auto"``: 4 frames x 4 x 8 tokens = 128.
VIDEO_TILE: tuple[int, int, int] = (4, 4, 8)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_common(
    owner: str, roles: frozenset[str], backend: str, block_size: int, tile: Any, guard: float | None
) -> frozenset[str]:
    roles = check_roles_arg(roles, owner, _ROLES)
    if not isinstance(backend, str) or (backend != "auto" and backend not in kernels.BACKENDS):
        raise ValueError(f"{owner}: unknown backend {given(backend)}; choose from {['auto', *kernels.BACKENDS]}")
    check_block_size(owner, block_size)
    if not (
        tile is None
        or isinstance(tile, str)
        and tile == "auto"
        or _positive_int(tile)
        or isinstance(tile, tuple)
        and tile
        and all(_positive_int(t) for t in tile)
    ):
        raise ValueError(
            f"{owner}: tile must be 'auto', None (raster blocks), a positive int or a tuple of them (one per grid "
            f"axis), got {given(tile)}; e.g. tile=(4, 4, 8) for videos or tile='auto'"
        )
    if guard is not None:
        check_number(owner, "similarity_guard", guard, low=-1.0, high=1.0, example=0.6, meaning="a cosine similarity")
    return roles


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


def _take(x: Tensor, index: Tensor) -> Tensor:
    """``x`` ``(B, H, S, ...)`` taken along its sequence axis (dim 2) at ``index``: ``(L,)`` for every head, or
    ``(H, L)`` one row per head. Returns ``(B, H, L, ...)``; one copy either way (an ``index_select`` over the
    flattened batch, head and sequence axes, or over whole token rows when ``x`` is sequence-major in memory)."""
    batch, heads, length = x.shape[:3]
    if index.ndim == 1:
        if x.stride(1) < x.stride(2):  # (B, S, H, ...) in memory, as attention processors pass it: move token rows
            return x.transpose(1, 2).index_select(1, index).transpose(1, 2)
        if not x.is_contiguous():
            return x.index_select(2, index)
        index = index.expand(heads, -1)  # one index_select over flat rows: ~4x faster than along dim 2
    if index.shape[0] != heads:
        raise ValueError(f"a per-head order of {index.shape[0]} heads cannot index a tensor of {heads} heads")
    rest = x.shape[3:]
    offsets = torch.arange(batch * heads, device=index.device).view(batch, heads, 1) * length
    flat = (offsets + index.unsqueeze(0)).reshape(-1)
    return x.reshape(batch * heads * length, *rest).index_select(0, flat).view(batch, heads, -1, *rest)


@dataclass(frozen=True, eq=False)
class _Plan:
    """One group of batch entries in kernel order: its gather/scatter and block mask.

    ``gather`` (kernel position -> sequence index) and ``scatter`` (sequence index -> kernel position) are ``(L,)``
    for all heads, or ``(H, L)`` / ``(H, S)`` per head (semantic permutation); ``k_gather`` is then the keys' (and
    values') own per-head order, ``(H_kv, L)``. ``None``: keys share the queries' ``gather``."""

    rows: slice | list[int]
    gather: Tensor
    scatter: Tensor
    block_mask: BlockMask
    density: float
    k_gather: Tensor | None = None

    def queries(self, x: Tensor) -> Tensor:
        """This plan's batch rows of ``x`` (queries) in kernel order."""
        return _take(x[self.rows], self.gather)

    def keys(self, x: Tensor) -> Tensor:
        """This plan's batch rows of ``x`` (keys or values) in kernel order."""
        return _take(x[self.rows], self.gather if self.k_gather is None else self.k_gather)

    def output(self, o: Tensor) -> Tensor:
        """The kernel's output ``(B, H, L, ...)`` (or lse ``(B, H, L)``) back in sequence order."""
        if o.ndim == 3:
            return _take(o.unsqueeze(-1), self.scatter).squeeze(-1)
        return _take(o, self.scatter)


def _score(
    qk: Tensor,
    kk: Tensor,
    ko: KernelOrder,
    scale: float,
    guard: float | None,
    k_similarity: bool = False,
    own_block: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Pooled block probabilities ``(H, nvb, nvb)``, forced blocks and (if asked) the key blocks' self-similarity,
    from one batch entry's q and k ``(H, L, D)`` in kernel order. Only visual positions are pooled.

    ``own_block``: each query block keeps the key block at its own position (its neighbourhood, when q and k share
    the kernel order); ``False`` (q and k in orders of their own, e.g. clustered) keeps its most probable block
    instead, so every query still sees at least one block at a zero budget."""
    n_vis, block = ko.num_visual, ko.block_size
    valid = ko.valid[:n_vis]
    q_vis, k_vis = qk[:, :n_vis], kk[:, :n_vis]
    q_means, _ = pool_blocks(q_vis, valid, block)
    k_means, k_counts = pool_blocks(k_vis, valid, block)
    probs = block_probabilities(q_means, k_means, k_counts, scale)
    q_sim = block_self_similarity(q_vis, valid, block) if guard is not None else None
    k_sim = block_self_similarity(k_vis, valid, block) if guard is not None or k_similarity else None
    nvb = probs.shape[-1]
    forced = forced_blocks(
        nvb, nvb, q_similarity=q_sim, k_similarity=k_sim, threshold=guard, device=probs.device, diagonal=own_block
    )
    forced = forced.expand_as(probs)
    if not own_block:
        best = torch.zeros_like(forced).scatter_(-1, probs.argmax(-1, keepdim=True), True)
        forced = forced | best
    return probs, forced, k_sim


#: Calls of one shape a layer may make in one step before their state entries are reused (see :func:`_call_key`).
_MAX_CALLS_PER_STEP = 8


def _call_key(calls: dict, q: Tensor, v: Tensor, ctx: AttentionContext) -> tuple:
    """The state key of this call for methods that keep state per layer across calls (Re-ttention's calibration,
    the semantic permutation's centroids): (application, layer, batch roles or size, q and v shapes, heads slice,
    call order within the step). ``calls`` (owned by the method) remembers the last step and call count per key."""
    who = (
        ctx.application_id,  # one cache per application: the same layer names on two denoisers stay apart
        ctx.layer,
        ctx.batch_roles if ctx.batch_roles is not None else q.shape[0],
        tuple(q.shape),
        tuple(v.shape),
        ctx.head_offset,
    )
    step, count = calls.get(who, (None, -1))
    # the n-th call of this shape in a step (e.g. separate cond / uncond forwards); wrapped, so that repeated
    # one-step generations (indistinguishable from more calls in one step) reuse entries instead of piling up
    count = (count + 1) % _MAX_CALLS_PER_STEP if step == ctx.step else 0
    calls[who] = (ctx.step, count)
    return (*who, count)


def _evict_finished(cache: dict, calls: dict, owner: tuple, step: int) -> None:
    """Drop the entries of ``owner`` (application, layer) last used at a later step than ``step``: they belong to a
    finished generation (any shape), so ``cache`` (values with a ``last_step``) holds at most one generation's
    entries per layer."""
    for key in [k for k, state in cache.items() if k[:2] == owner and state.last_step > step]:
        del cache[key]
    for who in [w for w, (last, _) in calls.items() if w[:2] == owner and last is not None and last > step]:
        del calls[who]


def _new_generation(state: Any, ctx: AttentionContext) -> bool:
    """Whether this call starts a new generation on a layer whose state entry ``state`` (with ``last_step`` and
    ``timestep``) was last used earlier: the step goes back, or the timestep up."""
    return state is not None and (
        ctx.step < state.last_step
        or (ctx.timestep is not None and state.timestep is not None and ctx.timestep > state.timestep)
    )


def _release_application(cache: dict, calls: dict, application_id: int) -> None:
    """Drop every entry of the application ``application_id`` (it was removed)."""
    for key in [k for k in cache if k[0] == application_id]:
        del cache[key]
    for who in [w for w in calls if w[0] == application_id]:
        del calls[who]


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
