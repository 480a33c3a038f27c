"""Raster-order grid helpers shared by the window patterns (:mod:`~diffattn.patterns.sliding_window`,
:mod:`~diffattn.patterns.shifted_window`): coordinates of raster positions, per-axis parameters, and exact block
relations of masks that are an AND of per-axis relations.

Block relations are derived per axis from the boxes that each raster block covers (a run of consecutive raster
positions is a union of at most ``2 * ndim - 1`` axis-aligned boxes), never from an n x n token tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# An axis predicate maps per-axis coordinate intervals A = [a0, a1], B = [b0, b1] (broadcastable int64 tensors) to
# (exists, forall): some / every (x in A, y in B) pair is allowed on that axis.
_AxisPredicate = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]

_MAX_CHUNK_ELEMENTS = 1 << 22


def _grid_str(grid: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in grid)


def _raster_strides(grid: tuple[int, ...]) -> list[int]:
    return [math.prod(grid[i + 1 :]) for i in range(len(grid))]


def _coords(pos: Tensor, grid: tuple[int, ...]) -> list[Tensor]:
    """Per-axis coordinates of raster positions (axis 0 is not reduced, so it also works for padded positions)."""
    out = []
    for i, stride in enumerate(_raster_strides(grid)):
        c = pos // stride if stride > 1 else pos
        out.append(c if i == 0 else c % grid[i])
    return out


def _per_axis(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, tuple) else (value,) * n


def _as_tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _raster_boxes(grid: tuple[int, ...], first: int, last: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Axis-aligned boxes ``(lo, hi)`` (inclusive corners) whose union is the raster range ``[first, last]``."""

    def rec(axis: int, p0: int, p1: int, prefix: list[tuple[int, int]]):
        if axis == len(grid) - 1:
            return [prefix + [(p0, p1)]]
        inner = math.prod(grid[axis + 1 :])
        r0, o0 = divmod(p0, inner)
        r1, o1 = divmod(p1, inner)
        if r0 == r1:
            return rec(axis + 1, o0, o1, prefix + [(r0, r0)])
        boxes = []
        full_lo = r0 if o0 == 0 else r0 + 1
        full_hi = r1 if o1 == inner - 1 else r1 - 1
        if o0 != 0:
            boxes += rec(axis + 1, o0, inner - 1, prefix + [(r0, r0)])
        if full_lo <= full_hi:
            boxes.append(prefix + [(full_lo, full_hi)] + [(0, n - 1) for n in grid[axis + 1 :]])
        if o1 != inner - 1:
            boxes += rec(axis + 1, 0, o1, prefix + [(r1, r1)])
        return boxes

    return [(tuple(a for a, _ in b), tuple(z for _, z in b)) for b in rec(0, first, last, [])]


def _block_boxes(grid: tuple[int, ...], block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Boxes of every raster block: ``lo, hi`` of shape (blocks, M, ndim) and ``valid`` (blocks, M)."""
    n = math.prod(grid)
    per_block = [_raster_boxes(grid, s, min(s + block_size, n) - 1) for s in range(0, n, block_size)]
    m = max(len(b) for b in per_block)
    nd = len(grid)
    lo = [[[0] * nd] * m for _ in per_block]
    hi = [[[-1] * nd] * m for _ in per_block]
    valid = [[False] * m for _ in per_block]
    for i, boxes in enumerate(per_block):
        for j, (a, z) in enumerate(boxes):
            lo[i][j], hi[i][j], valid[i][j] = list(a), list(z), True
    lo, hi, valid = torch.tensor(lo, dtype=torch.int64), torch.tensor(hi, dtype=torch.int64), torch.tensor(valid)
    return lo, hi, valid


def _product_block_relation(
    grid: tuple[int, ...], block_size: int, predicates: list[_AxisPredicate]
) -> tuple[Tensor, Tensor]:
    """Exact block relation of a mask that is an AND of per-axis relations, from per-axis interval predicates.

    Each block is a union of boxes; a box pair's relation is the AND of the per-axis interval relations (exact for
    product sets), a block pair's ``any_`` is the OR over its box pairs and ``full`` the AND.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be a positive number of tokens, got {block_size}")
    lo, hi, valid = _block_boxes(grid, block_size)
    nb, m, _ = lo.shape
    lo_k, hi_k, valid_k = lo.reshape(nb * m, -1), hi.reshape(nb * m, -1), valid.reshape(nb * m)
    any_ = torch.zeros(nb, nb, dtype=torch.bool)
    full = torch.zeros(nb, nb, dtype=torch.bool)
    rows = max(1, _MAX_CHUNK_ELEMENTS // (nb * m * m))
    for start in range(0, nb, rows):
        stop = min(nb, start + rows)
        lo_q = lo[start:stop].reshape(-1, lo.shape[-1])
        hi_q = hi[start:stop].reshape(-1, lo.shape[-1])
        pair_valid = valid[start:stop].reshape(-1, 1) & valid_k.reshape(1, -1)
        exists = pair_valid.clone()
        forall = torch.ones_like(exists)
        for axis, predicate in enumerate(predicates):
            e, f = predicate(lo_q[:, axis, None], hi_q[:, axis, None], lo_k[None, :, axis], hi_k[None, :, axis])
            exists &= e
            forall &= f
        forall |= ~pair_valid
        shape = (stop - start, m, nb, m)
        any_[start:stop] = exists.reshape(shape).any(dim=3).any(dim=1)
        full[start:stop] = forall.reshape(shape).all(dim=3).all(dim=1)
    return any_, full


def _equal_axis(a0: Tensor, a1: Tensor, b0: Tensor, b1: Tensor) -> tuple[Tensor, Tensor]:
    """Axis relation ``x == y`` (independent slices, e.g. frames of a per-frame pattern)."""
    return (a0 <= b1) & (b0 <= a1), (a0 == a1) & (b0 == b1) & (a0 == b0)
