"""Sliding tile attention (STA): the window moves in whole tiles, so every kernel block is full or empty."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Pattern, PositionMaskMod, check_grid

__all__ = ["SlidingTile"]


def _per_axis(value: int | tuple[int, ...], ndim: int, name: str) -> tuple[int, ...]:
    values = (value,) * ndim if isinstance(value, int) else tuple(value)
    if len(values) != ndim:
        raise ValueError(f"SlidingTile: {name}={value} has {len(values)} values but the grid has {ndim} axes")
    return values


@dataclass(frozen=True)
class SlidingTile(Pattern):
    """Tokens are grouped into tiles of ``tile`` tokens per axis (tile-major kernel order, last tiles padded);
    a query tile sees the ``window`` tiles per axis around it, the window clamped inward at the borders so every
    tile sees the same number of tiles. ``tile`` and ``window`` take an int (all axes) or one value per axis."""

    tile: int | tuple[int, ...] = (4, 4, 8)
    window: int | tuple[int, ...] = 3

    def __post_init__(self) -> None:
        for name in ("tile", "window"):
            value = getattr(self, name)
            values = (value,) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else ()
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(
                    f"SlidingTile: {name} must be positive ints (one per axis or one for all), got {value!r} "
                    f"({type(value).__name__}); e.g. {name}=(2, 4, 4) or {name}=3"
                )
            if not isinstance(value, int):
                object.__setattr__(self, name, tuple(value))

    def _geometry(
        self, grid: tuple[int, ...]
    ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(tile, window, tiles per axis, tile traversal order of the axes, outermost first)."""
        grid = check_grid(grid, None, "SlidingTile")
        tile = _per_axis(self.tile, len(grid), "tile")
        window = _per_axis(self.window, len(grid), "window")
        tiles = tuple(math.ceil(n / t) for n, t in zip(grid, tile))
        window = tuple(min(w, n) for w, n in zip(window, tiles))  # a window wider than the axis covers it
        # Tiles are laid out with the widest window innermost (whole-axis windows innermost of all), so the key
        # tiles of a query tile form few, long contiguous runs: the kernel attends them as views, without copies.
        axes = tuple(sorted(range(len(grid)), key=lambda a: (window[a] == tiles[a], window[a])))
        return tile, window, tiles, axes

    def tile_volume(self, grid: tuple[int, ...]) -> int:
        return math.prod(self._geometry(grid)[0])

    def token_order(self, grid: tuple[int, ...]) -> Tensor:
        tile, _, tiles, axes = self._geometry(grid)
        volume = math.prod(tile)
        pos = torch.arange(math.prod(tiles) * volume)
        tile_coords = self._tile_coords(pos // volume, tiles, axes)
        r = pos % volume
        valid = torch.ones_like(pos, dtype=torch.bool)
        raster = torch.zeros_like(pos)
        in_stride = volume
        for a, (n, k) in enumerate(zip(grid, tile)):
            in_stride //= k
            c = tile_coords[a] * k + (r // in_stride) % k
            valid &= c < n
            raster = raster * n + c
        return torch.where(valid, raster, -1)

    @staticmethod
    def _tile_coords(t: Tensor, tiles: tuple[int, ...], axes: tuple[int, ...]) -> list[Tensor]:
        """Per-axis tile coordinates of tile index ``t`` (tiles traversed in ``axes`` order, outermost first)."""
        coords: list[Tensor] = [t] * len(tiles)
        stride = math.prod(tiles)
        for a in axes:
            stride //= tiles[a]
            coords[a] = (t // stride) % tiles[a]
        return coords

    @classmethod
    def _tile_allowed(
        cls, tq: Tensor, tk: Tensor, window: tuple[int, ...], tiles: tuple[int, ...], axes: tuple[int, ...]
    ) -> Tensor:
        allowed = torch.ones(torch.broadcast_shapes(tq.shape, tk.shape), dtype=torch.bool, device=tq.device)
        for cq, ck, w, n in zip(cls._tile_coords(tq, tiles, axes), cls._tile_coords(tk, tiles, axes), window, tiles):
            start = torch.clamp(cq - w // 2, min=0, max=n - w)
            allowed = allowed & (ck >= start) & (ck < start + w)
        return allowed

    def mask_mod(self, grid: tuple[int, ...]) -> PositionMaskMod:
        tile, window, tiles, axes = self._geometry(grid)
        volume = math.prod(tile)

        def mod(q: Tensor, kv: Tensor) -> Tensor:
            return self._tile_allowed(q // volume, kv // volume, window, tiles, axes)

        return mod

    def block_relation(self, grid: tuple[int, ...], block_size: int) -> tuple[Tensor, Tensor]:
        tile, window, tiles, axes = self._geometry(grid)
        volume = math.prod(tile)
        if block_size != volume:
            raise ValueError(
                f"SlidingTile with tile {tile} ({volume} tokens) needs kernel blocks of {volume} tokens, got "
                f"{block_size}; SlidingTileAttention picks it for you"
            )
        n = math.prod(tiles)
        t = torch.arange(n)
        kept = self._tile_allowed(t.view(-1, 1), t.view(1, -1), window, tiles, axes)
        return kept, kept.clone()
