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
            values = (value,) if isinstance(value, int) else tuple(value)
            if not values or any((not isinstance(v, int)) or v < 1 for v in values):
                raise ValueError(f"SlidingTile: {name} must be positive ints (one per axis or one for all), got {value}")
            if not isinstance(value, int):
                object.__setattr__(self, name, tuple(value))

    def _geometry(self, grid: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        grid = check_grid(grid, None, "SlidingTile")
        tile = _per_axis(self.tile, len(grid), "tile")
        window = _per_axis(self.window, len(grid), "window")
        tiles = tuple(math.ceil(n / t) for n, t in zip(grid, tile))
        # A window wider than the tile grid covers the whole axis.
        return tile, tuple(min(w, n) for w, n in zip(window, tiles)), tiles

    def tile_volume(self, grid: tuple[int, ...]) -> int:
        return math.prod(self._geometry(grid)[0])

    def token_order(self, grid: tuple[int, ...]) -> Tensor:
        tile, _, tiles = self._geometry(grid)
        pos = torch.arange(math.prod(tiles) * math.prod(tile))
        coords = self._token_coords(pos, tile, tiles)
        valid = torch.ones_like(pos, dtype=torch.bool)
        raster = torch.zeros_like(pos)
        for c, n in zip(coords, grid):
            valid &= c < n
            raster = raster * n + c
        return torch.where(valid, raster, -1)

    @staticmethod
    def _token_coords(pos: Tensor, tile: tuple[int, ...], tiles: tuple[int, ...]) -> list[Tensor]:
        volume = math.prod(tile)
        t, r = pos // volume, pos % volume
        coords = []
        tile_stride, in_stride = math.prod(tiles), volume
        for nt, nk in zip(tiles, tile):
            tile_stride //= nt
            in_stride //= nk
            coords.append(((t // tile_stride) % nt) * nk + (r // in_stride) % nk)
        return coords

    @staticmethod
    def _tile_allowed(tq: Tensor, tk: Tensor, window: tuple[int, ...], tiles: tuple[int, ...]) -> Tensor:
        allowed = torch.ones(torch.broadcast_shapes(tq.shape, tk.shape), dtype=torch.bool)
        stride = math.prod(tiles)
        for w, n in zip(window, tiles):
            stride //= n
            cq, ck = (tq // stride) % n, (tk // stride) % n
            start = torch.clamp(cq - w // 2, min=0, max=n - w)
            allowed = allowed & (ck >= start) & (ck < start + w)
        return allowed

    def mask_mod(self, grid: tuple[int, ...]) -> PositionMaskMod:
        tile, window, tiles = self._geometry(grid)
        volume = math.prod(tile)

        def mod(q: Tensor, kv: Tensor) -> Tensor:
            return self._tile_allowed(q // volume, kv // volume, window, tiles).to(q.device)

        return mod

    def block_relation(self, grid: tuple[int, ...], block_size: int) -> tuple[Tensor, Tensor]:
        tile, window, tiles = self._geometry(grid)
        volume = math.prod(tile)
        if block_size != volume:
            raise ValueError(
                f"SlidingTile with tile {tile} ({volume} tokens) needs kernel blocks of {volume} tokens, got "
                f"{block_size}; SlidingTileAttention picks it for you"
            )
        n = math.prod(tiles)
        t = torch.arange(n)
        kept = self._tile_allowed(t.view(-1, 1), t.view(1, -1), window, tiles)
        return kept, kept.clone()
