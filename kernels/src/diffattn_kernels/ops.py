"""The ``torch`` backend as ``torch.library`` custom ops, so autograd and ``torch.compile`` see one op per call.

``diffattn::block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, tiles,
tile_index, q_block, kv_block, scale) -> (out, lse)`` runs :func:`.block_sparse.forward`; its backward is the op
``diffattn::block_sparse_attention_backward`` (:func:`.block_sparse.backward`, flash-attention style: probabilities
recomputed per query block from the saved log-sum-exp). Both have fake implementations, so ``torch.compile`` traces
through them without graph breaks. Sequence lengths are those of ``q`` and ``k``.

How the ``BlockMask``'s ``mask_mod`` crosses the op boundary: as data. A Python function is not a valid op argument,
and an integer key into a registry of mask functions is unsound under ``torch.compile``: dynamo bakes the key into
the graph as a constant while it guards a closure only by its code, so a second mask of the same kind (same
function, other captured tensors) would silently reuse the first one's key. Instead :func:`.block_sparse.partial_tiles`
evaluates ``mask_mod`` on the partial blocks before the op (traced by dynamo like any tensor code, so always the
right mask) and passes the result as ``tiles`` (one bool per element of a listed partial block) with ``tile_index``
(which tile each listed block uses). The op itself holds no state and needs no registry.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from . import block_sparse

__all__ = ["block_sparse_attention"]


@torch.library.custom_op("diffattn::block_sparse_attention", mutates_args=())
def _attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_num_blocks: Tensor,
    kv_indices: Tensor,
    full_kv_num_blocks: Tensor | None,
    full_kv_indices: Tensor | None,
    tiles: Tensor,
    tile_index: Tensor,
    q_block: int,
    kv_block: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    return block_sparse.forward(
        q,
        k,
        v,
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks,
        full_kv_indices,
        tiles,
        tile_index,
        q_block,
        kv_block,
        scale,
    )


@_attention_op.register_fake
def _attention_fake(
    q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, tiles, tile_index, q_block, kv_block, scale
):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("diffattn::block_sparse_attention_backward", mutates_args=())
def _backward_op(
    grad_out: Tensor,
    grad_lse: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    kv_num_blocks: Tensor,
    kv_indices: Tensor,
    full_kv_num_blocks: Tensor | None,
    full_kv_indices: Tensor | None,
    tiles: Tensor,
    tile_index: Tensor,
    q_block: int,
    kv_block: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return block_sparse.backward(
        grad_out,
        grad_lse,
        q,
        k,
        v,
        out,
        lse,
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks,
        full_kv_indices,
        tiles,
        tile_index,
        q_block,
        kv_block,
        scale,
    )


@_backward_op.register_fake
def _backward_fake(grad_out, grad_lse, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    q, k, v, kv_num, kv_idx, full_num, full_idx, tiles, tile_index, q_block, kv_block, scale = inputs
    ctx.save_for_backward(q, k, v, *output, kv_num, kv_idx, full_num, full_idx, tiles, tile_index)
    ctx.blocks = (q_block, kv_block, scale)


def _backward(ctx: Any, grad_out: Tensor | None, grad_lse: Tensor | None) -> tuple[Tensor | None, ...]:
    q, k, v, out, lse, *mask = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
    dq, dk, dv = _backward_op(grad_out, grad_lse, q, k, v, out, lse, *mask, *ctx.blocks)
    return (dq, dk, dv) + (None,) * 9


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, *, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Attention of ``q`` (B, H, Sq, D) over ``k``/``v`` (B, Hkv, Skv, D) restricted to ``block_mask``, with
    backward: ``(out, lse)``, lse float32 (B, H, Sq); rows with no allowed key give 0 and lse ``-inf`` (and zero
    gradients). The block mask's batch dimension must be 1 (the same pattern for every batch entry); its head
    dimension 1 or H; Hkv must divide H (grouped-query attention)."""
    block_sparse.check_call(q, k, v, block_mask)
    bq, bkv = block_mask.BLOCK_SIZE
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    tiles, tile_index = block_sparse.partial_tiles(block_mask, q.shape[-2], k.shape[-2], q.device)
    return _attention_op(
        q,
        k,
        v,
        block_mask.kv_num_blocks,
        block_mask.kv_indices,
        block_mask.full_kv_num_blocks,
        block_mask.full_kv_indices,
        tiles,
        tile_index,
        bq,
        bkv,
        scale,
    )
