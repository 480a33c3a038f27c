"""HiDiffusion's MSW-MSA over raster-ordered token grids: :class:`ShiftedWindow` (a few big windows with a cyclic
shift, no Swin mask) and its random shift :func:`hidiffusion_shift`."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Pattern, PositionMaskMod, check_grid
from .raster import _as_tuple, _AxisPredicate, _coords, _equal_axis, _grid_str, _product_block_relation

__all__ = ["ShiftedWindow", "hidiffusion_shift"]


_SHIFT_FRACTIONS = (0.0, 0.25, 0.5, 0.75)


def hidiffusion_shift(step: int, layer: str, seed: int = 0) -> float:
    """HiDiffusion's random window shift as a fraction of the window, in {0, 1/4, 1/2, 3/4}.

    Drawn uniformly from a ``torch.Generator`` seeded by (seed, step, layer name), so it is reproducible and never
    touches the global RNG (HiDiffusion itself draws from the global RNG on every call).
    """
    key = f"{int(seed)}\x00{int(step)}\x00{layer}".encode()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1))
    return _SHIFT_FRACTIONS[int(torch.randint(0, 4, (1,), generator=g))]


@dataclass(frozen=True)
class ShiftedWindow(Pattern):
    """HiDiffusion MSW-MSA: the map is split into ``windows`` windows per axis of ``ceil(L / windows)`` tokens (the
    last one shorter for sizes that do not divide; no resizing), after a cyclic shift: the map is rolled by
    ``-shift``, windowed, rolled back. Token ``y`` is in window ``((y - shift) mod L) // ceil(L / windows)``; tokens
    attend only within their window, and wrapped tokens from opposite borders share a window (no Swin mask).

    ``windows`` describes the last axes of the grid (an int means the two spatial axes); ``shift`` is in tokens,
    one per windowed axis or one int for all (taken mod L, so negative shifts roll the other way). Leading axes
    (the frames of a video) are independent slices: a token sees only its own frame. :meth:`window_ids` gives the
    window of every token, e.g. to gather windows contiguously for a kernel.
    """

    windows: int | tuple[int, ...] = (2, 2)
    shift: int | tuple[int, ...] = 0

    def __post_init__(self) -> None:
        name = type(self).__name__
        windows = _as_tuple(self.windows)
        shift = _as_tuple(self.shift)
        if not isinstance(windows, tuple):
            windows = (windows, windows)
        if not isinstance(shift, tuple):
            shift = (shift,) * len(windows)
        if not windows or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in windows):
            raise ValueError(f"{name}: windows must be positive ints (windows per axis), got {self.windows!r}")
        if len(shift) != len(windows) or any(isinstance(s, bool) or not isinstance(s, int) for s in shift):
            raise ValueError(
                f"{name}: shift must be one int (tokens) per windowed axis ({len(windows)} values), got {self.shift!r}"
            )
        object.__setattr__(self, "windows", windows)
        object.__setattr__(self, "shift", shift)

    @classmethod
    def from_fraction(
        cls,
        grid: tuple[int, ...],
        fraction: float,
        windows: int | tuple[int, ...] = (2, 2),
        *,
        faithful: bool = True,
    ):
        """The pattern for ``grid`` shifted by ``fraction`` of the window size on every windowed axis
        (HiDiffusion: one fraction from :func:`hidiffusion_shift`).

        ``faithful=True`` (default) is HiDiffusion's own rule: the fraction must be a quarter ``k / 4``
        (k = 0..3) and the shift is ``(window // 4) * k`` tokens per axis; when that gives 0 on the first windowed
        axis no axis is shifted (their roll is skipped then). ``faithful=False`` is diffattn's earlier rule,
        ``floor(fraction * window)`` per axis for any fraction in [0, 1); the two differ when a window is not a
        multiple of 4 tokens (window 10: 0, 2, 4, 6 faithful; 0, 2, 5, 7 floor)."""
        if not 0 <= fraction < 1:
            raise ValueError(f"ShiftedWindow.from_fraction: fraction must be in [0, 1), got {fraction}")
        if not isinstance(faithful, bool):
            raise ValueError(f"ShiftedWindow.from_fraction: faithful must be a bool, got {faithful!r}")
        base = cls(windows=windows)
        sizes = base.window_sizes(grid)
        if not faithful:
            return cls(windows=base.windows, shift=tuple(int(math.floor(fraction * w)) for w in sizes))
        quarter = 4 * fraction
        if quarter != int(quarter):
            raise ValueError(
                f"ShiftedWindow.from_fraction: HiDiffusion's shift rule (faithful=True) takes a quarter of the window "
                f"(0, 0.25, 0.5 or 0.75), got {fraction}; pass faithful=False for floor(fraction * window)"
            )
        shift = tuple((w // 4) * int(quarter) for w in sizes)
        if shift[0] == 0:
            shift = (0,) * len(shift)
        return cls(windows=base.windows, shift=shift)

    def _axes(self, grid: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
        name = type(self).__name__
        grid = check_grid(grid, None, name)
        lead = len(grid) - len(self.windows)
        if lead < 0:
            raise ValueError(
                f"{name}: windows {self.windows} describe {len(self.windows)} axes but the token grid {grid} has "
                f"{len(grid)}; give one window count per spatial axis, e.g. windows=(2,) * {len(grid)}"
            )
        for axis, (length, n) in enumerate(zip(grid[lead:], self.windows)):
            if n > length:
                raise ValueError(
                    f"{name}: {n} windows do not fit the {_grid_str(grid)} grid on axis {lead + axis} "
                    f"(length {length}); use at most {length} windows on that axis"
                )
        return grid, lead

    def window_sizes(self, grid: tuple[int, ...]) -> tuple[int, ...]:
        """Window size ``ceil(L / windows)`` per windowed axis."""
        grid, lead = self._axes(grid)
        return tuple(-(-length // n) for length, n in zip(grid[lead:], self.windows))

    def window_ids(self, grid: tuple[int, ...]) -> Tensor:
        """Window index of every raster token (int64, shape ``(n,)``); frames count as separate windows.
        Tokens attend exactly the tokens with the same id; sorting by id partitions the map into windows."""
        grid, _ = self._axes(grid)
        pos = torch.arange(math.prod(grid))
        ids = torch.zeros_like(pos)
        for c, (length, size, shift) in zip(_coords(pos, grid), self._axis_params(grid)):
            n_windows = -(-length // size)
            ids = ids * n_windows + ((c + (length - shift)) % length) // size
        return ids

    def _axis_params(self, grid: tuple[int, ...]) -> list[tuple[int, int, int]]:
        """(length, window size, shift mod length) per axis; leading axes are windows of size 1."""
        grid, lead = self._axes(grid)
        out = [(length, 1, 0) for length in grid[:lead]]
        for length, n, s in zip(grid[lead:], self.windows, self.shift):
            out.append((length, -(-length // n), s % length))
        return out

    def mask_mod(self, grid: tuple[int, ...]) -> PositionMaskMod:
        grid, lead = self._axes(grid)
        params = self._axis_params(grid)

        def mask_mod(q_pos: Tensor, kv_pos: Tensor) -> Tensor:
            out = None
            for (length, size, shift), x, y in zip(params, _coords(q_pos, grid), _coords(kv_pos, grid)):
                if size == 1:
                    m = x == y
                else:
                    m = ((x + (length - shift)) % length) // size == ((y + (length - shift)) % length) // size
                out = m if out is None else out & m
            return out

        return mask_mod

    def block_relation(self, grid: tuple[int, ...], block_size: int) -> tuple[Tensor, Tensor]:
        grid, _ = self._axes(grid)
        predicates = [
            _equal_axis if size == 1 else self._window_predicate(length, size, shift)
            for length, size, shift in self._axis_params(grid)
        ]
        return _product_block_relation(grid, block_size, predicates)

    @staticmethod
    def _window_predicate(length: int, size: int, shift: int) -> _AxisPredicate:
        # Each window is a cyclic interval of raw coordinates: one or two plain intervals ("pieces").
        pieces = []
        for w in range(-(-length // size)):
            count = min(size, length - w * size)
            start = (w * size + shift) % length
            if count == length:
                pieces.append(((0, length - 1), (1, 0)))
            elif start + count <= length:
                pieces.append(((start, start + count - 1), (1, 0)))
            else:
                pieces.append(((start, length - 1), (0, start + count - 1 - length)))

        def predicate(a0: Tensor, a1: Tensor, b0: Tensor, b1: Tensor) -> tuple[Tensor, Tensor]:
            shape = torch.broadcast_shapes(a0.shape, b0.shape)
            exists = torch.zeros(shape, dtype=torch.bool)
            forall = torch.zeros(shape, dtype=torch.bool)
            for (p_lo, p_hi), (r_lo, r_hi) in pieces:
                meets_a = ((a0 <= p_hi) & (a1 >= p_lo)) | ((a0 <= r_hi) & (a1 >= r_lo) & (r_lo <= r_hi))
                meets_b = ((b0 <= p_hi) & (b1 >= p_lo)) | ((b0 <= r_hi) & (b1 >= r_lo) & (r_lo <= r_hi))
                in_a = ((a0 >= p_lo) & (a1 <= p_hi)) | ((a0 >= r_lo) & (a1 <= r_hi))
                in_b = ((b0 >= p_lo) & (b1 <= p_hi)) | ((b0 >= r_lo) & (b1 <= r_hi))
                exists |= meets_a & meets_b
                forall |= in_a & in_b
            return exists, forall

        return predicate
