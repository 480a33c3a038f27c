"""Pattern composition: union, intersection, and a different pattern per head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Pattern, PositionMaskMod

__all__ = ["Union", "Intersection", "PerHead"]


def _same_order(patterns: tuple[Pattern, ...], grid: tuple[int, ...], owner: str) -> Tensor | None:
    orders = [p.token_order(grid) for p in patterns]
    first = orders[0]
    for other in orders[1:]:
        same = (first is None and other is None) or (
            first is not None and other is not None and torch.equal(first, other)
        )
        if not same:
            raise ValueError(
                f"{owner}: the patterns order tokens differently (e.g. a tile pattern with a raster one); compose "
                "patterns that share a token order"
            )
    return first


def _check_parts(parts: tuple[Pattern, ...], owner: str, minimum: int) -> tuple[Pattern, ...]:
    parts = tuple(parts)
    if len(parts) < minimum or not all(isinstance(p, Pattern) for p in parts):
        raise ValueError(f"{owner} needs at least {minimum} patterns, got {parts!r}")
    return parts


def _call_mod(pattern: Pattern, mod, q: Tensor, kv: Tensor, h: Tensor | None) -> Tensor:
    return mod(q, kv, h) if pattern.num_heads() is not None else mod(q, kv)


@dataclass(frozen=True)
class _Combine(Pattern):
    parts: tuple[Pattern, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", _check_parts(self.parts, type(self).__name__, 2))
        heads = {p.num_heads() for p in self.parts} - {None}
        if len(heads) > 1:
            raise ValueError(f"{type(self).__name__}: per-head parts disagree on the number of heads {sorted(heads)}")

    def num_heads(self) -> int | None:
        return next((p.num_heads() for p in self.parts if p.num_heads() is not None), None)

    def token_order(self, grid: tuple[int, ...]) -> Tensor | None:
        return _same_order(self.parts, grid, type(self).__name__)

    def _reduce(self, a: Tensor, b: Tensor) -> Tensor:
        raise NotImplementedError

    def mask_mod(self, grid: tuple[int, ...]) -> PositionMaskMod:
        mods = [(p, p.mask_mod(grid)) for p in self.parts]
        per_head = self.num_heads() is not None

        def mod(q: Tensor, kv: Tensor, h: Tensor | None = None) -> Tensor:
            result = _call_mod(mods[0][0], mods[0][1], q, kv, h)
            for pattern, m in mods[1:]:
                result = self._reduce(result, _call_mod(pattern, m, q, kv, h))
            return result

        return mod if per_head else (lambda q, kv: mod(q, kv))

    def block_relation(self, grid: tuple[int, ...], block_size: int) -> tuple[Tensor, Tensor]:
        relations = [p.block_relation(grid, block_size) for p in self.parts]
        any_, full = relations[0]
        for a, f in relations[1:]:
            any_, full = self._reduce(any_, a), self._reduce(full, f)
        return any_, full


@dataclass(frozen=True)
class Union(_Combine):
    """A key is visible if any part allows it."""

    def _reduce(self, a: Tensor, b: Tensor) -> Tensor:
        return a | b


@dataclass(frozen=True)
class Intersection(_Combine):
    """A key is visible if every part allows it (block 'any' stays conservative)."""

    def _reduce(self, a: Tensor, b: Tensor) -> Tensor:
        return a & b


@dataclass(frozen=True)
class PerHead(Pattern):
    """Head ``i`` uses ``heads[i]``. Under Ulysses context parallelism, each rank gets its slice of heads."""

    heads: tuple[Pattern, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", _check_parts(self.heads, "PerHead", 1))
        if any(p.num_heads() is not None for p in self.heads):
            raise ValueError("PerHead: each head takes a shared pattern, not another per-head one")

    def num_heads(self) -> int:
        return len(self.heads)

    def slice(self, start: int, stop: int) -> PerHead:
        return PerHead(self.heads[start:stop])

    def token_order(self, grid: tuple[int, ...]) -> Tensor | None:
        return _same_order(self.heads, grid, "PerHead")

    def mask_mod(self, grid: tuple[int, ...]) -> PositionMaskMod:
        mods = [p.mask_mod(grid) for p in self.heads]

        def mod(q: Tensor, kv: Tensor, h: Tensor) -> Tensor:
            result = mods[0](q, kv)
            for i, m in enumerate(mods[1:], start=1):
                result = torch.where(h == i, m(q, kv), result)
            return result

        return mod

    def block_relation(self, grid: tuple[int, ...], block_size: int) -> tuple[Tensor, Tensor]:
        relations = [p.block_relation(grid, block_size) for p in self.heads]
        return torch.stack([a for a, _ in relations]), torch.stack([f for _, f in relations])
