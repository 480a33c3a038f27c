"""Block-sparse attention on CPU (and GPU) with plain PyTorch ops: the ``torch`` backend.

Driven by a FlexAttention ``BlockMask``: for every query block it visits only the listed key/value blocks, each
stretch by one fused SDPA call that also returns the log-sum-exp; the parts of a query block are merged by
log-sum-exp. Rows with no allowed key give 0 and lse ``-inf``.

Query blocks with full blocks only (sliding tile, radial, top-k selections) go, on CPUs with a build of it (AVX-512,
AVX2, NEON), to the compiled loop of :mod:`.cpu_block_sparse` (the fastest path in every benchmark case); a mask with
no partial block at all goes there in one call for every head and query block, its lists built by tensor ops (per-call
masks of dynamic selections: no Python loop over heads and query blocks). Elsewhere
(GPU, other CPUs, ``DIFFATTN_CPU_KERNEL=0``, float16) they are computed *key-major*: their key runs are grouped by
stretch and every query block that needs a stretch attends it in one call with all their rows stacked. The CPU flash
kernel splits short queries into 32-row tiles and reaches only ~60% of its dense speed on 128-row calls (~55% in bf16);
long stacked queries run at its efficient 256-row split. When a reordered copy of the key blocks turns the query blocks'
key sets into markedly fewer runs (radial at 16k tokens: half as many), the stretches are taken from that copy (the
compiled loop uses the same order: longer runs fill its key tiles). Query blocks with partial blocks attend views of k
and v with the element mask of their partial blocks, or gather their blocks when they form many short runs.

The element mask arrives as data (:func:`partial_tiles`: ``mask_mod`` evaluated on the listed partial blocks), so
:func:`forward` and :func:`backward` take tensors and ints only: they implement the ``diffattn::block_sparse_attention``
custom op and its backward (:mod:`.ops`, which also holds the public ``block_sparse_attention``). The backward
recomputes, per query block, the probabilities from the saved log-sum-exp over the same key blocks, whichever path
(views, gathered copies, key-major calls, compiled loop) computed the forward.
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, noop_mask

from . import cpu_block_sparse

__all__ = ["backward", "check_call", "dense_attention", "forward", "key_major_runs", "kv_block_lists", "partial_tiles"]

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


def partial_tiles(block_mask: BlockMask, num_q: int, num_kv: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The element mask of the listed partial blocks, as data: ``(tiles, tile_index)``.

    ``tiles`` (T, BQ, BKV) bool says which keys of a partial block each query row of its query block may see (keys
    past ``num_kv`` never); ``tile_index`` (int32, shaped like ``kv_indices``) gives the tile of each listed partial
    block, -1 for "no element mask" (``noop_mask``). Eager calls evaluate ``mask_mod`` only on the listed blocks
    (one bool per element of them); under ``torch.compile`` the number of listed blocks is data, so it is evaluated
    on every slot of ``kv_indices`` (up to Sq x Skv bools per mask head), keeping the graph free of data-dependent
    shapes."""
    bq, bkv = block_mask.BLOCK_SIZE
    kv_num, kv_idx = block_mask.kv_num_blocks.to(device), block_mask.kv_indices.to(device)
    _, heads, num_qb, slots = kv_idx.shape
    mask_mod = block_mask.mask_mod
    if mask_mod is None or mask_mod is noop_mask:
        return (
            torch.zeros(0, bq, bkv, dtype=torch.bool, device=device),
            torch.full(kv_idx.shape, -1, dtype=torch.int32, device=device),
        )
    if torch.compiler.is_compiling():
        grid = [torch.arange(n, device=device) for n in (heads, num_qb, slots)]
        hh, qq, jj = (x.flatten() for x in torch.meshgrid(*grid, indexing="ij"))
    else:
        listed = torch.arange(slots, device=device) < kv_num[0].unsqueeze(-1)
        hh, qq, jj = listed.nonzero(as_tuple=True)
    count = hh.numel()
    tile_index = torch.full(kv_idx.shape, -1, dtype=torch.int32, device=device)
    tile_index[0, hh, qq, jj] = torch.arange(count, dtype=torch.int32, device=device)
    q_pos = (qq * bq).view(-1, 1, 1) + torch.arange(bq, device=device).view(1, -1, 1)
    kv_pos = (kv_idx[0, hh, qq, jj].long() * bkv).view(-1, 1, 1) + torch.arange(bkv, device=device).view(1, 1, -1)
    batch_idx = torch.zeros((), dtype=torch.int64, device=device)
    head_idx = hh.view(-1, 1, 1) if heads > 1 else torch.zeros((), dtype=torch.int64, device=device)
    chunk = max(1, TILE_CHUNK_ELEMENTS // (bq * bkv))
    parts = []
    for c0 in range(0, count, chunk):
        c = slice(c0, c0 + chunk)
        kv_c = kv_pos[c]
        allowed = mask_mod(
            batch_idx,
            head_idx[c] if heads > 1 else head_idx,
            q_pos[c].clamp(max=max(num_q - 1, 0)),
            kv_c.clamp(max=max(num_kv - 1, 0)),
        )
        parts.append(allowed.expand(kv_c.shape[0], bq, bkv) & (kv_c < num_kv))
    tiles = torch.cat(parts) if parts else torch.zeros(0, bq, bkv, dtype=torch.bool, device=device)
    return tiles, tile_index


# Elements of mask_mod evaluated per call when building tiles (bounds its temporaries).
TILE_CHUNK_ELEMENTS = 1 << 22


def _allowed(tiles: Tensor, ids: list[int], rows: int) -> Tensor:
    """(rows, len(ids) * BKV) bool: the tiles ``ids`` side by side (the last tile of ``tiles`` allows everything)."""
    picked = tiles[torch.tensor(ids, device=tiles.device)][:, :rows]  # (m, rows, BKV)
    return picked.transpose(0, 1).reshape(rows, -1)


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, _NEG_INF)


