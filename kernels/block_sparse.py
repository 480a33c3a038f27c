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

__all__ = ["block_sparse_attention", "dense_attention", "kv_block_lists"]

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


def dense_attention(
    q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None = None, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Dense attention that also returns the log-sum-exp (one fused call on CPU): ``(out, lse)``, lse float32
    (B, H, Sq). ``attn_mask``: boolean (True = may attend) or additive, broadcastable to (B, H, Sq, Skv)."""
    heads = q.shape[1]
    if k.shape[1] != heads:
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
        v = v.repeat_interleave(heads // v.shape[1], dim=1)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, _NEG_INF)
    if attn_mask is not None:
        attn_mask = attn_mask.to(q.dtype).expand(q.shape[0], heads, q.shape[-2], k.shape[-2])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _fused(q, k, v, attn_mask, scale)


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


def _partial_mask(mask_mod, g: int, per_head: bool, q0: int, q1: int, kv_positions: Tensor, dtype, device) -> tuple[Tensor, Tensor]:
    """Additive mask (0 / -inf) and the boolean 'allowed' of one query block against the given key positions."""
    q_idx = torch.arange(q0, q1, device=device).view(-1, 1)
    h_idx = torch.tensor(g if per_head else 0, device=device)
    allowed = mask_mod(torch.tensor(0, device=device), h_idx, q_idx, kv_positions.view(1, -1))
    allowed = allowed.expand(q1 - q0, kv_positions.numel())
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, _NEG_INF), allowed


def _merge(parts: list[tuple[Tensor, Tensor]], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    if len(parts) == 1:
        return parts[0]
    lses = torch.stack([p[1] for p in parts])
    lse = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - torch.where(torch.isneginf(lse), 0.0, lse)).unsqueeze(-1)
    return sum(w * p[0].float() for w, p in zip(weights, parts)).to(dtype), lse


# Query blocks whose key blocks form few runs (at most MAX_VIEW_RUNS) or long ones (MIN_VIEW_RUN blocks on
# average) attend them as views of k and v (no copy); others gather their key blocks, batched with every other
# query block that keeps the same number of blocks.
MAX_VIEW_RUNS = 3
MIN_VIEW_RUN = 2.0
GATHER_CHUNK = 8


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
    per_head = mask_heads > 1
    out = torch.zeros_like(q)
    lse = torch.full((batch, heads, num_q), _NEG_INF, dtype=torch.float32, device=q.device)
    head_groups = [slice(h, h + 1) for h in range(heads)] if per_head else [slice(0, heads)]
    partial_lists = _lists(block_mask.kv_num_blocks, block_mask.kv_indices)
    full_lists = _lists(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    num_kv_blocks = math.ceil(num_kv / bkv)
    contiguous = all(x.is_contiguous() for x in (q, k, v)) and q.device.type == "cpu"
    for g, hs in enumerate(head_groups):
        gathered: dict[int, list[tuple[int, list[int], list[int]]]] = {}
        strided: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for qb in range(math.ceil(num_q / bq)):
            partial, full = partial_lists[g][qb], full_lists[g][qb] if full_lists else []
            runs = _runs(partial, full)
            if not runs:
                continue
            q0, q1 = qb * bq, min((qb + 1) * bq, num_q)
            if contiguous and not partial and q1 - q0 == bq and runs[-1][1] * bkv <= num_kv:
                # Full blocks only: batched below with every query block whose runs have the same lengths.
                strided.setdefault(tuple(stop - first for first, stop, _ in runs), []).append((qb, [r[0] for r in runs]))
                continue
            short = len(runs) > MAX_VIEW_RUNS and (len(partial) + len(full)) / len(runs) < MIN_VIEW_RUN
            if short and q1 - q0 == bq:
                gathered.setdefault(len(partial) + len(full), []).append((qb, partial, full))
                continue
            parts = []
            for first, stop, masked in runs:
                k0, k1 = first * bkv, min(stop * bkv, num_kv)
                mask = allowed = None
                if masked:
                    mask, allowed = _partial_mask(block_mask.mask_mod, g, per_head, q0, q1,
                                                  torch.arange(k0, k1, device=q.device), q.dtype, q.device)
                o, l = _fused(q[:, hs, q0:q1], k[:, hs, k0:k1], v[:, hs, k0:k1],
                              None if mask is None else mask.view(1, 1, *mask.shape), scale)
                if allowed is not None:
                    l = torch.where(allowed.any(-1), l, _NEG_INF)
                parts.append((o, l))
            out[:, hs, q0:q1], lse[:, hs, q0:q1] = _merge(parts, q.dtype)
        if gathered:
            _gathered_blocks(q, k, v, out, lse, hs, g, per_head, gathered, block_mask, bq, bkv, num_kv_blocks, scale)
        for lengths, members in strided.items():
            for group in _progressions(members):
                _strided_group(q, k, v, out, lse, hs, group, lengths, bq, bkv, scale)
    return out, lse


def _progressions(members: list[tuple[int, list[int]]]) -> list[list[tuple[int, list[int]]]]:
    """Split query blocks (in order) into maximal runs whose block index and every key-run start advance by the
    same steps: each such run is one batched call over strided views."""
    groups: list[list[tuple[int, list[int]]]] = []
    for member in members:
        if groups:
            group = groups[-1]
            if len(group) == 1:
                if all(a >= b for a, b in zip(member[1], group[0][1])):  # strides must not be negative
                    group.append(member)
                    continue
                groups.append([member])
                continue
            (q0, s0), (q1, s1) = group[0], group[1]
            qb, starts = member
            last_q, last_s = group[-1]
            if qb - last_q == q1 - q0 and all(a - b == c - d for a, b, c, d in zip(starts, last_s, s1, s0)):
                group.append(member)
                continue
        groups.append([member])
    return groups


def _strided_group(q, k, v, out, lse, hs, group, lengths, bq, bkv, scale) -> None:
    """One fused call per key run for a progression of query blocks, as overlapping strided views (no copies)."""
    batch, heads, num_q, dim = q.shape
    num_kv = k.shape[-2]
    h0, nh = hs.start, hs.stop - hs.start
    size = len(group)
    dq = (group[1][0] - group[0][0]) if size > 1 else 1
    q_first = group[0][0] * bq
    for b in range(batch):
        def view(x: Tensor, length: int, seq: int, first: int, step: int) -> Tensor:
            base = b * x.stride(0) + h0 * x.stride(1) + first * x.stride(2)
            return x.as_strided((size, nh, length, dim), (step * x.stride(2), x.stride(1), x.stride(2), 1), base)

        steps = [(group[1][1][r] - group[0][1][r]) if size > 1 else 0 for r in range(len(lengths))]
        if dq == 1 and not any(steps):
            # Consecutive query blocks with the same key runs: one longer query block (bigger GEMMs, fewer calls).
            rows = slice(q_first, q_first + size * bq)
            parts = [
                _fused(q[b:b + 1, h0:h0 + nh, rows], k[b:b + 1, h0:h0 + nh, s * bkv:(s + n) * bkv],
                       v[b:b + 1, h0:h0 + nh, s * bkv:(s + n) * bkv], None, scale)
                for s, n in zip(group[0][1], lengths)
            ]
            o, l = _merge(parts, q.dtype)
            out[b:b + 1, h0:h0 + nh, rows] = o
            lse[b:b + 1, h0:h0 + nh, rows] = l
            continue
        qv = view(q, bq, num_q, q_first, dq * bq)
        parts = []
        for r, length in enumerate(lengths):
            first = group[0][1][r] * bkv
            kv_len = length * bkv
            o, l = _fused(qv, view(k, kv_len, num_kv, first, steps[r] * bkv),
                          view(v, kv_len, num_kv, first, steps[r] * bkv), None, scale)
            parts.append((o, l))
        o, l = _merge(parts, q.dtype)
        view(out, bq, num_q, q_first, dq * bq).copy_(o)
        lse_view = lse.as_strided((size, nh, bq), (dq * bq, lse.stride(1), 1), b * lse.stride(0) + h0 * lse.stride(1) + q_first)
        lse_view.copy_(l)


def _gathered_blocks(q, k, v, out, lse, hs, g, per_head, groups, block_mask, bq, bkv, num_kv_blocks, scale) -> None:
    """Query blocks with many runs: copy their key blocks together, one fused call per chunk of query blocks."""
    batch, heads, num_kv, dim = k[:, hs].shape
    pad = num_kv_blocks * bkv - num_kv
    kb, vb = (torch.nn.functional.pad(x[:, hs], (0, 0, 0, pad)) if pad else x[:, hs] for x in (k, v))
    kb = kb.reshape(batch, heads, num_kv_blocks, bkv, dim)
    vb = vb.reshape(batch, heads, num_kv_blocks, bkv, dim)
    for count, members in groups.items():
        for c0 in range(0, len(members), GATHER_CHUNK):
            chunk = members[c0:c0 + GATHER_CHUNK]
            blocks = torch.tensor([sorted(p + f) for _, p, f in chunk], device=q.device)  # (G, count)
            kk = kb[:, :, blocks].reshape(batch, heads, len(chunk), count * bkv, dim).transpose(1, 2)
            vv = vb[:, :, blocks].reshape(batch, heads, len(chunk), count * bkv, dim).transpose(1, 2)
            qq = torch.stack([q[:, hs, qb * bq:(qb + 1) * bq] for qb, _, _ in chunk], dim=1)  # (B, G, H, bq, D)
            need_mask = pad > 0 or any(p for _, p, _ in chunk)
            mask = rows_any = None
            if need_mask:
                masks, alloweds = [], []
                for (qb, partial, _), row in zip(chunk, blocks.tolist()):
                    positions = (torch.tensor(row, device=q.device).view(-1, 1) * bkv
                                 + torch.arange(bkv, device=q.device)).flatten()
                    _, allowed = _partial_mask(block_mask.mask_mod, g, per_head, qb * bq, (qb + 1) * bq,
                                               positions.clamp(max=num_kv - 1), q.dtype, q.device)
                    in_partial = torch.tensor([b in partial for b in row], device=q.device).repeat_interleave(bkv)
                    allowed = torch.where(in_partial.view(1, -1), allowed, True) & (positions < num_kv).view(1, -1)
                    alloweds.append(allowed)
                    masks.append(torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, _NEG_INF))
                mask = torch.stack(masks).view(1, len(chunk), 1, bq, -1).expand(batch, -1, -1, -1, -1)
                rows_any = torch.stack(alloweds).any(-1).view(1, len(chunk), 1, bq)
            o, l = _fused(qq.flatten(0, 1), kk.flatten(0, 1), vv.flatten(0, 1),
                          None if mask is None else mask.flatten(0, 1), scale)
            o = o.view(batch, len(chunk), heads, bq, dim)
            l = l.view(batch, len(chunk), heads, bq)
            if rows_any is not None:
                l = torch.where(rows_any, l, _NEG_INF)
            for i, (qb, _, _) in enumerate(chunk):
                out[:, hs, qb * bq:(qb + 1) * bq] = o[:, i]
                lse[:, hs, qb * bq:(qb + 1) * bq] = l[:, i]
