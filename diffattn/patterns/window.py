"""Static window patterns over raster-ordered token grids.

- :class:`SlidingWindow`: neighborhood attention with NATTEN / GNA semantics (kernel, stride, dilation, causal,
  border-clamped windows); :func:`inward_window` expresses FreeSwim's inward windows with it.
- :class:`ShiftedWindow`: HiDiffusion's MSW-MSA (a few big windows with a cyclic shift, no Swin mask).
- :class:`Radial`: Radial Attention's block-level energy-decay mask for videos.

Block relations are derived per axis from the boxes that each raster block covers (a run of consecutive raster
positions is a union of at most ``2 * ndim - 1`` axis-aligned boxes), never from an n x n token tensor.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Pattern, PositionMaskMod, blocks_of, check_grid

__all__ = [
    "SlidingWindow",
    "inward_window",
    "ShiftedWindow",
    "hidiffusion_shift",
    "Radial",
    "radial_density",
]


# An axis predicate maps per-axis coordinate intervals A = [a0, a1], B = [b0, b1] (broadcastable int64 tensors) to
# (exists, forall): some / every (x in A, y in B) pair is allowed on that axis.
_AxisPredicate = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]

_MAX_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------------------------------
# shared helpers


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


# --------------------------------------------------------------------------------------------------------------------
# SlidingWindow (NATTEN / GNA)


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


# --------------------------------------------------------------------------------------------------------------------
# ShiftedWindow (HiDiffusion MSW-MSA)


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


# --------------------------------------------------------------------------------------------------------------------
# Radial Attention


def _bitlen(x: int) -> int:
    return int(x).bit_length()


def _pair_rule(
    i: int, j: int, tokens: int, decay: float, block: int, sink: bool, band_frames: int, faithful: bool = False
):
    """Pre-shrink token mask of frame pair (i, j): ``"dense"``, ``"empty"`` or the integer band half-width W
    (token p of frame i sees token q of frame j iff ``|p - q| <= W``)."""
    if sink and j == 0:
        return "dense"
    d = abs(i - j)
    exponent = _bitlen(tokens) - _bitlen(d)  # lambda(d) = 2**exponent
    # Diagonal split: lambda < 128 (hard-coded, also for 64-token blocks) keeps only distances that are multiples of
    # 128 / lambda (a power of two). The authors apply it to every pair but the sink, neighbouring frames included
    # (it reaches d = 1 only when S_f < 128); diffattn's earlier rule (faithful=False) never splits the dense band.
    split_off = exponent < 7 and d % (1 << (7 - exponent)) != 0
    if d <= band_frames:
        return "empty" if faithful and split_off else "dense"
    if split_off:
        return "empty"
    width = max(float(block), math.ldexp(decay, exponent))
    width = int(math.floor(width))
    return "dense" if width >= tokens - 1 else width


def _shrink_pair(rule, tokens: int, block: int, row_off: int, col_off: int) -> Tensor:
    """Block shrink of one pair's token mask placed at (row_off, col_off) in a canvas of whole blocks: a column of a
    tile is high density if more than a third of the tile's rows are set; the tile is kept if more than 60 % of its
    non-empty columns are high density. Counts are computed from the band geometry, not from the token mask."""
    n_rows = blocks_of(row_off + tokens, block)
    n_cols = blocks_of(col_off + tokens, block)
    tile_rows = torch.arange(n_rows) * block - row_off
    p_lo = tile_rows.clamp(min=0)[:, None, None]
    p_hi = (tile_rows + block - 1).clamp(max=tokens - 1)[:, None, None]
    q = (torch.arange(n_cols)[:, None] * block + torch.arange(block)[None, :] - col_off)[None]  # (1, cols, block)
    valid = (q >= 0) & (q < tokens)
    if rule == "dense":
        count = (p_hi - p_lo + 1).expand(n_rows, n_cols, block)
    else:
        count = (torch.minimum(p_hi, q + rule) - torch.maximum(p_lo, q - rule) + 1).clamp(min=0)
    count = torch.where(valid, count, torch.zeros((), dtype=count.dtype))
    nonempty = (count > 0).sum(dim=-1)
    high = (3 * count > block).sum(dim=-1)
    return 5 * high > 3 * nonempty


@functools.lru_cache(maxsize=32)
def _radial_kept(
    frames: int, tokens: int, decay: float, block: int, sink: bool, band_frames: int, faithful: bool
) -> Tensor:
    n = frames * tokens
    nb = blocks_of(n, block)
    kept = torch.zeros(nb, nb, dtype=torch.bool)
    shrunk: dict = {}
    # The authors' generator pads each pair's canvas to ceil(S_f / b) blocks after the offset and keeps only those,
    # so a pair that straddles one more block (offset + S_f > that) loses its tail tiles; diffattn's earlier rule
    # (faithful=False) keeps every block the pair touches.
    limit = blocks_of(tokens, block) if faithful else None
    for i in range(frames):
        for j in range(frames):
            rule = _pair_rule(i, j, tokens, decay, block, sink, band_frames, faithful)
            if rule == "empty":
                continue
            r, c = (i * tokens) % block, (j * tokens) % block
            key = (rule, r, c)
            if key not in shrunk:
                shrunk[key] = _shrink_pair(rule, tokens, block, r, c)
            tile = shrunk[key][:limit, :limit]
            r0, c0 = (i * tokens) // block, (j * tokens) // block
            kept[r0 : r0 + tile.shape[0], c0 : c0 + tile.shape[1]] |= tile
    # Kept in both modes (not in the authors' code): the diagonal block, so no query is left without keys. It
    # changes nothing when frames are whole blocks (d = 0 is dense); it matters where the block shrink drops a
    # row's only blocks (frames shorter than a block, or the tail tiles the faithful rule drops).
    kept |= torch.eye(nb, dtype=torch.bool)
    return kept


def _check_radial_args(owner: str, decay, block_size, frame_sink, dense_band_frames, faithful=False) -> None:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not math.isfinite(decay) or decay <= 0:
        raise ValueError(
            f"{owner}: decay must be a positive number (γ, e.g. 0.2 for Wan, 0.95 for HunyuanVideo), got {decay!r}"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{owner}: block_size must be a positive int (128 or 64 upstream), got {block_size!r}")
    if not isinstance(frame_sink, bool):
        raise ValueError(
            f"{owner}: frame_sink must be a bool (True for Wan, False for HunyuanVideo), got {frame_sink!r}"
        )
    if isinstance(dense_band_frames, bool) or not isinstance(dense_band_frames, int) or dense_band_frames < 0:
        raise ValueError(f"{owner}: dense_band_frames must be an int >= 0, got {dense_band_frames!r}")
    if not isinstance(faithful, bool):
        raise ValueError(
            f"{owner}: faithful must be a bool (True: the authors' block shrink, False: diffattn's, which keeps the "
            f"tail blocks of frames that straddle a block), got {faithful!r}"
        )


def radial_density(
    frames: int,
    tokens_per_frame: int,
    decay: float = 1.0,
    block_size: int = 128,
    *,
    frame_sink: bool = True,
    dense_band_frames: int = 1,
    faithful: bool = False,
) -> float:
    """Fraction of video token pairs Radial Attention computes (its kept blocks, last partial block counted by its
    real tokens; equal to the kept-block fraction when the token count is a multiple of ``block_size``).
    ``faithful``: the authors' block shrink or diffattn's (see :class:`Radial`)."""
    _check_radial_args("radial_density", decay, block_size, frame_sink, dense_band_frames, faithful)
    if frames < 1 or tokens_per_frame < 1:
        raise ValueError(
            f"radial_density: frames and tokens_per_frame must be positive, got {frames}, {tokens_per_frame}"
        )
    kept = _radial_kept(frames, tokens_per_frame, float(decay), block_size, frame_sink, dense_band_frames, faithful)
    n = frames * tokens_per_frame
    sizes = torch.full((kept.shape[0],), block_size, dtype=torch.float64)
    sizes[-1] = n - block_size * (kept.shape[0] - 1)
    return float(sizes @ kept.to(torch.float64) @ sizes) / (n * n)


@dataclass(frozen=True)
class Radial(Pattern):
    """Radial Attention: a static block mask whose spatial band shrinks exponentially with frame distance.

    Grid ``(f, h, w)`` (any grid whose first axis is frames; tokens per frame S_f = product of the others). For each
    frame pair (i, j), d = |i - j|: j = 0 is fully kept when ``frame_sink`` (Wan); d <= ``dense_band_frames`` is
    fully kept; otherwise token p of frame i sees token q of frame j iff |p - q| <= max(b, 2**bitlen(S_f) /
    2**bitlen(d) * decay) (1-D indices in the frame), and, if lambda = 2**bitlen(S_f) / 2**bitlen(d) < 128, only when
    d is a multiple of 128 / lambda. Each pair's token mask is shrunk to ``block_size`` blocks at its canvas offset
    (a tile is kept when more than 60 % of its non-empty columns have more than a third of the tile's rows set) and
    OR-ed into the global block mask. The mask is block-level: ``mask_mod`` looks up the kept blocks.

    ``faithful=True`` is the authors' generator (``gen_log_mask_shrinked``) in the two points where diffattn's rule
    (``faithful=False``, the default: it measured better on the embedded video model, see the README) differs:
    (1) a pair's canvas is padded to ``ceil(S_f / b)`` blocks from its offset and only those are kept, so where a
    frame is not a whole number of blocks (Wan 480p: S_f = 1,560) the tail of a pair that straddles one more block
    is dropped (diffattn shrinks every block the pair touches: +48..67 blocks of ~13-19k at 16 x 1,560 tokens,
    b = 128); (2) the diagonal split also applies to the dense band, which empties neighbouring frames (d = 1) when
    S_f < 128. Both rules give the same mask when S_f is a multiple of ``block_size`` and at least 128. In both, the
    diagonal block is always kept (the authors' mask can lack it), so no query is left without keys.
    """

    decay: float = 1.0
    block_size: int = 128
    frame_sink: bool = True
    dense_band_frames: int = 1
    faithful: bool = False

    def __post_init__(self) -> None:
        _check_radial_args(
            type(self).__name__, self.decay, self.block_size, self.frame_sink, self.dense_band_frames, self.faithful
        )
        object.__setattr__(self, "decay", float(self.decay))

    def _frames(self, grid: tuple[int, ...]) -> tuple[int, int]:
        name = type(self).__name__
        grid = check_grid(grid, None, name)
        if len(grid) < 2:
            raise ValueError(
                f"{name} is a video pattern: the token grid must be (frames, height, width), got {grid}; "
                "use SlidingWindow or ShiftedWindow for images"
            )
        return grid[0], math.prod(grid[1:])

    def pair_rule(self, grid: tuple[int, ...], i: int, j: int):
        """The pre-shrink token mask of frames (i, j): ``"dense"``, ``"empty"`` or the band half-width (int)."""
        frames, tokens = self._frames(grid)
        if not (0 <= i < frames and 0 <= j < frames):
            raise ValueError(f"{type(self).__name__}: frame pair ({i}, {j}) outside 0..{frames - 1}")
        return _pair_rule(
            i, j, tokens, self.decay, self.block_size, self.frame_sink, self.dense_band_frames, self.faithful
        )

    def kept_blocks(self, grid: tuple[int, ...]) -> Tensor:
        """Kept blocks ``(nb, nb)`` of ``block_size`` raster tokens (a fresh tensor)."""
        frames, tokens = self._frames(grid)
        kept = _radial_kept(
            frames, tokens, self.decay, self.block_size, self.frame_sink, self.dense_band_frames, self.faithful
        )
        return kept.clone()

    def density(self, grid: tuple[int, ...]) -> float:
        frames, tokens = self._frames(grid)
        return radial_density(
            frames,
            tokens,
            self.decay,
            self.block_size,
            frame_sink=self.frame_sink,
            dense_band_frames=self.dense_band_frames,
            faithful=self.faithful,
        )

    def mask_mod(self, grid: tuple[int, ...]) -> PositionMaskMod:
        kept = self.kept_blocks(grid)
        b, last = self.block_size, kept.shape[0] - 1

        def mask_mod(q_pos: Tensor, kv_pos: Tensor) -> Tensor:
            table = kept if kept.device == q_pos.device else kept.to(q_pos.device)  # positions may live on a GPU
            return table[(q_pos // b).clamp(max=last), (kv_pos // b).clamp(max=last)]

        return mask_mod

    def block_relation(self, grid: tuple[int, ...], block_size: int) -> tuple[Tensor, Tensor]:
        """``any_ == full == kept`` at the pattern's block size; at another block size the relation is re-blocked
        exactly (the token mask is constant on the pattern's blocks)."""
        kept = self.kept_blocks(grid)
        if block_size == self.block_size:
            return kept, kept.clone()
        if block_size < 1:
            raise ValueError(f"block_size must be a positive number of tokens, got {block_size}")
        frames, tokens = self._frames(grid)
        n = frames * tokens
        starts = torch.arange(0, n, block_size)
        first = starts // self.block_size
        last = (starts + block_size - 1).clamp(max=n - 1) // self.block_size
        prefix = torch.zeros(kept.shape[0] + 1, kept.shape[1] + 1, dtype=torch.int64)
        prefix[1:, 1:] = kept.to(torch.int64).cumsum(0).cumsum(1)
        r0, r1 = first[:, None], last[:, None] + 1
        c0, c1 = first[None, :], last[None, :] + 1
        count = prefix[r1, c1] - prefix[r0, c1] - prefix[r1, c0] + prefix[r0, c0]
        area = (r1 - r0) * (c1 - c0)
        return count > 0, count == area