def _merge(parts: list[tuple[Tensor, Tensor]], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    if len(parts) == 1:
        return parts[0]
    acc = torch.float64 if dtype == torch.float64 else torch.float32  # float64 stays exact (gradcheck)
    lses = torch.stack([p[1].to(acc) for p in parts])
    lse = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - torch.where(torch.isneginf(lse), 0.0, lse)).unsqueeze(-1)
    return sum(w * p[0].to(acc) for w, p in zip(weights, parts)).to(dtype), lse


# Query blocks whose key blocks form few runs (at most MAX_VIEW_RUNS) or long ones (MIN_VIEW_RUN blocks on
# average) attend them as views of k and v (no copy); others gather their key blocks, batched with every other
# query block that keeps the same number of blocks.
MAX_VIEW_RUNS = 3
MIN_VIEW_RUN = 2.0
GATHER_CHUNK = 8


def check_call(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask) -> None:
    """The shapes the torch kernel takes, or a ValueError saying what to change."""
    heads, mask_batch, mask_heads = q.shape[1], *block_mask.kv_num_blocks.shape[:2]
    if mask_batch != 1:
        raise ValueError(
            "the torch kernel takes block masks shared by the batch (batch dimension 1); build the mask with B=None"
        )
    if mask_heads not in (1, heads):
        raise ValueError(f"block mask has {mask_heads} heads; expected 1 or {heads}")
    if k.shape[1] != v.shape[1] or heads % k.shape[1]:
        raise ValueError(
            f"query has {heads} heads, key {k.shape[1]}, value {v.shape[1]}: key and value need the "
            "same head count, dividing the query's (grouped-query attention)"
        )
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"the torch kernel takes value head dim = query head dim, got {v.shape[-1]} and {q.shape[-1]}")


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_num_blocks: Tensor,
    kv_indices: Tensor,
    full_kv_num_blocks: Tensor | None,
    full_kv_indices: Tensor | None,
    tiles: Tensor,
    tile_index: Tensor,
    bq: int,
    bkv: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Attention of ``q`` (B, H, Sq, D) over ``k``/``v`` (B, Hkv, Skv, D) restricted to a block mask given by its
    block tensors and :func:`partial_tiles`: ``(out, lse)``, lse float32 (B, H, Sq). No autograd here: it is the
    implementation of the ``diffattn::block_sparse_attention`` op (see :mod:`.ops`)."""
    batch, heads, num_q, dim = q.shape
    num_kv = k.shape[-2]
    mask_heads = kv_num_blocks.shape[1]
    if k.shape[1] != heads:
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
        v = v.repeat_interleave(heads // v.shape[1], dim=1)
    per_head = mask_heads > 1
    if (
        cpu_block_sparse.supports(q)  # first: CPU only, so a GPU call never syncs on the mask check below
        and kv_num_blocks.shape[-1] == math.ceil(num_q / bq)
        and _whole_blocks_only(kv_num_blocks, full_kv_num_blocks)
    ):
        # every listed block is whole (top-k selections, tiles that divide the grid): one call of the compiled loop
        # for every head and query block, block lists built by tensor ops
        out, lse = torch.empty_like(q), torch.empty((batch, heads, num_q), dtype=torch.float32, device=q.device)
        offsets, ids = cpu_block_sparse.block_lists(full_kv_num_blocks, full_kv_indices)
        cpu_block_sparse.attend_lists(q, k, v, out, lse, offsets, ids, bq, bkv, scale)
        return out, lse
    out = torch.zeros_like(q)
    lse = torch.full((batch, heads, num_q), _NEG_INF, dtype=torch.float32, device=q.device)
    head_groups = [slice(h, h + 1) for h in range(heads)] if per_head else [slice(0, heads)]
    partial_lists = _lists(kv_num_blocks, kv_indices)
    tile_lists = _lists(kv_num_blocks, tile_index)
    full_lists = _lists(full_kv_num_blocks, full_kv_indices)
    tiles = _with_open_tile(tiles, bq, bkv, q.device)
    num_kv_blocks = math.ceil(num_kv / bkv)
    for g, hs in enumerate(head_groups):
        gathered: dict[int, list[tuple[int, list[int], list[int]]]] = {}
        full_only: list[tuple[int, list[tuple[int, int]]]] = []
        for qb in range(math.ceil(num_q / bq)):
            partial, full = partial_lists[g][qb], full_lists[g][qb] if full_lists else []
            runs = _runs(partial, full)
            if not runs:
                continue
            q0, q1 = qb * bq, min((qb + 1) * bq, num_q)
            if not partial and q1 - q0 == bq:
                full_only.append((qb, [(first, stop) for first, stop, _ in runs]))  # computed key-major below
                continue
            tile_of = dict(zip(partial, tile_lists[g][qb]))
            short = len(runs) > MAX_VIEW_RUNS and (len(partial) + len(full)) / len(runs) < MIN_VIEW_RUN
            if short and q1 - q0 == bq:
                gathered.setdefault(len(partial) + len(full), []).append((qb, tile_of, full))
                continue
            parts = []
            for first, stop, masked in runs:
                k0, k1 = first * bkv, min(stop * bkv, num_kv)
                mask = allowed = None
                if masked:
                    allowed = _allowed(tiles, [tile_of[b] for b in range(first, stop)], q1 - q0)[:, : k1 - k0]
                    mask = _additive(allowed, q.dtype)
                o, l = _fused(
                    q[:, hs, q0:q1],
                    k[:, hs, k0:k1],
                    v[:, hs, k0:k1],
                    None if mask is None else mask.view(1, 1, *mask.shape),
                    scale,
                )
                if allowed is not None:
                    l = torch.where(allowed.any(-1), l, _NEG_INF)
                parts.append((o, l))
            out[:, hs, q0:q1], lse[:, hs, q0:q1] = _merge(parts, q.dtype)
        if gathered:
            _gathered_blocks(q, k, v, out, lse, hs, gathered, tiles, bq, bkv, num_kv_blocks, scale)
        if full_only and cpu_block_sparse.supports(q):  # the compiled loop reads key blocks where they are
            cpu_block_sparse.attend(q[:, hs], k[:, hs], v[:, hs], out[:, hs], lse[:, hs], full_only, bq, bkv, scale)
        else:  # only the fallback gains from a key order (longer contiguous runs): computed only for it
            order = _cached_key_order(kv_num_blocks, g, num_kv, bkv, full_only)
            _key_major(q, k, v, out, lse, hs, full_only, bq, bkv, scale, order)
    return out, lse


def _whole_blocks_only(kv_num_blocks: Tensor, full_kv_num_blocks: Tensor | None) -> bool:
    """Whether a mask lists whole (full) blocks only: no partial block needs an element mask."""
    return full_kv_num_blocks is not None and not bool(kv_num_blocks.any())


def _with_open_tile(tiles: Tensor, bq: int, bkv: int, device: torch.device) -> Tensor:
    """``tiles`` plus a last tile that allows every key (what tile index -1 and full blocks use)."""
    open_tile = torch.ones(1, bq, bkv, dtype=torch.bool, device=device)
    return torch.cat([tiles.to(device=device, dtype=torch.bool), open_tile])


def backward(
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
    bq: int,
    bkv: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`forward`, flash-attention style: per query block, the probabilities are
    recomputed from the saved log-sum-exp over the same listed key blocks (element mask from the tiles), so at
    most (query block x its keys) scores exist at a time. With ``dD = rowsum(dO * O)``:
    ``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - dD + dLSE)``, ``dQ = scale dS K``, ``dK = scale dS^T Q``.
    Rows without keys (lse ``-inf``) get zero gradients. Computed in float32 (float64 for float64 inputs)."""
    batch, heads, num_q, dim = q.shape
    kv_heads, num_kv = k.shape[1], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = heads // kv_heads
    qa, doa = q.to(acc), grad_out.to(acc)
    num_kv_blocks = math.ceil(num_kv / bkv)
    pad = num_kv_blocks * bkv - num_kv
    kb, vb = (
        torch.nn.functional.pad(x.to(acc).repeat_interleave(group, dim=1), (0, 0, 0, pad)).view(
            batch, heads, num_kv_blocks, bkv, dim
        )
        for x in (k, v)
    )
    delta = (doa * out.to(acc)).sum(-1) - grad_lse.to(acc)  # (B, H, Sq)
    lse_safe = torch.where(torch.isneginf(lse), float("inf"), lse).to(acc)  # empty rows: P = exp(-inf) = 0
    dq = torch.zeros_like(qa)
    dkb, dvb = torch.zeros_like(kb), torch.zeros_like(vb)
    in_range = (torch.arange(num_kv_blocks * bkv, device=q.device) < num_kv).view(num_kv_blocks, bkv)
    tiles = _with_open_tile(tiles, bq, bkv, q.device)
    open_tile = tiles.shape[0] - 1
    per_head = kv_num_blocks.shape[1] > 1
    partial_lists = _lists(kv_num_blocks, kv_indices)
    tile_lists = _lists(kv_num_blocks, tile_index)
    full_lists = _lists(full_kv_num_blocks, full_kv_indices)
    head_groups = [slice(h, h + 1) for h in range(heads)] if per_head else [slice(0, heads)]
    for g, hs in enumerate(head_groups):
        for qb in range(math.ceil(num_q / bq)):
            full = full_lists[g][qb] if full_lists else []
            blocks = partial_lists[g][qb] + full
            if not blocks:
                continue
            q0, q1 = qb * bq, min((qb + 1) * bq, num_q)
            ids = [t if t >= 0 else open_tile for t in tile_lists[g][qb]] + [open_tile] * len(full)
            index = torch.tensor(blocks, device=q.device)
            allowed = _allowed(tiles, ids, q1 - q0) & in_range[index].view(1, -1)
            ks, vs = kb[:, hs, index].flatten(2, 3), vb[:, hs, index].flatten(2, 3)
            qs, dos = qa[:, hs, q0:q1], doa[:, hs, q0:q1]
            scores = torch.matmul(qs, ks.transpose(-1, -2)).mul_(scale).masked_fill_(~allowed, _NEG_INF)
            p = torch.exp(scores - lse_safe[:, hs, q0:q1].unsqueeze(-1))
            dp = torch.matmul(dos, vs.transpose(-1, -2))
            ds = p * (dp - delta[:, hs, q0:q1].unsqueeze(-1))
            dq[:, hs, q0:q1] = torch.matmul(ds, ks) * scale
            shape = (batch, hs.stop - hs.start, len(blocks), bkv, dim)
            dkb[:, hs].index_add_(2, index, (torch.matmul(ds.transpose(-1, -2), qs) * scale).view(shape))
            dvb[:, hs].index_add_(2, index, torch.matmul(p.transpose(-1, -2), dos).view(shape))
    dk, dv = (x.flatten(2, 3)[:, :, :num_kv].unflatten(1, (kv_heads, group)).sum(2) for x in (dkb, dvb))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# Key runs are cut at multiples of this many tokens (None: never) so that more query blocks share each piece.
