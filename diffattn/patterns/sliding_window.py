"""Neighborhood attention over raster-ordered token grids: :class:`SlidingWindow` (NATTEN / GNA semantics: kernel,
stride, dilation, causal, border-clamped windows); :func:`inward_window` expresses FreeSwim's inward windows with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Pattern, PositionMaskMod, check_grid
from .raster import _as_tuple, _coords, _grid_str, _per_axis, _product_block_relation

__all__ = ["SlidingWindow", "inward_window"]


@dataclass(frozen=True)
class _Axis:
    """One axis of a sliding window resolved against a grid."""

    length: int
    kernel: int
    stride: int
    dilation: int
    causal: bool

    @property
    def left(self) -> int:
        return self.kernel // 2

    @property
    def right(self) -> int:
        return self.kernel // 2 + self.kernel % 2 - 1

    def group_length(self, group):
        """Length of dilation group ``group`` (``x mod d``); groups below ``length mod d`` are one longer."""
        d = self.dilation
        return (self.length - group + d - 1) // d

    def bounds(self, u: Tensor, group_length) -> tuple[Tensor, Tensor]:
        """Inclusive in-group key range ``[lo, hi]`` seen by in-group query coordinate ``u``."""
        k, s = self.kernel, self.stride
        last = group_length - 1
        if self.causal:
            leader = (u // s) * s + (s - 1)
            leader = torch.minimum(leader, last) if isinstance(last, Tensor) else leader.clamp(max=last)
            return leader - (k - 1), u
        leader = (u // s) * s + s // 2
        if isinstance(last, Tensor):
            center = torch.minimum(torch.minimum(leader, last).clamp(min=self.left), last - self.right)
        else:
            center = leader.clamp(max=last).clamp(min=self.left, max=last - self.right)
        return center - self.left, center + self.right

    def mask(self, x: Tensor, y: Tensor) -> Tensor:
        d = self.dilation
        if d == 1:
            lo, hi = self.bounds(x, self.length)
            return (y >= lo) & (y <= hi)
        group = x % d
        lo, hi = self.bounds(x // d, self.group_length(group))
        v = y // d
        return (y % d == group) & (v >= lo) & (v <= hi)

    def predicate(self, a0: Tensor, a1: Tensor, b0: Tensor, b1: Tensor) -> tuple[Tensor, Tensor]:
        # Per dilation group, the window bounds are monotone in the query and consecutive windows overlap or touch
        # (stride <= kernel), so "some pair" reduces to the end points: lo(first) <= b1 and hi(last) >= b0; "every
        # pair" to lo(last) <= b0 and hi(first) >= b1.
        d = self.dilation
        if d == 1:
            lo_first, hi_first = self.bounds(a0, self.length)
            lo_last, hi_last = self.bounds(a1, self.length)
            exists = (lo_first <= b1) & (hi_last >= b0)
            return exists, (lo_last <= b0) & (hi_first >= b1)
        exists = torch.zeros(torch.broadcast_shapes(a0.shape, b0.shape), dtype=torch.bool)
        for g in range(d):
            lg = self.group_length(g)
            u0, u1 = (a0 - g + d - 1) // d, (a1 - g) // d
            v0, v1 = (b0 - g + d - 1) // d, (b1 - g) // d
            lo_first, _ = self.bounds(u0, lg)
            _, hi_last = self.bounds(u1, lg)
            exists |= (u0 <= u1) & (v0 <= v1) & (lo_first <= v1) & (hi_last >= v0)
        # With d > 1 two different coordinates on one side fall in different groups: only point pairs can be full.
        return exists, exists & (a0 == a1) & (b0 == b1)


@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """Neighborhood attention (NATTEN / Generalized Neighborhood Attention semantics), per axis, axes ANDed.

    Per axis of length L with kernel k, stride s, dilation d: tokens split into d interleaved groups (``x mod d``)
    and see only their own group; below, q and j are coordinates inside the group (``x div d``) and L_g is the
    group's length (groups ``g < L mod d`` are one longer, as in NATTEN). Queries in runs of s share the window of
    the run leader ``min(floor(q/s)*s + floor(s/2), L_g - 1)``; the window spans ``floor(k/2)`` keys left and
    ``floor(k/2) + k%2 - 1`` right of the leader, clamped inward at borders so every query sees exactly k keys.
    A causal axis uses the run's last query ``min(floor(q/s)*s + s - 1, L_g - 1)`` as leader and sees keys
    ``j <= q`` with ``leader - j < k``.

    Validation as NATTEN: ``k * d <= L`` and ``s <= k`` per axis (checked against the grid when the mask is built).
    Parameters take an int (all axes) or one value per axis, matched to the grid when the mask is built.
    ``window`` entries may be ``None``: the whole axis (k = L // d). With ``clip_to_grid`` a window larger than
    the axis is reduced to it (k = min(k, L // d), s = min(s, k)) instead of raising; FreeSwim needs this.
    Unlike NATTEN, k = 1 is allowed (a length-1 axis, e.g. a one-frame video, has no other window).
    """

    window: int | None | tuple[int | None, ...]
    stride: int | tuple[int, ...] = 1
    dilation: int | tuple[int, ...] = 1
    causal: bool | tuple[bool, ...] = False
    clip_to_grid: bool = False

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field_name in ("window", "stride", "dilation", "causal"):
            object.__setattr__(self, field_name, _as_tuple(getattr(self, field_name)))
        lengths = {
            f: len(getattr(self, f))
            for f in ("window", "stride", "dilation", "causal")
            if isinstance(getattr(self, f), tuple)
        }
        if len(set(lengths.values())) > 1:
            raise ValueError(
                f"{name}: per-axis parameters have different lengths {lengths}; give one value per grid axis "
                "for each of them, or a single value that applies to all axes"
            )
        if any(n == 0 for n in lengths.values()):
            raise ValueError(f"{name}: empty per-axis parameter {lengths}; give an int or one value per axis")
        n = next(iter(lengths.values()), 1)
        for k in _per_axis(self.window, n):
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
                raise ValueError(
                    f"{name}: window sizes must be positive ints (tokens per axis) or None (whole axis), "
                    f"got window={self.window!r}"
                )
        for field_name in ("stride", "dilation"):
            for v in _per_axis(getattr(self, field_name), n):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(
                        f"{name}: {field_name} must be positive ints, got {field_name}={getattr(self, field_name)!r}"
                    )
        for c in _per_axis(self.causal, n):
            if not isinstance(c, bool):
                raise ValueError(f"{name}: causal must be a bool or one bool per axis, got causal={self.causal!r}")
        if not isinstance(self.clip_to_grid, bool):
            raise ValueError(f"{name}: clip_to_grid must be a bool, got {self.clip_to_grid!r}")
        if not self.clip_to_grid:
            for axis, (k, s) in enumerate(zip(_per_axis(self.window, n), _per_axis(self.stride, n))):
                if k is not None and s > k:
                    raise ValueError(
                        f"{name}: stride {self.stride} is larger than window {self.window} on axis {axis}; a stride "
                        "larger than the window would leave keys no query sees. Use stride <= window "
                        "(stride = window gives blocked, Swin-like attention)"
                    )

    @property
    def ndim(self) -> int | None:
        """Number of axes the parameters describe, or ``None`` if every parameter is a single value."""
        for v in (self.window, self.stride, self.dilation, self.causal):
            if isinstance(v, tuple):
                return len(v)
        return None

    def axes(self, grid: tuple[int, ...]) -> tuple[_Axis, ...]:
        """Parameters resolved against ``grid``, validated as NATTEN does (k * d <= L, s <= k)."""
        name = type(self).__name__
        grid = check_grid(grid, self.ndim, name)
        n = len(grid)
        out = []
        windows = _per_axis(self.window, n)
        for axis, (length, k, s, d, c) in enumerate(
            zip(grid, windows, _per_axis(self.stride, n), _per_axis(self.dilation, n), _per_axis(self.causal, n))
        ):
            if d > length:
                raise ValueError(
                    f"{name}: dilation {self.dilation} is larger than the {_grid_str(grid)} grid on axis {axis} "
                    f"(length {length}); use a dilation of at most {length} on that axis"
                )
            if k is None:
                k = length // d
            elif self.clip_to_grid:
                k = min(k, length // d)
            elif k * d > length:
                what = f"window {self.window}" + (f" with dilation {self.dilation}" if d > 1 else "")
                raise ValueError(
                    f"{name}: {what} is larger than the {_grid_str(grid)} grid on axis {axis}: it needs "
                    f"{k * d} tokens there but the axis has {length}. Use a window of at most {length // d} on that "
                    "axis, None for the whole axis, or clip_to_grid=True"
                )
            if self.clip_to_grid:
                s = min(s, k)
            elif s > k:
                raise ValueError(
                    f"{name}: stride {self.stride} is larger than the window ({k}) on axis {axis} of the "
                    f"{_grid_str(grid)} grid; use stride <= window"
                )
            out.append(_Axis(length=length, kernel=k, stride=s, dilation=d, causal=c))
        return tuple(out)

    def kernel_size(self, grid: tuple[int, ...]) -> tuple[int, ...]:
        """Resolved kernel per axis (what NATTEN's ``kernel_size`` would be)."""
        return tuple(a.kernel for a in self.axes(grid))

    def mask_mod(self, grid: tuple[int, ...]) -> PositionMaskMod:
        axes = self.axes(grid)
        grid = tuple(a.length for a in axes)

        def mask_mod(q_pos: Tensor, kv_pos: Tensor) -> Tensor:
            out = None
            for ax, x, y in zip(axes, _coords(q_pos, grid), _coords(kv_pos, grid)):
                m = ax.mask(x, y)
                out = m if out is None else out & m
            return out

        return mask_mod

    def block_relation(self, grid: tuple[int, ...], block_size: int) -> tuple[Tensor, Tensor]:
        axes = self.axes(grid)
        return _product_block_relation(tuple(a.length for a in axes), block_size, [a.predicate for a in axes])


def inward_window(half_sizes: int | None | tuple[int | None, ...]) -> SlidingWindow:
    """FreeSwim's inward window: ``2 * d + 1`` tokens per axis, shifted inward near borders (NATTEN's clamp).

    ``half_sizes`` per axis (FreeSwim: ``floor(h0 / 2), floor(w0 / 2)`` of the model's native latent grid);
    ``None`` = the whole axis, e.g. ``inward_window((None, 15, 26))`` for a video whose frames all see each other.
    Windows larger than the grid cover the whole axis (``clip_to_grid``), as FreeSwim's do at native size.
    """
    per_axis = half_sizes if isinstance(half_sizes, (tuple, list)) else (half_sizes,)
    for d in per_axis:
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 0):
            raise ValueError(f"inward_window: half sizes must be ints >= 0 or None, got {half_sizes!r}")
    window = tuple(None if d is None else 2 * d + 1 for d in per_axis)
    return SlidingWindow(window if isinstance(half_sizes, (tuple, list)) else window[0], clip_to_grid=True)
