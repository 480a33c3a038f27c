"""Block-sparse attention on CPU (and GPU) with plain PyTorch ops: the ``torch`` backend.

Driven by a FlexAttention ``BlockMask``: for every query block it visits only the listed key/value blocks. Runs of
consecutive key blocks are attended as *views* of k and v (no copy), each by one fused SDPA call that also returns
the log-sum-exp; full blocks need no mask, partial blocks get the element mask from ``block_mask.mask_mod``. The
runs of a query block are merged by log-sum-exp. Rows with no allowed key give 0 and lse ``-inf``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

__all__ = ["block_sparse_attention", "kv_block_lists"]

_NEG_INF = float("-inf")


def _fused(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """One SDPA call returning (out, lse); lse float32 (B, H, Sq)."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=mask, scale=scale
        )
        return out, lse
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask.float()
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1).nan_to_num(0.0), v.float()).to(q.dtype)
    return out, lse


def _lists(num: Tensor | None, indices: Tensor | None) -> list[list[list[int]]]:
    """Per head, per query block: the listed key/value blocks (batch entry 0)."""
    if num is None:
        return []
    nums, idx = num[0].tolist(), indices[0].tolist()
    return [[row[:n] for row, n in zip(head_idx, head_num)] for head_idx, head_num in zip(idx, nums)]


def kv_block_lists(block_mask: BlockMask, head: int, q_block: int) -> tuple[list[int], list[int]]:
    """(partial, full) key/value block indices of one query block (batch entry 0)."""
    h = head if block_mask.kv_num_blocks.shape[1] > 1 else 0
    partial = _lists(block_mask.kv_num_blocks, block_mask.kv_indices)[h][q_block]
    full = _lists(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    return partial, (full[h][q_block] if full else [])


def _runs(partial: list[int], full: list[int]) -> list[tuple[int, int, bool]]:
    """Maximal runs ``(first_block, stop_block, needs_mask)`` of consecutive blocks with the same kind."""
    kinds = sorted([(b, True) for b in partial] + [(b, False) for b in full])
    runs: list[tuple[int, int, bool]] = []
    for block, masked in kinds:
        if runs and runs[-1][1] == block and runs[-1][2] == masked:
            runs[-1] = (runs[-1][0], block + 1, masked)
        else:
            runs.append((block, block + 1, masked))
    return runs


def block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, *, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Attention of ``q`` (B, H, Sq, D) over ``k``/``v`` (B, Hkv, Skv, D) restricted to ``block_mask``.

    Returns ``(out, lse)`` with ``lse`` float32 (B, H, Sq). The block mask's batch dimension must be 1 (the same
    pattern for every batch entry); its head dimension 1 or H.
    """
    batch, heads, num_q, dim = q.shape
    num_kv = k.shape[-2]
    if block_mask.kv_num_blocks.shape[0] != 1:
        raise ValueError("the torch kernel takes block masks shared by the batch (batch dimension 1)")
    mask_heads = block_mask.kv_num_blocks.shape[1]
    if mask_heads not in (1, heads):
        raise ValueError(f"block mask has {mask_heads} heads; expected 1 or {heads}")
    if k.shape[1] != heads:
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
        v = v.repeat_interleave(heads // v.shape[1], dim=1)
    bq, bkv = block_mask.BLOCK_SIZE
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    mask_mod = block_mask.mask_mod
    out = torch.zeros_like(q)
    lse = torch.full((batch, heads, num_q), _NEG_INF, dtype=torch.float32, device=q.device)
    head_groups = [slice(h, h + 1) for h in range(heads)] if mask_heads > 1 else [slice(0, heads)]
    partial_lists = _lists(block_mask.kv_num_blocks, block_mask.kv_indices)
    full_lists = _lists(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    for g, hs in enumerate(head_groups):
        for qb in range(math.ceil(num_q / bq)):
            q0, q1 = qb * bq, min((qb + 1) * bq, num_q)
            runs = _runs(partial_lists[g][qb], full_lists[g][qb] if full_lists else [])
            if not runs:
                continue
            qq = q[:, hs, q0:q1]
            parts = []
            for first, stop, masked in runs:
                k0, k1 = first * bkv, min(stop * bkv, num_kv)
                mask = None
                if masked:
                    q_idx = torch.arange(q0, q1, device=q.device).view(-1, 1)
                    kv_idx = torch.arange(k0, k1, device=q.device).view(1, -1)
                    h_idx = torch.tensor(g if mask_heads > 1 else 0, device=q.device)
                    allowed = mask_mod(torch.tensor(0, device=q.device), h_idx, q_idx, kv_idx)
                    allowed = allowed.expand(q1 - q0, k1 - k0)
                    mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, _NEG_INF)
                o, l = _fused(qq, k[:, hs, k0:k1], v[:, hs, k0:k1], None if mask is None else mask.view(1, 1, *mask.shape), scale)
                if mask is not None:
                    l = torch.where(allowed.any(-1), l, _NEG_INF)
                parts.append((o, l))
            if len(parts) == 1:
                o, l = parts[0]
            else:
                lses = torch.stack([p[1] for p in parts])
                l = torch.logsumexp(lses, dim=0)
                weights = torch.exp(lses - torch.where(torch.isneginf(l), 0.0, l)).unsqueeze(-1)
                o = sum(w * p[0].float() for w, p in zip(weights, parts)).to(q.dtype)
            out[:, hs, q0:q1] = o
            lse[:, hs, q0:q1] = l
    return out, lse
