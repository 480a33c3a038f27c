"""Static sparse attention methods: a pattern, compiled to a ``BlockMask``, computed by a block-sparse kernel."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
from torch import Tensor

import diffattn_kernels as kernels

from ..context import AttentionContext
from ..errors import LayoutError, MethodConfigError
from ..layout import TokenLayout
from ..patterns.base import Pattern
from ..patterns.compile import CompiledPattern, compile_pattern
from ..patterns.radial import Radial
from ..patterns.shifted_window import ShiftedWindow, hidiffusion_shift
from ..patterns.sliding_window import SlidingWindow
from ..patterns.tile import SlidingTile
from .base import SELF_AND_JOINT, AttentionMethod
from .checks import check_block_size, check_int, check_number, check_per_axis, check_roles_arg, given

__all__ = [
    "SparseAttention",
    "SlidingTileAttention",
    "SlidingWindowAttention",
    "ShiftedWindowAttention",
    "RadialAttention",
    "HIDIFFUSION_LAYERS",
    "text_padding_per_batch",
    "block_attention",
]

_SPARSE_ROLES = SELF_AND_JOINT


def text_padding_per_batch(attn_mask: Tensor | None, layout: TokenLayout, batch: int, layer: str) -> list[int]:
    """Number of trailing padded text tokens of each batch entry, from a boolean key-padding mask.

    Sparse kernels share one block mask across the batch, so the only stock masks they take are key-padding
    masks on the end of the text run (HunyuanVideo's); anything else is refused rather than ignored.
    """
    if attn_mask is None:
        return [0] * batch
    refuse = LayoutError(
        f"{layer}: sparse attention takes no attention mask except key padding of trailing text tokens; this call "
        f"has a {tuple(attn_mask.shape)} {attn_mask.dtype} mask. Apply the method to other layers (layers=...) or "
        "use Masked for arbitrary masks."
    )
    if attn_mask.dtype != torch.bool or attn_mask.ndim != 4 or attn_mask.shape[1] != 1:
        raise refuse
    keys = attn_mask[:, 0].expand(batch, -1, -1)  # (B, Sq or 1, Skv)
    if not bool((keys == keys[:, :1]).all()):
        raise refuse
    keys = keys[:, 0]
    paddings = []
    for row in keys:
        invalid = torch.nonzero(~row).flatten()
        pad = int(invalid.numel())
        expected = torch.arange(layout.text_start + layout.text_len - pad, layout.text_start + layout.text_len)
        if pad > layout.text_len or not torch.equal(invalid.cpu(), expected):
            raise refuse
        paddings.append(pad)
    return paddings


def block_attention(q: Tensor, k: Tensor, v: Tensor, block_mask, *, scale: float | None, backend: str) -> Tensor:
    """``kernels.attention`` (no lse) with the NaN / Inf behaviour of dense attention restricted to the mask.

    A query with a NaN / Inf, or one that sees a key with one, gets what the kernel computes (NaN, as dense
    attention); a NaN / Inf in a value a query sees reaches that output entry as in ``p @ v``; keys and values a
    query does not see never reach it. Kernels compute whole blocks and mask inside them (``0 * nan = nan``), so
    when the output is not finite the call is redone on cleaned inputs; otherwise the cost is one sum of the output.
    """

    def attend(q_: Tensor, k_: Tensor, v_: Tensor) -> Tensor:
        return kernels.attention(q_, k_, v_, block_mask, scale=scale, backend=backend, return_lse=False)[0]

    out = attend(q, k, v)
    # non-finite iff an entry is (or on overflow, which only costs the checks below); ~7x cheaper than isfinite().all()
    if bool(torch.isfinite(out.sum(dtype=torch.float32 if out.dtype == torch.float16 else None))):
        return out
    k_ok, v_ok = torch.isfinite(k).all(-1, keepdim=True), torch.isfinite(v)
    if bool(k_ok.all()) and bool(v_ok.all()):
        return out  # non-finite queries or overflow: nothing hidden can have leaked
    zq, zk = torch.zeros_like(q), torch.zeros_like(k)

    def seen(flags: Tensor) -> Tensor:  # which outputs see a flagged key / value entry (uniform weights)
        return attend(zq, zk, flags.to(v.dtype).expand(v.shape).contiguous()) > 0

    fixed = attend(q, torch.where(k_ok, k, 0.0), torch.where(v_ok, v, 0.0))
    pos, neg = seen(v == float("inf")), seen(v == float("-inf"))
    fixed = torch.where(pos, float("inf"), torch.where(neg, float("-inf"), fixed))
    fixed = torch.where(seen(torch.isnan(v)) | (pos & neg), float("nan"), fixed)
    natural = ~torch.isfinite(q).all(-1, keepdim=True) | seen(~k_ok)
    return torch.where(natural, out, fixed)


def _grid_words(grid: tuple[int, ...]) -> tuple[str, str]:
    """(``"video"`` / ``"image"`` / ``"N-D"``, the axis names) of a token grid, for messages."""
    return {3: ("video", "(frames, height, width)"), 2: ("image", "(height, width)")}.get(
        len(grid), (f"{len(grid)}-D", f"({len(grid)} axes)")
    )


def _axis_names(grid: tuple[int, ...]) -> tuple[str, ...]:
    return {3: ("frames", "height", "width"), 2: ("height", "width")}.get(
        len(grid), tuple(f"axis {a}" for a in range(len(grid)))
    )


def config_error(owner: str, ctx: AttentionContext, problem: str, fix: str) -> MethodConfigError:
    """A :class:`MethodConfigError` naming the method, the layer, its grid, what is wrong and the fix."""
    return MethodConfigError(f"{owner} on layer {ctx.layer} ({ctx.q_layout.describe()}): {problem}. Fix: {fix}")


@dataclass(frozen=True)
class SparseAttention(AttentionMethod):
    """Attention restricted to ``pattern`` over the visual tokens; text tokens of joint attention stay dense.

    ``pattern``: a pattern of :mod:`diffattn.patterns` (``SlidingWindow``, ``ShiftedWindow``, ``Radial``,
    ``SlidingTile``, or ``Union`` / ``Intersection`` / ``PerHead`` of them). ``backend``: ``"auto"`` (fastest
    supported), ``"torch"``, ``"flex"``, ``"flex-compiled"``, ``"triton"`` (fused block-sparse flash attention,
    CUDA), ``"xformers"`` (dense / local masks, CUDA) or ``"reference"``; see :mod:`diffattn_kernels`. Acts on
    self and joint attention; cross-attention stays dense. The pattern is checked against each layer's grid
    before its first call (:class:`~diffattn.errors.MethodConfigError`).

    NaN / Inf are propagated as dense attention with the same mask would: a query row with one gives NaN, a key or
    value with one reaches the queries that see it, and never a query the pattern hides it from
    (:func:`block_attention`).
    """

    pattern: Pattern | None = None
    backend: str = "auto"
    block_size: int = 128
    roles: frozenset[str] = field(default=_SPARSE_ROLES)

    def __post_init__(self) -> None:
        object.__setattr__(self, "roles", check_roles_arg(self.roles, self.name, _SPARSE_ROLES))
        if not isinstance(self.backend, str) or (self.backend != "auto" and self.backend not in kernels.BACKENDS):
            raise ValueError(
                f"{self.name}: unknown backend {given(self.backend)}; choose from {['auto', *kernels.BACKENDS]}"
            )
        object.__setattr__(self, "block_size", check_block_size(self.name, self.block_size))
        own_pattern = type(self).pattern_for is not SparseAttention.pattern_for
        if own_pattern and self.pattern is not None:
            raise ValueError(
                f"{self.name} builds its pattern from its own parameters; pass pattern= to SparseAttention instead"
            )
        if not own_pattern and not isinstance(self.pattern, Pattern):
            raise (ValueError if self.pattern is None else TypeError)(
                f"{self.name} needs a pattern, got {self.pattern!r}: SparseAttention(pattern=...) with a pattern "
                "from diffattn.patterns (SlidingWindow, ShiftedWindow, Radial, SlidingTile, or Union / "
                "Intersection / PerHead of them), or use SlidingWindowAttention, SlidingTileAttention, "
                "ShiftedWindowAttention or RadialAttention"
            )

    def pattern_for(self, ctx: AttentionContext) -> Pattern:
        return self.pattern

    def fix_for(self, grid: tuple[int, ...]) -> str:
        """How to make the parameters fit ``grid`` (for :meth:`validate`'s message)."""
        kind, axes = _grid_words(grid)
        return f"give the pattern one value per axis {axes} of this {kind} grid, or a single int for all axes"

    def validate(self, ctx: AttentionContext) -> None:
        """Compile the pattern for this layer's layout now (cached: on CPU the first call reuses it), so parameters
        that do not fit the grid fail before any attention, naming the layer, the grid and the fix."""
        if not ctx.q_layout.grid or ctx.q_layout != ctx.kv_layout:
            return  # the call refuses these itself (LayoutError)
        try:
            self.compiled(ctx, 0, "cpu")
        except ValueError as e:
            raise config_error(self.name, ctx, str(e), self.fix_for(ctx.q_layout.grid)) from e

    def block_size_for(self, pattern: Pattern, grid: tuple[int, ...]) -> int:
        return self.block_size

    def pattern_for_heads(self, ctx: AttentionContext, heads: int) -> Pattern:
        """The pattern for the ``heads`` heads of this call: a per-head pattern is sliced to the call's heads
        (``ctx.head_offset`` onwards) when context parallelism gave this rank only some of the layer's heads."""
        pattern = self.pattern_for(ctx)
        pattern_heads = pattern.num_heads()
        if pattern_heads is None:
            return pattern
        total = ctx.total_heads if ctx.total_heads is not None else heads
        if pattern_heads != total:
            raise LayoutError(
                f"{self.name} on {ctx.layer}: the per-head pattern has {pattern_heads} heads but the layer has "
                f"{total}; give one pattern per head"
            )
        if heads == total:
            return pattern
        if not callable(getattr(pattern, "slice", None)):
            raise LayoutError(
                f"{self.name} on {ctx.layer}: this rank holds heads {ctx.head_offset}..{ctx.head_offset + heads - 1} "
                f"of {total} (context parallelism), but a {type(pattern).__name__} pattern cannot be sliced by head; "
                "put the per-head choice at the top (patterns.compose.PerHead of shared patterns)"
            )
        return pattern.slice(ctx.head_offset, ctx.head_offset + heads)

    def compiled(
        self, ctx: AttentionContext, text_padding: int, device: torch.device, pattern: Pattern | None = None
    ) -> CompiledPattern:
        pattern = self.pattern_for(ctx) if pattern is None else pattern
        block = self.block_size_for(pattern, ctx.q_layout.grid)
        return compile_pattern(pattern, ctx.q_layout, block_size=block, text_padding=text_padding, device=device)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        if ctx.q_layout != ctx.kv_layout or ctx.q_range is not None:
            raise LayoutError(f"{self.name} needs queries and keys over the same tokens ({ctx.layer} is {ctx.role})")
        paddings = text_padding_per_batch(ctx.attn_mask, ctx.q_layout, q.shape[0], ctx.layer)
        pattern = self.pattern_for_heads(ctx, q.shape[1])
        out = torch.empty_like(q)
        densities = []
        for pad in sorted(set(paddings)):
            rows = [b for b, p in enumerate(paddings) if p == pad]
            sel = slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else rows
            plan = self.compiled(ctx, pad, q.device, pattern)
            qk, kk, vk = (x[sel].index_select(-2, plan.gather) for x in (q, k, v))
            o = block_attention(qk, kk, vk, plan.block_mask, scale=ctx.scale, backend=self.backend)
            out[sel] = o.index_select(-2, plan.scatter)
            densities.append(plan.density)
        ctx.report(density=sum(densities) / len(densities))
        return out


@dataclass(frozen=True)
class SlidingTileAttention(SparseAttention):
    """Sliding tile attention: tokens grouped into ``tile``-shaped tiles; each query tile attends the ``window``
    tiles around it (clamped inward at borders). Every kernel block is full or empty (block size = tile volume).

    ``tile`` and ``window`` take an int (all axes) or one value per axis of the layer's grid, e.g.
    ``tile=(4, 4, 8), window=(1, 3, 4)`` for video ``(f, h, w)`` grids or ``tile=(8, 16), window=3`` for images.
    """

    tile: int | tuple[int, ...] = (4, 4, 8)
    window: int | tuple[int, ...] = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "tile", check_per_axis(self.name, "tile", self.tile, example=(2, 4, 4)))
        object.__setattr__(self, "window", check_per_axis(self.name, "window", self.window, example=(1, 3, 3)))
        SlidingTile(self.tile, self.window)  # validate now

    def pattern_for(self, ctx: AttentionContext) -> Pattern:
        return SlidingTile(self.tile, self.window)

    def block_size_for(self, pattern: Pattern, grid: tuple[int, ...]) -> int:
        return pattern.tile_volume(grid)

    def validate(self, ctx: AttentionContext) -> None:
        """Besides the grid check of :meth:`SparseAttention.validate`: a tile wider than an axis of the grid pads
        that axis into one tile; where the window then covers every tile on every axis, the layer would silently get
        dense attention (computing the padding too), so that is refused. (A window alone that covers a small grid is
        taken: the tiles fit, so the parameters say what they do.)"""
        super().validate(ctx)
        grid = ctx.q_layout.grid
        if not grid or ctx.q_layout != ctx.kv_layout:
            return
        tile = (self.tile,) * len(grid) if isinstance(self.tile, int) else self.tile
        window = (self.window,) * len(grid) if isinstance(self.window, int) else self.window
        tiles = [-(-n // t) for t, n in zip(tile, grid)]
        wide = [f"{name} ({t} > {n})" for name, t, n in zip(_axis_names(grid), tile, grid) if t > n]
        if wide and all(w >= k for w, k in zip(window, tiles)):
            kind, _ = _grid_words(grid)
            smaller = tuple(max(1, n // 2) for n in grid)
            raise config_error(
                self.name,
                ctx,
                f"tile {self.tile} is larger than the grid on {', '.join(wide)}: one padded tile covers that axis "
                f"and window {self.window} covers the tiles of the others, so attention here would be dense (and "
                "compute the padding)",
                f"use a tile smaller than this {kind} grid and a window of fewer tiles than the axis holds, e.g. "
                f"tile={smaller}, window=1; or leave this layer out (layers=...), or use Dense() for dense attention",
            )

    def fix_for(self, grid: tuple[int, ...]) -> str:
        kind, axes = _grid_words(grid)
        tile = tuple(min(t, n) for t, n in zip(((4, 4, 8) if len(grid) == 3 else (8,) * len(grid)), grid))
        window = self.window if isinstance(self.window, int) else 3
        return (
            f"use a {len(grid)}-value tile {axes} on this {kind} grid (and a window of one int or "
            f"{len(grid)} values), e.g. tile={tile}, window={window}"
        )


@dataclass(frozen=True)
class SlidingWindowAttention(SparseAttention):
    """Neighborhood attention with NATTEN semantics: ``window`` tokens per axis around each query (clamped inward
    at the borders so every query sees a full window), optional ``stride`` (generalized neighborhood attention:
    queries in runs of ``stride`` share a window) and ``dilation``. Ints apply to every axis. ``clip_to_grid``:
    a window larger than the grid is reduced to the whole axis instead of raising (see ``patterns.SlidingWindow``)."""

    window: int | tuple[int, ...] = 7
    stride: int | tuple[int, ...] = 1
    dilation: int | tuple[int, ...] = 1
    clip_to_grid: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        SlidingWindow(self.window, self.stride, self.dilation, clip_to_grid=self.clip_to_grid)  # validate now

    def pattern_for(self, ctx: AttentionContext) -> Pattern:
        return SlidingWindow(self.window, self.stride, self.dilation, clip_to_grid=self.clip_to_grid)

    def fix_for(self, grid: tuple[int, ...]) -> str:
        kind, axes = _grid_words(grid)
        window = tuple(min(w, n) for w, n in zip(((3, 7, 7) if len(grid) == 3 else (7,) * len(grid)), grid))
        return (
            f"use a {len(grid)}-value window {axes} on this {kind} grid (stride and dilation too, if given per "
            f"axis), e.g. window={window}, or clip_to_grid=True to shrink windows larger than the grid"
        )


@dataclass(frozen=True)
class ShiftedWindowAttention(SparseAttention):
    """HiDiffusion's MSW-MSA: self-attention inside a ``windows`` grid of windows (2 x 2: a quarter of the cost),
    cyclically shifted by a fraction of the window drawn per (step, layer) from ``seed`` (never the global RNG),
    or a fixed ``shift`` fraction. Odd sizes need no resizing. Use it on a UNet's highest-resolution
    self-attention (see ``HIDIFFUSION_LAYERS``).

    ``faithful=True`` (default) shifts by HiDiffusion's ``(window // 4) * k`` tokens for the fraction ``k / 4``
    (fixed ``shift`` must then be 0, 0.25, 0.5 or 0.75); ``faithful=False`` by diffattn's earlier
    ``floor(fraction * window)``. They differ only for windows that are not a multiple of 4 tokens
    (see ``ShiftedWindow.from_fraction``)."""

    windows: int | tuple[int, ...] = (2, 2)
    shift: float | None = None
    seed: int = 0
    faithful: bool = True
    roles: frozenset[str] = field(default=frozenset({"self"}))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shift is not None:
            shift = check_number(
                self.name,
                "shift",
                self.shift,
                low=0.0,
                high=1.0,
                high_open=True,
                example=0.25,
                meaning="a fraction of the window (None: drawn per step from seed)",
            )
            object.__setattr__(self, "shift", shift)
        object.__setattr__(self, "seed", check_int(self.name, "seed", self.seed, example=0))
        object.__setattr__(self, "windows", check_per_axis(self.name, "windows", self.windows, example=(2, 2)))
        ShiftedWindow(windows=self.windows)  # validate the window counts now
        if not isinstance(self.faithful, bool):
            raise ValueError(f"ShiftedWindowAttention: faithful must be a bool, got {self.faithful!r}")
        if self.faithful and self.shift is not None and 4 * self.shift != int(4 * self.shift):
            raise ValueError(
                f"ShiftedWindowAttention: HiDiffusion's shift rule (faithful=True) takes a quarter of the window "
                f"(0, 0.25, 0.5 or 0.75), got shift={self.shift}; pass faithful=False for floor(shift * window)"
            )

    def pattern_for(self, ctx: AttentionContext) -> Pattern:
        if self.shift is None and ctx.step is None:
            raise config_error(
                self.name,
                ctx,
                "the window shift is drawn per denoising step, and this call has no "
                "step (the model ran outside a pipeline's loop)",
                "run it in a pipeline, inside "
                "diffattn.denoising_step(i, num_steps), or give a fixed shift=, e.g. shift=0.25",
            )
        fraction = self.shift if self.shift is not None else hidiffusion_shift(ctx.step, ctx.layer, self.seed)
        return ShiftedWindow.from_fraction(ctx.q_layout.grid, fraction, self.windows, faithful=self.faithful)

    def validate(self, ctx: AttentionContext) -> None:
        super().validate(replace(ctx, step=0))  # the shift changes with the step, the windows it checks do not

    def fix_for(self, grid: tuple[int, ...]) -> str:
        windows = tuple(min(2, n) for n in grid[-2:])
        return (
            f"give one window count per spatial axis, at most the tokens on that axis, e.g. windows={windows}, "
            "or leave this layer out (layers=..., e.g. HIDIFFUSION_LAYERS)"
        )


# HiDiffusion's MSW-MSA layers (the highest-resolution transformer blocks), for diffattn.apply(layers=...).
HIDIFFUSION_LAYERS = {
    "sd15": [
        r"down_blocks\.0\.attentions\.[01]\.transformer_blocks\.0\.attn1",
        r"up_blocks\.3\.attentions\.[012]\.transformer_blocks\.0\.attn1",
    ],
    "sdxl": [
        r"down_blocks\.1\.attentions\.[01]\.transformer_blocks\.\d+\.attn1",
        r"up_blocks\.1\.attentions\.[012]\.transformer_blocks\.\d+\.attn1",
    ],
}


@dataclass(frozen=True)
class RadialAttention(SparseAttention):
    """Radial Attention for video: dense within neighbouring frames, a band that shrinks exponentially with frame
    distance (``decay``), optional first-frame sink; block-level (``block_size`` 128 or 64). Text stays dense.

    ``faithful=True`` reproduces the authors' mask: their block shrink drops the tail blocks of frame pairs that
    straddle one more block than ``ceil(S_f / block_size)`` (Wan 480p), and their diagonal split empties
    neighbouring frames when a frame has fewer than 128 tokens. ``faithful=False`` (default, diffattn's rule; it
    measured better on the embedded video model) keeps both. Equal when the tokens per frame are a multiple of the
    block and at least 128; see ``patterns.Radial``."""

    decay: float = 1.0
    frame_sink: bool = True
    dense_band_frames: int = 1
    faithful: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._radial()  # validate now

    def _radial(self) -> Radial:
        return Radial(self.decay, self.block_size, self.frame_sink, self.dense_band_frames, self.faithful)

    def pattern_for(self, ctx: AttentionContext) -> Pattern:
        return self._radial()

    grid_kinds: ClassVar[frozenset[str]] = frozenset({"video"})

    def validate(self, ctx: AttentionContext) -> None:
        """Refuse grids that are not ``(frames, height, width)``: Radial Attention is a video method, and on an image
        grid its frame rules would take rows for frames. (``SparseAttention(pattern=patterns.Radial(...))`` still
        takes any grid whose first axis is meant as frames.)"""
        grid = ctx.q_layout.grid
        if grid and ctx.q_layout == ctx.kv_layout and len(grid) != 3:
            kind, axes = _grid_words(grid)
            raise config_error(
                self.name,
                ctx,
                f"Radial Attention is a video method (a (frames, height, width) grid), but this layer's grid {grid} "
                f"is {kind} {axes}: its first axis would be taken for frames",
                self.fix_for(grid),
            )
        super().validate(ctx)

    def fix_for(self, grid: tuple[int, ...]) -> str:
        return (
            "apply RadialAttention to video models (a (frames, height, width) grid); on image models use "
            "SlidingWindowAttention or ShiftedWindowAttention"
        )
