"""xformers backend for the block masks it can express exactly: dense, and *local* (GPU only).

A block mask is

- ``dense`` when every query block sees every key block as a full block (no element mask);
- ``local`` when it is shared by batch and heads, has no partial blocks, and every query block sees one
  contiguous run of full key blocks, the runs' starts never decreasing (sliding tiles and windows at tile
  granularity along one axis, blocked windows gathered contiguously).

Dense calls go to ``memory_efficient_attention`` without a bias; local calls pack the batch into one sequence and
pass a ``BlockDiagonalGappyKeysMask`` whose i-th query segment (one mask block) attends keys
``[start_i, start_i + len_i)`` (its run). Everything else is left to the ``triton`` backend, with the reason.
xformers is imported only when a call runs here; it runs nothing on CPU. Not run on a GPU yet (no GPU here).
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .errors import refuse_grad

__all__ = ["local_runs", "mask_structure", "xformers_block_attention", "gappy_bias"]

_STRUCTURE_CACHE: weakref.WeakKeyDictionary[BlockMask, dict] = weakref.WeakKeyDictionary()


def local_runs(block_mask: BlockMask, num_q: int, num_kv: int) -> tuple[str | None, str, list[tuple[int, int]]]:
    """``(kind, reason, runs)``: kind ``"dense"``, ``"local"`` or ``None`` (with the reason); ``runs`` the
    ``(first, stop)`` key block run of each query block when the kind is not ``None``."""
    nb, nh, nqb = block_mask.kv_num_blocks.shape
    if nb != 1 or nh != 1:
        return None, "the block mask differs per batch entry or head", []
    bq, bkv = block_mask.BLOCK_SIZE
    n_q_blocks, n_kv_blocks = math.ceil(num_q / bq), math.ceil(num_kv / bkv)
    if int(block_mask.kv_num_blocks[0, 0, :n_q_blocks].max()) > 0:
        return None, "the block mask has partial blocks (element masks)", []
    if block_mask.full_kv_num_blocks is None:
        return None, "the block mask keeps no full blocks", []
    # Vectorised on the mask's device: one small transfer, no per-row Python over the index lists.
    nums = block_mask.full_kv_num_blocks[0, 0, :n_q_blocks].to(torch.int64)
    idx = block_mask.full_kv_indices[0, 0, :n_q_blocks].to(torch.int64)
    listed = torch.arange(idx.shape[-1], device=idx.device) < nums.unsqueeze(-1)
    first = torch.where(listed, idx, n_kv_blocks).amin(-1)
    last = torch.where(listed, idx, -1).amax(-1)
    summary = torch.stack([nums, first, last]).cpu()
    nums, first, last = summary.tolist()
    for qb, (n, f, z) in enumerate(zip(nums, first, last)):
        if n == 0:
            return None, f"query block {qb} sees no key (empty rows)", []
        if z - f + 1 != n:
            return None, f"query block {qb} sees {n} key blocks that are not one contiguous run", []
    runs = [(f, z + 1) for f, z in zip(first, last)]
    if all(r == (0, n_kv_blocks) for r in runs):
        return "dense", "", runs
    if any(b[0] < a[0] for a, b in zip(runs, runs[1:])):
        return None, "the key runs of consecutive query blocks move backwards", []
    return "local", "", runs


def _cached_runs(block_mask: BlockMask, num_q: int, num_kv: int) -> tuple[str | None, str, list[tuple[int, int]]]:
    key = (int(num_q), int(num_kv))
    try:
        per_mask = _STRUCTURE_CACHE.setdefault(block_mask, {})
    except TypeError:  # not weak-referenceable
        return local_runs(block_mask, num_q, num_kv)
    if key not in per_mask:
        per_mask[key] = local_runs(block_mask, num_q, num_kv)
    return per_mask[key]


def mask_structure(block_mask: BlockMask, num_q: int, num_kv: int) -> tuple[str | None, str]:
    """``(kind, reason)`` of ``local_runs``, cached per block mask (the check reads the mask on the host)."""
    kind, reason, _ = _cached_runs(block_mask, num_q, num_kv)
    return kind, reason


def gappy_bias(
    runs: list[tuple[int, int]],
    block_size: tuple[int, int],
    batch: int,
    num_q: int,
    num_kv: int,
    device: torch.device | str | None = None,
):
    """The ``BlockDiagonalGappyKeysMask`` of a local mask over the batch packed into one sequence."""
    from xformers.ops.fmha.attn_bias import BlockDiagonalGappyKeysMask

    bq, bkv = block_size
    q_seqlen, kv_starts, kv_len = [], [], []
    for b in range(batch):
        for qb, (first, stop) in enumerate(runs):
            q_seqlen.append(min(bq, num_q - qb * bq))
            kv_starts.append(b * num_kv + first * bkv)
            kv_len.append(min(stop * bkv, num_kv) - first * bkv)
    kv_starts.append(batch * num_kv)
    device = torch.device(device) if device is not None else None  # xformers compares with torch.device("cpu")
    return BlockDiagonalGappyKeysMask.from_seqlens(q_seqlen, kv_starts, kv_len, device=device)


def xformers_block_attention(
    q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, *, scale: float | None = None, return_lse: bool = True
) -> tuple[Tensor, Tensor | None]:
    """``(out, lse)`` for a dense or local ``block_mask`` (see the module doc); lse float32 (B, H, Sq). Forward only:
    refuses inputs that require grad (use the ``torch`` backend)."""
    refuse_grad("xformers", q, k, v)
    import xformers.ops as xops

    batch, heads, num_q, dim = q.shape
    num_kv = k.shape[-2]
    if k.shape[1] != heads:
        raise ValueError("the xformers backend takes as many key/value heads as query heads")
    kind, reason, runs = _cached_runs(block_mask, num_q, num_kv)
    if kind is None:
        raise ValueError(f"xformers: {reason}; use backend='triton'")
    qx, kx, vx = (x.transpose(1, 2) for x in (q, k, v))  # (B, S, H, D)
    if kind == "dense":
        out, lse = xops.memory_efficient_attention_forward_requires_grad(qx, kx, vx, scale=scale)
        return out.transpose(1, 2), (lse[..., :num_q].float() if return_lse else None)
    bias = gappy_bias(runs, block_mask.BLOCK_SIZE, batch, num_q, num_kv, device=q.device)
    qx, kx, vx = (x.reshape(1, -1, heads, dim) for x in (qx, kx, vx))
    out, lse = xops.memory_efficient_attention_forward_requires_grad(qx, kx, vx, attn_bias=bias, scale=scale)
    out = out.view(batch, num_q, heads, dim).transpose(1, 2)
    if not return_lse:
        return out, None
    if lse.ndim == 3 and lse.shape[0] == 1 and lse.shape[-1] >= batch * num_q:  # packed varlen layout
        lse = lse[0, :, : batch * num_q].reshape(heads, batch, num_q).transpose(0, 1)
        return out, lse.float()
    raise RuntimeError(
        f"xformers returned a log-sum-exp of shape {tuple(lse.shape)} for a varlen call; expected the "
        "packed (1, heads, tokens) layout. Call with return_lse=False or use backend='triton'."
    )
