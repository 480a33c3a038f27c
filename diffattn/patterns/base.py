"""Patterns: what each query may see. Shapes and indices only (no diffusers, no tensors of q/k/v).

A pattern describes visual-token attention over a grid (``(h, w)`` or ``(f, h, w)``) in a *kernel order* of its
choice: raster order (the default) or e.g. tile order with padding (``token_order``). It gives

- ``mask_mod(grid)``: ``(q_pos, kv_pos) -> bool`` over positions in that order, pure index arithmetic on
  broadcastable integer tensors (FlexAttention-compatible; used for partial blocks and as the oracle);
- ``block_relation(grid, block_size)``: two boolean tensors ``(nq_blocks, nkv_blocks)`` (or with a leading head
  dim): ``any_`` — the block may hold an allowed pair (every allowed pair lies in such a block) and ``full`` —
  every pair in the block is allowed. Both may be conservative (``any_`` too large, ``full`` too small), never the
  other way. They are block-level, so building them never touches an n x n token tensor.

Text tokens are handled once, in :mod:`diffattn.patterns.compile`, not by each pattern.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Pattern", "PositionMaskMod", "check_grid", "blocks_of", "block_ranges"]

PositionMaskMod = Callable[[Tensor, Tensor], Tensor]


def check_grid(grid: tuple[int, ...], ndim: int | None, owner: str) -> tuple[int, ...]:
    """Validate a grid; ``ndim`` (if given) is the number of axes the pattern's parameters describe."""
    grid = tuple(int(n) for n in grid)
    if not grid or any(n < 1 for n in grid):
        raise ValueError(f"{owner}: the token grid must be non-empty positive sizes, got {grid}")
    if ndim is not None and len(grid) != ndim:
        raise ValueError(
            f"{owner}: parameters describe {ndim}-D grids but the layer's tokens form a {len(grid)}-D grid {grid}; "
            f"give one value per axis ({len(grid)} values) or a single int for all axes"
        )
    return grid


def blocks_of(length: int, block_size: int) -> int:
    return math.ceil(length / block_size)


def block_ranges(length: int, block_size: int) -> tuple[Tensor, Tensor]:
    """First and last position (inclusive) of each block of a sequence of ``length`` positions."""
    start = torch.arange(0, length, block_size)
    return start, torch.clamp(start + block_size - 1, max=length - 1)


@dataclass(frozen=True)
class Pattern:
    """Base class; subclasses are frozen dataclasses of parameters validated in ``__post_init__``."""

    def token_order(self, grid: tuple[int, ...]) -> Tensor | None:
        """Kernel order: ``order[p]`` is the raster index of the token at position ``p`` (``-1`` = padding).
        ``None`` means raster order without padding."""
        return None

    def mask_mod(self, grid: tuple[int, ...]) -> PositionMaskMod:
        raise NotImplementedError

    def block_relation(self, grid: tuple[int, ...], block_size: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def num_heads(self) -> int | None:
        """Heads the pattern is defined for (per-head patterns), ``None`` if shared by all heads."""
        return None
