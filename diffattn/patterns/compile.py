"""Place a pattern on one attention call: kernel token order, text tokens, padding, and the ``BlockMask``.

Kernel order is ``[visual tokens in the pattern's order (with padding) | text tokens]``. Text rows and columns
are dense. Padding positions are never attended. ``compile_pattern`` is cached on (pattern, layout, block size,
padded text tokens, device), so a new resolution never reuses a stale mask.

The steps are public so that dynamic methods (whose visual block relation is chosen per call from q and k, see
:mod:`diffattn.patterns.dynamic`) place their relation exactly as static patterns do: :func:`kernel_order`,
:func:`place_visual_relation`, :func:`token_mask_mod`, :func:`relation_block_mask`, :func:`kept_token_pairs`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from ..layout import TokenLayout
from .base import Pattern, blocks_of

__all__ = [
    "CompiledPattern",
    "compile_pattern",
    "KernelOrder",
    "kernel_order",
    "place_visual_relation",
    "token_mask_mod",
    "relation_block_mask",
    "kept_token_pairs",
]


@dataclass(frozen=True, eq=False)
class CompiledPattern:
    """A pattern on one layout. ``gather[p]`` is the sequence index of kernel position ``p`` (padding: 0, never
    attended); ``scatter[i]`` is the kernel position of sequence token ``i``."""

    gather: Tensor
    scatter: Tensor
    block_mask: BlockMask
    density: float  # fraction of (query, key) token pairs inside kept blocks, over real tokens

    @property
    def kernel_length(self) -> int:
        return int(self.gather.numel())


@dataclass(frozen=True, eq=False)
class KernelOrder:
    """Token positions of one call in kernel order ``[visual (pattern order, with padding) | text]`` (CPU tensors).

    ``gather[p]``: sequence index of kernel position ``p`` (padding: 0); ``scatter[i]``: kernel position of sequence
    token ``i``; ``valid[p]``: position ``p`` holds a real token (not grid padding, not padded text);
    ``num_visual``: positions of the visual part, padding included. Per block of ``block_size`` positions:
    ``has_text`` / ``all_text`` / ``has_pad`` / ``all_pad``.
    """

    gather: Tensor
    scatter: Tensor
    valid: Tensor
    num_visual: int
    block_size: int
    has_text: Tensor
    all_text: Tensor
    has_pad: Tensor
    all_pad: Tensor

    @property
    def length(self) -> int:
        return int(self.gather.numel())

    @property
    def num_blocks(self) -> int:
        return blocks_of(self.length, self.block_size)

    @property
    def visual_blocks(self) -> int:
        """Blocks holding visual positions (the last may also hold text tokens)."""
        return blocks_of(self.num_visual, self.block_size)


def kernel_order(order: Tensor | None, layout: TokenLayout, block_size: int, text_padding: int = 0) -> KernelOrder:
    """Kernel order of ``layout`` with the visual tokens in ``order`` (raster indices, ``-1`` = padding; ``None`` =
    raster order) and the last ``text_padding`` text tokens marked as padding."""
    if order is None:
        order = torch.arange(layout.num_visual)
    valid_visual = order >= 0
    n_vis = int(order.numel())
    text_len = layout.text_len
    length = n_vis + text_len
    real_text = text_len - text_padding
    visual_seq = torch.where(valid_visual, order + layout.visual_start, 0)
    text_seq = torch.arange(layout.text_start, layout.text_start + text_len)
    gather = torch.cat([visual_seq, text_seq])
    valid = torch.cat([valid_visual, torch.arange(text_len) < real_text])
    scatter = torch.empty(layout.num_tokens, dtype=torch.long)
    positions = torch.arange(length)
    scatter[gather[valid]] = positions[valid]
    if text_padding:  # padded text rows still need a kernel position (their output is discarded by the model)
        pad_rows = torch.arange(real_text, text_len)
        scatter[layout.text_start + pad_rows] = n_vis + pad_rows
    nb = blocks_of(length, block_size)
    pos_block = positions // block_size
    is_text = positions >= n_vis

    def blocks_with(which: Tensor) -> Tensor:
        return torch.zeros(nb, dtype=torch.bool).index_put_((pos_block[which],), torch.tensor(True))

    return KernelOrder(
        gather=gather,
        scatter=scatter,
        valid=valid,
        num_visual=n_vis,
        block_size=block_size,
        has_text=blocks_with(is_text),
        all_text=~blocks_with(~is_text),
        has_pad=blocks_with(~valid),
        all_pad=~blocks_with(valid),
    )


def place_visual_relation(ko: KernelOrder, vis_any: Tensor, vis_full: Tensor) -> tuple[Tensor, Tensor]:
    """The block relation over all kernel blocks from one over the visual blocks (``(nvb, nvb)`` or with a leading
    head dim): text rows and columns dense, blocks of padding keys never attended, blocks with padding keys partial."""
    nb = ko.num_blocks
    heads = vis_any.shape[:-2]
    any_ = torch.zeros(*heads, nb, nb, dtype=torch.bool, device=vis_any.device)
    full = torch.zeros_like(any_)
    nvb = vis_any.shape[-1]
    any_[..., :nvb, :nvb] = vis_any
    full[..., :nvb, :nvb] = vis_full
    has_text, all_text, has_pad, all_pad = (
        x.to(vis_any.device) for x in (ko.has_text, ko.all_text, ko.has_pad, ko.all_pad)
    )
    mixed = has_text.view(-1, 1) | has_text.view(1, -1)
    any_ = (any_ | mixed) & ~all_pad.view(1, -1)
    full = ~has_pad.view(1, -1) & (all_text.view(-1, 1) | all_text.view(1, -1) | (full & ~mixed))
    full &= any_
    return any_, full


def token_mask_mod(ko: KernelOrder, visual_mod: Callable, per_head: bool, device: str | torch.device) -> Callable:
    """FlexAttention ``mask_mod`` over kernel positions: padding keys never, text rows/columns always, visual pairs
    by ``visual_mod(q_pos, kv_pos)`` (``visual_mod(q_pos, kv_pos, h)`` when ``per_head``)."""
    n_vis = ko.num_visual
    valid_dev = ko.valid.to(device)
    last_visual = max(n_vis - 1, 0)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q_text = q_idx >= n_vis
        kv_text = kv_idx >= n_vis
        q_vis, kv_vis = torch.clamp(q_idx, max=last_visual), torch.clamp(kv_idx, max=last_visual)
        vis = visual_mod(q_vis, kv_vis, h) if per_head else visual_mod(q_vis, kv_vis)
        return valid_dev[kv_idx] & (q_text | kv_text | vis)

    return mask_mod


def relation_block_mask(
    any_: Tensor,
    full: Tensor,
    block_size: int | tuple[int, int],
    length: int | tuple[int, int],
    mask_mod: Callable,
    compute_q_blocks: bool = True,
) -> BlockMask:
    """``BlockMask`` (batch 1; heads from a leading dim of the relation, else 1) from a block relation: ``full``
    blocks need no element mask, other ``any_`` blocks are partial (``mask_mod`` decides inside them).
    ``block_size`` and ``length`` take ``(query, key)`` pairs for rectangular masks. ``compute_q_blocks=False``
    skips the transposed (query-side) lists, which only FlexAttention's backward reads: a mask built per call
    without gradients saves their sort."""
    partial = any_ & ~full
    if any_.ndim == 2:
        partial, full = partial.unsqueeze(0), full.unsqueeze(0)

    def indices(kept: Tensor) -> tuple[Tensor, Tensor]:
        num = kept.sum(-1, dtype=torch.int32)
        order = torch.argsort((~kept).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num.unsqueeze(0).contiguous(), order.unsqueeze(0).contiguous()

    kv_num, kv_idx = indices(partial)
    full_num, full_idx = indices(full)
    lengths = length if isinstance(length, tuple) else (length, length)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx.clone(),
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=lengths,
        compute_q_blocks=compute_q_blocks,
    )


def kept_token_pairs(any_: Tensor, valid: Tensor, block_size: int) -> float:
    """Real (query, key) pairs inside kept blocks, averaged over heads: the work the kernel does."""
    length = valid.numel()
    nb = blocks_of(length, block_size)
    per_block = torch.zeros(nb).index_add_(0, torch.arange(length) // block_size, valid.float())
    per_block = per_block.to(any_.device)
    kept = any_.float() if any_.ndim == 3 else any_.float().unsqueeze(0)
    return float((per_block.view(1, -1, 1) * kept * per_block.view(1, 1, -1)).sum((-1, -2)).mean())


@functools.lru_cache(maxsize=64)
def _compile(pattern: Pattern, layout: TokenLayout, block_size: int, text_padding: int, device: str) -> CompiledPattern:
    ko = kernel_order(pattern.token_order(layout.grid), layout, block_size, text_padding)
    vis_any, vis_full = pattern.block_relation(layout.grid, block_size)
    any_, full = place_visual_relation(ko, vis_any, vis_full)
    mask_mod = token_mask_mod(ko, pattern.mask_mod(layout.grid), pattern.num_heads() is not None, device)
    block_mask = relation_block_mask(any_, full, block_size, ko.length, mask_mod)
    if device != "cpu":
        block_mask = block_mask.to(device)
    real = int(ko.valid.sum())
    density = kept_token_pairs(any_, ko.valid, block_size) / max(real * real, 1)
    return CompiledPattern(ko.gather.to(device), ko.scatter.to(device), block_mask, density)


def compile_pattern(
    pattern: Pattern,
    layout: TokenLayout,
    *,
    block_size: int = 128,
    text_padding: int = 0,
    device: str | torch.device = "cpu",
) -> CompiledPattern:
    """The pattern placed on ``layout`` (cached). ``text_padding``: trailing text tokens that are padding."""
    if not layout.grid:
        raise ValueError("sparse patterns need visual tokens; this call has text tokens only")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return _compile(pattern, layout, int(block_size), int(text_padding), str(torch.device(device)))