KEY_CHUNK_TOKENS: int | None = None
# Query rows per call (bounds the score matrix of the non-CPU fallback) and memory held by unmerged parts.
MAX_CALL_ROWS = 8192
PARTS_BUDGET_BYTES = 1 << 30
# A key order is used when it cuts the runs by at least this fraction.
KEY_ORDER_GAIN = 0.15
_KEY_ORDERS: dict[int, dict] = {}  # by id of the mask's kv_num_blocks, dropped when that tensor dies


def _cached_key_order(anchor: Tensor, group: int, num_kv: int, bkv: int, members) -> list[int] | None:
    """The key order of one head group of a block mask (``anchor``: its ``kv_num_blocks``), computed once per mask
    (masks are cached by pattern)."""
    if id(anchor) not in _KEY_ORDERS:
        _KEY_ORDERS[id(anchor)] = {}
        weakref.finalize(anchor, _KEY_ORDERS.pop, id(anchor), None)
    per_mask = _KEY_ORDERS[id(anchor)]
    key = (group, num_kv, len(members))
    if key not in per_mask:
        per_mask[key] = _key_order(members, math.ceil(num_kv / bkv), num_kv // bkv) if members else None
    return per_mask[key]


def _key_pieces(
    members: list[tuple[int, list[tuple[int, int]]]], chunk: int | None
) -> dict[tuple[int, int], list[int]]:
    """Cut every query block's key runs at multiples of ``chunk`` blocks (if given) and list, per piece, the query
    blocks that attend it."""
    pieces: dict[tuple[int, int], list[int]] = {}
    for qb, runs in members:
        for first, stop in runs:
            while first < stop:
                end = stop if chunk is None else min(stop, (first // chunk + 1) * chunk)
                pieces.setdefault((first, end), []).append(qb)
                first = end
    return pieces


def _key_major(q, k, v, out, lse, hs, members, bq, bkv, scale, order: list[int] | None) -> None:
    """Full-block query blocks, computed key piece by key piece: every query block that needs a piece attends it in
    one call with all their rows stacked (long query sequences run the CPU flash kernel at its efficient split;
    128-row calls reach ~60% of its dense speed); each query block's parts are merged by log-sum-exp at the end."""
    if not members:
        return
    nh = hs.stop - hs.start
    kh, vh = k[:, hs], v[:, hs]
    if order is not None:  # attend to a copy of k and v with the key blocks reordered: fewer, longer runs
        members = _reordered(members, order)
        whole = kh.shape[2] // bkv
        index = torch.tensor(order[:whole], device=q.device)
        kh, vh = (
            torch.cat([_blocks(x, bkv)[:, :, index].flatten(2, 3), x[:, :, whole * bkv :]], dim=2) for x in (kh, vh)
        )
    qh = q[:, hs]
    q_blocks = _blocks(qh, bq)
    chunk = max(1, KEY_CHUNK_TOKENS // bkv) if KEY_CHUNK_TOKENS else None
    # Parts wait for their merge: query blocks go in waves that keep them under PARTS_BUDGET_BYTES.
    runs_per_block = sum(len(runs) for _, runs in members) / len(members)
    part_bytes = q.shape[0] * nh * bq * (q.shape[-1] * q.element_size() + 4)
    wave = max(1, int(PARTS_BUDGET_BYTES // (runs_per_block * part_bytes)))
    max_blocks = max(1, MAX_CALL_ROWS // bq)
    for w0 in range(0, len(members), wave):
        parts: dict[int, list[tuple[Tensor, Tensor]]] = {qb: [] for qb, _ in members[w0 : w0 + wave]}
        for (first, stop), qbs_all in _key_pieces(members[w0 : w0 + wave], chunk).items():
            for c0 in range(0, len(qbs_all), max_blocks):
                qbs = qbs_all[c0 : c0 + max_blocks]
                if qbs == list(range(qbs[0], qbs[0] + len(qbs))):
                    qq = qh[:, :, qbs[0] * bq : (qbs[-1] + 1) * bq]
                else:  # copies whole blocks (an index_select of rows is ~10x slower)
                    qq = q_blocks[:, :, torch.tensor(qbs, device=q.device)].flatten(2, 3)
                keys = slice(first * bkv, stop * bkv)  # the last block may be partial: slicing clamps
                o, l = _fused(qq, kh[:, :, keys], vh[:, :, keys], None, scale)
                for i, qb in enumerate(qbs):
                    parts[qb].append((o[:, :, i * bq : (i + 1) * bq], l[:, :, i * bq : (i + 1) * bq]))
        for qb, found in parts.items():
            out[:, hs, qb * bq : (qb + 1) * bq], lse[:, hs, qb * bq : (qb + 1) * bq] = _merge(found, q.dtype)


def _blocks(x: Tensor, size: int) -> Tensor:
    """(B, H, S, D) -> (B, H, S // size, size, D): the whole blocks of x (a view when x is contiguous in S, D)."""
    whole = x.shape[2] // size
    return x[:, :, : whole * size].unflatten(2, (whole, size))


def _reordered(members, order: list[int]):
    """The members' key runs in the reordered copy whose block i is block ``order[i]``."""
    position = {b: i for i, b in enumerate(order)}
    return [
        (
            qb,
            [
                (first, stop)
                for first, stop, _ in _runs([], [position[b] for first, stop in runs for b in range(first, stop)])
            ],
        )
        for qb, runs in members
    ]


def key_major_runs(block_mask: BlockMask, num_q: int, num_kv: int) -> tuple[float, float]:
    """Mean key runs per key-major query block (head group 0), in key order and in the order the kernel attends
    them (the two are equal when no reordering pays off)."""
    bq, bkv = block_mask.BLOCK_SIZE
    partial = _lists(block_mask.kv_num_blocks, block_mask.kv_indices)[0]
    full_lists = _lists(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    full = full_lists[0] if full_lists else [[] for _ in partial]
    members = [
        (qb, [(first, stop) for first, stop, _ in runs])
        for qb in range(len(partial))
        if not partial[qb] and (qb + 1) * bq <= num_q and (runs := _runs([], full[qb]))
    ]
    if not members:
        return 0.0, 0.0
    order = _key_order(members, math.ceil(num_kv / bkv), num_kv // bkv)
    before = sum(len(runs) for _, runs in members) / len(members)
    after = before if order is None else sum(len(runs) for _, runs in _reordered(members, order)) / len(members)
    return before, after


def _key_order(members, num_blocks: int, movable: int, starts: int = 8) -> list[int] | None:
    """An order of the key blocks in which the query blocks' key sets form fewer runs (None: keep the identity).
    Blocks from ``movable`` on (a partial last block) stay at the end.

    The runs of all rows number (first column + Hamming distances of neighbouring columns + ...) / 2, so a short
    path through the columns under the Hamming distance shortens them: greedy nearest neighbour from a few starts.
    """
    kept = torch.zeros(len(members), num_blocks)
    for row, (_, runs) in enumerate(members):
        for first, stop in runs:
            kept[row, first:stop] = 1
    used = kept[:, :movable].any(0).nonzero().flatten().tolist()
    if not used:
        return None
    cols, pinned = kept.T[used], kept.T[movable:]
    sizes = cols.sum(1)
    dist = (sizes[:, None] + sizes[None, :] - 2 * cols @ cols.T).numpy()

    def total_runs(order_cols: Tensor) -> int:
        m = order_cols.T
        return int(m[:, 0].sum() + (m[:, 1:] > m[:, :-1]).sum())

    best_order, best = None, total_runs(kept.T)
    n = len(used)
    for start in sorted({round(i * (n - 1) / max(1, starts - 1)) for i in range(starts)}):
        path, free = [start], np.ones(n, dtype=bool)
        free[start] = False
        for _ in range(n - 1):
            d = np.where(free, dist[path[-1]], np.inf)
            path.append(int(d.argmin()))
            free[path[-1]] = False
        runs = total_runs(torch.cat([cols[path], pinned]))
        if runs < (1 - KEY_ORDER_GAIN) * best:
            best_order, best = path, runs
    if best_order is None:
        return None
    unused = sorted(set(range(movable)) - set(used))
    return [used[i] for i in best_order] + unused + list(range(movable, num_blocks))


def _gathered_blocks(q, k, v, out, lse, hs, groups, tiles, bq, bkv, num_kv_blocks, scale) -> None:
    """Query blocks with many runs: copy their key blocks together, one fused call per chunk of query blocks.
    ``groups``: by block count, ``(query block, {partial block: tile}, full blocks)``."""
    batch, heads, num_kv, dim = k[:, hs].shape
    pad = num_kv_blocks * bkv - num_kv
    kb, vb = (torch.nn.functional.pad(x[:, hs], (0, 0, 0, pad)) if pad else x[:, hs] for x in (k, v))
    kb = kb.reshape(batch, heads, num_kv_blocks, bkv, dim)
    vb = vb.reshape(batch, heads, num_kv_blocks, bkv, dim)
    in_range = (torch.arange(num_kv_blocks * bkv, device=q.device) < num_kv).view(num_kv_blocks, bkv)
    for count, members in groups.items():
        for c0 in range(0, len(members), GATHER_CHUNK):
            chunk = members[c0 : c0 + GATHER_CHUNK]
            rows = [sorted([*tile_of, *f]) for _, tile_of, f in chunk]
            blocks = torch.tensor(rows, device=q.device)  # (G, count)
            kk = kb[:, :, blocks].reshape(batch, heads, len(chunk), count * bkv, dim).transpose(1, 2)
            vv = vb[:, :, blocks].reshape(batch, heads, len(chunk), count * bkv, dim).transpose(1, 2)
            qq = torch.stack([q[:, hs, qb * bq : (qb + 1) * bq] for qb, _, _ in chunk], dim=1)  # (B, G, H, bq, D)
            need_mask = pad > 0 or any(tile_of for _, tile_of, _ in chunk)
            mask = rows_any = None
            if need_mask:
                alloweds = torch.stack(
                    [
                        _allowed(tiles, [tile_of.get(b, -1) for b in row], bq) & in_range[blocks[i]].view(1, -1)
                        for i, ((_, tile_of, _), row) in enumerate(zip(chunk, rows))
                    ]
                )  # (G, bq, count * bkv)
                mask = _additive(alloweds, q.dtype).view(1, len(chunk), 1, bq, -1).expand(batch, -1, -1, -1, -1)
                rows_any = alloweds.any(-1).view(1, len(chunk), 1, bq)
            o, l = _fused(
                qq.flatten(0, 1),
                kk.flatten(0, 1),
                vv.flatten(0, 1),
                None if mask is None else mask.flatten(0, 1),
                scale,
            )
            o = o.view(batch, len(chunk), heads, bq, dim)
            l = l.view(batch, len(chunk), heads, bq)
            if rows_any is not None:
                l = torch.where(rows_any, l, _NEG_INF)
            for i, (qb, _, _) in enumerate(chunk):
                out[:, hs, qb * bq : (qb + 1) * bq] = o[:, i]
                lse[:, hs, qb * bq : (qb + 1) * bq] = l[:, i]
