"""Static sparse attention methods: a pattern, compiled to a ``BlockMask``, computed by a block-sparse kernel."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import kernels
from ..context import AttentionContext
from ..errors import LayoutError
from ..layout import TokenLayout
from ..patterns.base import Pattern
from ..patterns.compile import CompiledPattern, compile_pattern
from ..patterns.tile import SlidingTile
from ..patterns.window import Radial, ShiftedWindow, SlidingWindow, hidiffusion_shift
from .base import SELF_AND_JOINT, AttentionMethod, check_roles

__all__ = [
    "SparseAttention",
    "SlidingTileAttention",
    "SlidingWindowAttention",
    "ShiftedWindowAttention",
    "RadialAttention",
    "HIDIFFUSION_LAYERS",
    "text_padding_per_batch",
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


@dataclass(frozen=True)
class SparseAttention(AttentionMethod):
    """Attention restricted to ``pattern`` over the visual tokens; text tokens of joint attention stay dense.

    ``backend``: ``"auto"`` (fastest supported), ``"torch"``, ``"flex"``, ``"flex-compiled"``, ``"triton"`` (fused
    block-sparse flash attention, CUDA), ``"xformers"`` (dense / local masks, CUDA) or ``"reference"``; see
    :mod:`diffattn.kernels`. Acts on self and joint attention; cross-attention stays dense.
    """

    pattern: Pattern | None = None
    backend: str = "auto"
    block_size: int = 128
    roles: frozenset[str] = field(default=_SPARSE_ROLES)

    def __post_init__(self) -> None:
        object.__setattr__(self, "roles", check_roles(self.roles, self.name, _SPARSE_ROLES))
        if self.backend != "auto" and self.backend not in kernels.BACKENDS:
            raise ValueError(f"{self.name}: unknown backend {self.backend!r}; choose from {['auto', *kernels.BACKENDS]}")
        if self.block_size < 1:
            raise ValueError(f"{self.name}: block_size must be positive, got {self.block_size}")

    def pattern_for(self, ctx: AttentionContext) -> Pattern:
        if self.pattern is None:
            raise ValueError(f"{self.name}: no pattern given")
        return self.pattern

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
            o, _ = kernels.attention(qk, kk, vk, plan.block_mask, scale=ctx.scale, backend=self.backend,
                                     return_lse=False)
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
        SlidingTile(self.tile, self.window)  # validate now

    def pattern_for(self, ctx: AttentionContext) -> Pattern:
        return SlidingTile(self.tile, self.window)

    def block_size_for(self, pattern: Pattern, grid: tuple[int, ...]) -> int:
        return pattern.tile_volume(grid)


@dataclass(frozen=True)
class SlidingWindowAttention(SparseAttention):
    """Neighborhood attention with NATTEN semantics: ``window`` tokens per axis around each query (clamped inward
    at the borders so every query sees a full window), optional ``stride`` (generalized neighborhood attention:
    queries in runs of ``stride`` share a window) and ``dilation``. Ints apply to every axis."""

    window: int | tuple[int, ...] = 7
    stride: int | tuple[int, ...] = 1
    dilation: int | tuple[int, ...] = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        SlidingWindow(self.window, self.stride, self.dilation)  # validate now

    def pattern_for(self, ctx: AttentionContext) -> Pattern:
        return SlidingWindow(self.window, self.stride, self.dilation)


@dataclass(frozen=True)
class ShiftedWindowAttention(SparseAttention):
    """HiDiffusion's MSW-MSA: self-attention inside a ``windows`` grid of windows (2 x 2: a quarter of the cost),
    cyclically shifted by a fraction of the window drawn per (step, layer) from ``seed`` (never the global RNG),
    or a fixed ``shift`` fraction. Odd sizes need no resizing. Use it on a UNet's highest-resolution
    self-attention (see ``HIDIFFUSION_LAYERS``)."""

    windows: int | tuple[int, ...] = (2, 2)
    shift: float | None = None
    seed: int = 0
    roles: frozenset[str] = field(default=frozenset({"self"}))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shift is not None and not 0.0 <= self.shift < 1.0:
            raise ValueError(f"ShiftedWindowAttention: shift is a fraction of the window in [0, 1), got {self.shift}")

    def pattern_for(self, ctx: AttentionContext) -> Pattern:
        fraction = self.shift if self.shift is not None else hidiffusion_shift(ctx.step, ctx.layer, self.seed)
        return ShiftedWindow.from_fraction(ctx.q_layout.grid, fraction, self.windows)


# HiDiffusion's MSW-MSA layers (the highest-resolution transformer blocks), for diffattn.apply(layers=...).
HIDIFFUSION_LAYERS = {
    "sd15": [r"down_blocks\.0\.attentions\.[01]\.transformer_blocks\.0\.attn1",
             r"up_blocks\.3\.attentions\.[012]\.transformer_blocks\.0\.attn1"],
    "sdxl": [r"down_blocks\.1\.attentions\.[01]\.transformer_blocks\.\d+\.attn1",
             r"up_blocks\.1\.attentions\.[012]\.transformer_blocks\.\d+\.attn1"],
}


@dataclass(frozen=True)
class RadialAttention(SparseAttention):
    """Radial Attention for video: dense within neighbouring frames, a band that shrinks exponentially with frame
    distance (``decay``), optional first-frame sink; block-level (``block_size`` 128 or 64). Text stays dense."""

    decay: float = 1.0
    frame_sink: bool = True
    dense_band_frames: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        Radial(self.decay, self.block_size, self.frame_sink, self.dense_band_frames)  # validate now

    def pattern_for(self, ctx: AttentionContext) -> Pattern:
        return Radial(self.decay, self.block_size, self.frame_sink, self.dense_band_frames)
