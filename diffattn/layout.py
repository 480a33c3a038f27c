"""Token layouts: where visual and text tokens sit in an attention sequence.

A layout knows shapes only (no diffusers). Visual tokens are in raster order over ``grid`` (``(h, w)`` for images,
``(f, h, w)`` for videos, after patching); text tokens form one contiguous run before or after them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TokenLayout"]


@dataclass(frozen=True)
class TokenLayout:
    """Layout of one attention sequence (the queries' or the keys')."""

    grid: tuple[int, ...] = ()
    text_len: int = 0
    text_first: bool = False

    def __post_init__(self) -> None:
        if any((not isinstance(n, int)) or n < 1 for n in self.grid):
            raise ValueError(f"grid must hold positive integers (tokens per axis after patching), got {self.grid}")
        if self.text_len < 0:
            raise ValueError(f"text_len must be >= 0, got {self.text_len}")
        if not self.grid and self.text_len == 0:
            raise ValueError("a layout needs a visual grid, text tokens, or both")

    @property
    def num_visual(self) -> int:
        return math.prod(self.grid) if self.grid else 0

    @property
    def num_tokens(self) -> int:
        return self.num_visual + self.text_len

    @property
    def visual_start(self) -> int:
        return self.text_len if self.text_first else 0

    @property
    def text_start(self) -> int:
        return 0 if self.text_first else self.num_visual

    @property
    def visual_slice(self) -> slice:
        return slice(self.visual_start, self.visual_start + self.num_visual)

    @property
    def text_slice(self) -> slice:
        return slice(self.text_start, self.text_start + self.text_len)

    def is_text(self, idx: Tensor) -> Tensor:
        """Boolean tensor: which sequence indices are text tokens."""
        return (idx >= self.text_start) & (idx < self.text_start + self.text_len)

    def text_index(self, idx: Tensor) -> Tensor:
        """Position within the text run, ``-1`` for visual tokens."""
        return torch.where(self.is_text(idx), idx - self.text_start, -1)

    def visual_coords(self, idx: Tensor) -> tuple[Tensor, ...]:
        """Per-axis grid coordinates of each index, ``-1`` on every axis for text tokens."""
        local = idx - self.visual_start
        inside = (local >= 0) & (local < self.num_visual)
        coords = []
        stride = self.num_visual
        for n in self.grid:
            stride //= n
            coords.append(torch.where(inside, (local // stride) % n, -1))
        return tuple(coords)

    def describe(self) -> str:
        parts = []
        if self.grid:
            parts.append("visual grid " + "x".join(map(str, self.grid)))
        if self.text_len:
            parts.append(f"{self.text_len} text tokens {'first' if self.text_first else 'last'}")
        return ", ".join(parts) + f" ({self.num_tokens} tokens)"
