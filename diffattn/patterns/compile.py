"""Place a pattern on one attention call: kernel token order, text tokens, padding, and the ``BlockMask``.

Kernel order is ``[visual tokens in the pattern's order (with padding) | text tokens]``. Text rows and columns
are dense. Padding positions are never attended. ``compile_pattern`` is cached on (pattern, layout, block size,
padded text tokens, device), so a new resolution never reuses a stale mask.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from ..layout import TokenLayout
from .base import Pattern, blocks_of

__all__ = ["CompiledPattern", "compile_pattern"]


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


def _kernel_order(pattern: Pattern, layout: TokenLayout) -> tuple[Tensor, Tensor]:
    """(visual order over raster indices with -1 padding, valid flags) of the visual part."""
    order = pattern.token_order(layout.grid)
    if order is None:
        order = torch.arange(layout.num_visual)
    return order, order >= 0


def _to_block_mask(any_: Tensor, full: Tensor, block_size: int, length: int, mask_mod) -> BlockMask:
    partial = any_ & ~full
    if any_.ndim == 2:
        partial, full = partial.unsqueeze(0), full.unsqueeze(0)

    def indices(kept: Tensor) -> tuple[Tensor, Tensor]:
        num = kept.sum(-1, dtype=torch.int32)
        order = torch.argsort((~kept).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num.unsqueeze(0).contiguous(), order.unsqueeze(0).contiguous()

    kv_num, kv_idx = indices(partial)
    full_num, full_idx = indices(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx.clone(), BLOCK_SIZE=block_size, mask_mod=mask_mod,
        seq_lengths=(length, length),
    )


@functools.lru_cache(maxsize=64)
def _compile(pattern: Pattern, layout: TokenLayout, block_size: int, text_padding: int, device: str) -> CompiledPattern:
    order, valid_visual = _kernel_order(pattern, layout)
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

    # Block relation over kernel positions: the pattern's visual relation, text rows/columns dense.
    nb = blocks_of(length, block_size)
    vis_any, vis_full = pattern.block_relation(layout.grid, block_size)
    heads = vis_any.shape[:-2]
    any_ = torch.zeros(*heads, nb, nb, dtype=torch.bool)
    full = torch.zeros_like(any_)
    nvb = vis_any.shape[-1]
    any_[..., :nvb, :nvb] = vis_any
    full[..., :nvb, :nvb] = vis_full
    pos_block = positions // block_size
    is_text = positions >= n_vis
    has_text = torch.zeros(nb, dtype=torch.bool).index_put_((pos_block[is_text],), torch.tensor(True))
    all_text = ~torch.zeros(nb, dtype=torch.bool).index_put_((pos_block[~is_text],), torch.tensor(True))
    has_pad = torch.zeros(nb, dtype=torch.bool).index_put_((pos_block[~valid],), torch.tensor(True))
    all_pad = ~torch.zeros(nb, dtype=torch.bool).index_put_((pos_block[valid],), torch.tensor(True))
    mixed = has_text.view(-1, 1) | has_text.view(1, -1)
    any_ = (any_ | mixed) & ~all_pad.view(1, -1)
    full = ~has_pad.view(1, -1) & (all_text.view(-1, 1) | all_text.view(1, -1) | (full & ~mixed))
    full &= any_

    visual_mod = pattern.mask_mod(layout.grid)
    per_head = pattern.num_heads() is not None
    valid_dev = valid.to(device)
    last_visual = max(n_vis - 1, 0)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q_text = q_idx >= n_vis
        kv_text = kv_idx >= n_vis
        q_vis, kv_vis = torch.clamp(q_idx, max=last_visual), torch.clamp(kv_idx, max=last_visual)
        vis = visual_mod(q_vis, kv_vis, h) if per_head else visual_mod(q_vis, kv_vis)
        return valid_dev[kv_idx] & (q_text | kv_text | vis)

    block_mask = _to_block_mask(any_, full, block_size, length, mask_mod)
    if device != "cpu":
        block_mask = block_mask.to(device)
    kept_pairs = _kept_token_pairs(any_, valid, block_size)
    real = int(valid.sum())
    return CompiledPattern(gather.to(device), scatter.to(device), block_mask, kept_pairs / max(real * real, 1))


def _kept_token_pairs(any_: Tensor, valid: Tensor, block_size: int) -> float:
    """Real (query, key) pairs inside kept blocks, averaged over heads: the work the kernel does."""
    length = valid.numel()
    nb = blocks_of(length, block_size)
    per_block = torch.zeros(nb).index_add_(0, torch.arange(length) // block_size, valid.float())
    kept = any_.float() if any_.ndim == 3 else any_.float().unsqueeze(0)
    return float((per_block.view(1, -1, 1) * kept * per_block.view(1, 1, -1)).sum((-1, -2)).mean())


def compile_pattern(
    pattern: Pattern, layout: TokenLayout, *, block_size: int = 128, text_padding: int = 0, device: str | torch.device = "cpu"
) -> CompiledPattern:
    """The pattern placed on ``layout`` (cached). ``text_padding``: trailing text tokens that are padding."""
    if not layout.grid:
        raise ValueError("sparse patterns need visual tokens; this call has text tokens only")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return _compile(pattern, layout, int(block_size), int(text_padding), str(torch.device(device)))
