"""Joint (text + visual) attention computed in parts and merged exactly by log-sum-exp.

A compiled joint pattern is one block mask over kernel order ``[visual | text]`` with dense text rows and columns;
every backend runs it in one call. :func:`split_text_attention` computes the same attention in three calls
instead, so that the sparse visual part and the dense text parts can each go to the kernel best for them (e.g.
the Triton block-sparse kernel for the video, a dense flash kernel for the text):

- visual queries x visual keys: the sparse visual mask;
- visual queries x text keys: dense (text key padding masked);
- text queries x all keys: dense (padding keys masked);

the two visual-query parts merged by their log-sum-exp (:func:`merge_attention`), which is exact: softmax over a
union of disjoint key sets is the lse-weighted sum of the softmaxes over each set.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .reference import merge_attention

__all__ = ["dense_block_mask", "key_padding_block_mask", "split_text_attention"]


def key_padding_block_mask(key_valid: Tensor, num_q: int, block_size: int = 128) -> BlockMask:
    """Every query sees every valid key: blocks of only valid keys are full, mixed ones partial, none skipped."""
    key_valid = key_valid.to(torch.bool)
    device = key_valid.device
    num_kv = int(key_valid.numel())
    nqb, nkb = math.ceil(num_q / block_size), math.ceil(num_kv / block_size)
    padded = torch.nn.functional.pad(key_valid, (0, nkb * block_size - num_kv)).view(nkb, block_size)
    count = padded.sum(-1)
    real = torch.full((nkb,), block_size, device=device)
    real[-1] = num_kv - (nkb - 1) * block_size
    full = count == real
    partial = (count > 0) & ~full

    def lists(kept: Tensor) -> tuple[Tensor, Tensor]:
        num = kept.sum(dtype=torch.int32).view(1, 1, 1).expand(1, 1, nqb).contiguous()
        order = torch.argsort((~kept).to(torch.int8), stable=True).to(torch.int32)
        return num, order.view(1, 1, 1, nkb).expand(1, 1, nqb, nkb).contiguous()

    kv_num, kv_idx = lists(partial)
    full_num, full_idx = lists(full)
    last = num_kv - 1

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return key_valid[kv_idx.clamp(0, last)] & (kv_idx <= last)

    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(num_q, num_kv)
    )


def dense_block_mask(num_q: int, num_kv: int, block_size: int = 128, device: torch.device | str = "cpu") -> BlockMask:
    """All keys for every query, as full blocks (no element mask)."""
    return key_padding_block_mask(torch.ones(num_kv, dtype=torch.bool, device=device), num_q, block_size)


def split_text_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    visual_mask: BlockMask,
    num_visual: int,
    *,
    key_valid: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    dense_backend: str | None = None,
    block_size: int = 128,
) -> tuple[Tensor, Tensor]:
    """Joint attention over kernel order ``[visual (num_visual) | text]`` as sparse visual + dense text parts,
    merged by log-sum-exp. ``visual_mask`` covers the visual tokens only (e.g. the pattern compiled without
    text); ``key_valid`` (bool, one per key) marks padding keys (visual tile padding, text padding) that no query
    may see. ``backend`` runs the visual part, ``dense_backend`` (default: the same) the text parts.
    Returns ``(out, lse)`` with lse float32 (B, H, S): the same as one call with the compiled joint mask."""
    from . import attention

    dense_backend = dense_backend or backend
    num = q.shape[-2]
    if key_valid is None:
        key_valid = torch.ones(num, dtype=torch.bool, device=q.device)
    key_valid = key_valid.to(q.device)
    nv = int(num_visual)
    vis, txt = slice(0, nv), slice(nv, num)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    qv = q[:, :, vis]
    sparse = attention(qv, k[:, :, vis], v[:, :, vis], visual_mask, scale=scale, backend=backend)
    if num > nv:
        to_text = attention(
            qv,
            k[:, :, txt],
            v[:, :, txt],
            key_padding_block_mask(key_valid[txt], nv, block_size),
            scale=scale,
            backend=dense_backend,
        )
        merged_out, merged_lse = merge_attention([sparse, to_text])
        out[:, :, vis], lse[:, :, vis] = merged_out, merged_lse.float()
        text_out, text_lse = attention(
            q[:, :, txt],
            k,
            v,
            key_padding_block_mask(key_valid, num - nv, block_size),
            scale=scale,
            backend=dense_backend,
        )
        out[:, :, txt], lse[:, :, txt] = text_out, text_lse.float()
    else:
        out[:, :, vis], lse[:, :, vis] = sparse[0], sparse[1].float()
    return out, lse
