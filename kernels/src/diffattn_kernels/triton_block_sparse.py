"""Block-sparse flash attention in Triton, driven by a FlexAttention ``BlockMask``: the ``triton`` backend.

One program per (query tile, batch x head). It walks the key/value blocks the mask lists for its query block,
first the *full* blocks (no element mask, only a bounds mask on a ragged last block), then the *partial* blocks,
where the element mask comes from a packed bit tile (see below). Online softmax in base 2 with fp32 accumulation;
the output is written in the input dtype and the log-sum-exp (natural log) in float32.

Element mask of partial blocks
    ``mask_mod`` is a Python function that Triton cannot call. It is evaluated once per block mask, only inside
    the blocks the mask lists as partial, and packed into bit tiles of ``BQ`` rows x ``ceil(BKV / 32)`` int32
    words, bit ``c % 32`` of word ``c // 32`` of row ``r`` saying whether query ``r`` of the block may see key
    ``c`` (positions past the sequence ends are 0). Identical tiles are stored once; an int32 per listed partial
    block (shaped like ``kv_indices``) says which tile it uses. Memory: ``distinct tiles x BQ x BKV / 8`` bytes
    (2 KiB per 128 x 128 tile) plus 4 bytes per listed block: nothing for tile-granular patterns (no partial
    blocks), little for windows and shifted windows (their partial blocks repeat a few shapes), up to ``partial
    blocks x 2 KiB`` for masks without repetition. Building the tiles costs one evaluation of ``mask_mod`` per
    element of every partial block (chunked, on the mask's device), once per block mask. The alternative,
    pattern-specific closed forms evaluated in the kernel, would avoid both but needs kernel code per pattern;
    the bit tiles serve every ``mask_mod`` (compositions, per-head patterns, user masks) unchanged. Tiles are
    cached per block mask (weakly, so they go when the mask goes) and per sequence lengths / device.

Rows that see no key (all their blocks empty or masked) are defined as output 0 and log-sum-exp ``-inf``, as
in the float64 reference and the ``torch`` backend; they never produce NaN.

Block sizes: the mask's blocks (``BQ x BKV`` tokens, any size, e.g. a 3 x 2 tile of 6 tokens) are covered by
power-of-two kernel tiles ``BLOCK_M x BLOCK_N`` (at least 16); a mask block larger than a tile is split into
several tiles, a smaller or odd-sized one is covered by one tile with the extra rows / columns masked out.
Head dims up to 256 (non powers of two such as 80 and 96 are padded to the next power of two with zeros).

Under ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (slowly: for tests). There it upcasts every load to
fp32 (the interpreter computes bf16 dots wrongly); probabilities are still rounded to the value dtype before the
second product, as on the GPU, so both paths compute the same numbers up to summation order.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import weakref

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask
from triton.runtime.errors import OutOfResources

from .errors import refuse_grad

__all__ = [
    "interpreting",
    "partial_block_bits",
    "triton_block_sparse_attention",
]

logger = logging.getLogger(__name__)

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256
_MASK_CHUNK_ELEMENTS = 1 << 22


# Row reductions go through ``tl.reduce`` with triton's own combine functions rather than ``tl.max`` / ``tl.sum``:
# those are jitted helpers of ``triton.language.standard``, built when triton is imported, and if that import
# happened before ``TRITON_INTERPRET=1`` was set (torch and diffusers import triton) the interpreter refuses to
# call them. ``tl.reduce`` is a builtin the interpreter patches, and it recognises these combine functions and
# reduces with numpy. Compiled, it is exactly what ``tl.max`` / ``tl.sum`` do.
_MAX_COMBINE = tl.standard._elementwise_max
_SUM_COMBINE = tl.standard._sum_combine


def interpreting() -> bool:
    """Whether Triton kernels run under the interpreter (``TRITON_INTERPRET=1``, read when a kernel is built)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _attn_fwd(
    Q,
    K,
    V,
    O,
    LSE,
    FULL_NUM,
    FULL_IDX,
    PART_NUM,
    PART_IDX,
    PART_TILE,
    BITS,
    qk_scale,
    Sq,
    Skv,
    H,
    KV_GROUP,
    HEAD_DIM,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_lb,
    stride_lh,
    stride_nb,
    stride_nh,
    stride_ib,
    stride_ih,
    stride_im,
    stride_fb,
    stride_fh,
    stride_jb,
    stride_jh,
    stride_jm,
    BQ: tl.constexpr,
    BKV: tl.constexpr,
    WORDS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SUB_M: tl.constexpr,
    SUB_N: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_D: tl.constexpr,
    DENSE: tl.constexpr,
    HAS_PARTIAL: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    qb = pid_m // SUB_M
    sub = pid_m % SUB_M
    row0 = qb * BQ + sub * BLOCK_M
    if row0 >= Sq:  # a tile past the end of a short last query block
        return

    rows_in = sub * BLOCK_M + tl.arange(0, BLOCK_M)  # row within the mask's query block
    rows = qb * BQ + rows_in
    row_ok = (rows_in < BQ) & (rows < Sq)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM

    b64 = b.to(tl.int64)
    q_ptrs = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + rows[:, None] * stride_qm + dims[None, :] * stride_qd
    if EVEN_M and EVEN_D:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    kvh = (h // KV_GROUP).to(tl.int64)
    k_base = K + b64 * stride_kb + kvh * stride_kh
    v_base = V + b64 * stride_vb + kvh * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)

    # ---- full blocks: no element mask
    if DENSE:
        n_full = (Skv + BKV - 1) // BKV
    else:
        n_full = tl.load(FULL_NUM + b * stride_fb + h * stride_fh + qb)
    for j in range(0, n_full):
        if DENSE:
            kb = j
        else:
            kb = tl.load(FULL_IDX + b * stride_jb + h * stride_jh + qb * stride_jm + j)
        for t in tl.static_range(SUB_N):
            cols_in = t * BLOCK_N + tl.arange(0, BLOCK_N)
            cols = kb * BKV + cols_in
            col_ok = (cols_in < BKV) & (cols < Skv)
            k_ptrs = k_base + cols[None, :] * stride_kn + dims[:, None] * stride_kd
            v_ptrs = v_base + cols[:, None] * stride_vn + dims[None, :] * stride_vd
            if EVEN_N and EVEN_D:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                k = tl.load(k_ptrs, mask=col_ok[None, :] & dim_ok[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            if IEEE:
                s = tl.dot(q, k, input_precision="ieee")
            else:
                s = tl.dot(q, k)
            s = s * qk_scale
            if not EVEN_N:
                s = tl.where(col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX_COMBINE))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.reduce(p, 1, _SUM_COMBINE)
            p = p.to(V.dtype.element_ty)
            if UPCAST:
                p = p.to(tl.float32)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p, v)
            m_i = m_new

    # ---- partial blocks: element mask from the packed bit tiles
    if HAS_PARTIAL:
        n_part = tl.load(PART_NUM + b * stride_nb + h * stride_nh + qb)
        for j in range(0, n_part):
            entry = b * stride_ib + h * stride_ih + qb * stride_im + j
            kb = tl.load(PART_IDX + entry)
            tile = tl.load(PART_TILE + entry).to(tl.int64)
            bits_base = BITS + tile * (BQ * WORDS)
            for t in tl.static_range(SUB_N):
                cols_in = t * BLOCK_N + tl.arange(0, BLOCK_N)
                cols = kb * BKV + cols_in
                col_ok = (cols_in < BKV) & (cols < Skv)
                k_ptrs = k_base + cols[None, :] * stride_kn + dims[:, None] * stride_kd
                v_ptrs = v_base + cols[:, None] * stride_vn + dims[None, :] * stride_vd
                if EVEN_N and EVEN_D:
                    k = tl.load(k_ptrs)
                    v = tl.load(v_ptrs)
                else:
                    k = tl.load(k_ptrs, mask=col_ok[None, :] & dim_ok[:, None], other=0.0)
                    v = tl.load(v_ptrs, mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
                if UPCAST:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                word_ptrs = bits_base + rows_in[:, None] * WORDS + (cols_in[None, :] >> 5)
                words = tl.load(word_ptrs, mask=(rows_in[:, None] < BQ) & (cols_in[None, :] < BKV), other=0)
                allowed = ((words >> (cols_in[None, :] & 31)) & 1) != 0
                if IEEE:
                    s = tl.dot(q, k, input_precision="ieee")
                else:
                    s = tl.dot(q, k)
                s = tl.where(allowed, s * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX_COMBINE))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.math.exp2(s - m_safe[:, None])
                alpha = tl.math.exp2(m_i - m_safe)
                l_i = l_i * alpha + tl.reduce(p, 1, _SUM_COMBINE)
                p = p.to(V.dtype.element_ty)
                if UPCAST:
                    p = p.to(tl.float32)
                if IEEE:
                    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p, v)
                m_i = m_new

    # ---- epilogue: rows without any key give 0 and lse -inf
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_ptrs = O + b64 * stride_ob + h.to(tl.int64) * stride_oh + rows[:, None] * stride_om + dims[None, :] * stride_od
    out = out.to(O.dtype.element_ty)
    if EVEN_M and EVEN_D:
        tl.store(o_ptrs, out)
    else:
        tl.store(o_ptrs, out, mask=row_ok[:, None] & dim_ok[None, :])
    l_ptrs = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + rows
    if EVEN_M:
        tl.store(l_ptrs, lse)
    else:
        tl.store(l_ptrs, lse, mask=row_ok)


@functools.lru_cache(maxsize=2)
def _kernel(interpret: bool):
    """The jitted kernel. Built lazily, once per mode: ``triton.jit`` decides at decoration time whether it
    interprets, so a test can set ``TRITON_INTERPRET=1`` after triton itself was imported."""
    return triton.jit(_attn_fwd)


# --------------------------------------------------------------------------------------------------------------------
# host side


def _pow2_at_least(n: int, low: int = 16) -> int:
    return max(low, 1 << max(0, (n - 1).bit_length()))


def _tile(block: int, cap: int) -> int:
    """Power-of-two kernel tile (16..cap) covering a mask block of ``block`` tokens: the largest whose padding
    wastes at most a quarter of the covered rows/columns (a 48-token block gets one 64 tile, 128 gets 128)."""
    best = 16
    p = 16
    while p <= cap:
        covered = math.ceil(block / p) * p
        if (covered - block) * 4 <= covered:
            best = p
        p *= 2
    return best


# Kernel tile configs (BLOCK_M cap, BLOCK_N cap, warps, stages), largest first. Shared memory measured with
# triton 3.9 for sm80 / sm90 at 128-token mask blocks: fp16 D=64 (128, 64, 4, 2) 96 KiB; D=128 (128, 64, 8, 1)
# 72 KiB; fp32 D=64 (64, 64, 4, 1) 52 KiB, D=128 (64, 32, 4, 1) 66 KiB. A config that does not fit the device
# (e.g. 99 KiB per block on sm86 / sm89) raises OutOfResources at launch and the next one is tried (remembered).
_CONFIGS_16 = {
    64: [(128, 64, 4, 2), (64, 64, 4, 2), (64, 32, 4, 1)],
    128: [(128, 64, 8, 1), (64, 64, 4, 2), (64, 32, 4, 1)],
    256: [(64, 64, 8, 1), (64, 32, 4, 1), (32, 32, 4, 1)],
}
_CONFIGS_32 = {
    64: [(64, 64, 4, 1), (64, 32, 4, 1), (32, 32, 4, 1)],
    128: [(64, 32, 4, 1), (32, 32, 4, 1)],
    256: [(32, 32, 4, 1), (16, 16, 4, 1)],
}
_WORKING_CONFIG: dict[tuple, int] = {}


def _configs(dtype: torch.dtype, block_d: int) -> list[tuple[int, int, int, int]]:
    table = _CONFIGS_32 if dtype == torch.float32 else _CONFIGS_16
    return table[max(64, block_d)]


_BITS_CACHE: weakref.WeakKeyDictionary[BlockMask, dict] = weakref.WeakKeyDictionary()


def partial_block_bits(
    block_mask: BlockMask, num_q: int, num_kv: int, device: torch.device | str
) -> tuple[Tensor, Tensor]:
    """Packed element masks of the partial blocks of ``block_mask``: ``(tile_index, bits)``.

    ``bits`` is int32 ``(tiles, BQ, ceil(BKV / 32))``, one tile per *distinct* element mask; ``tile_index`` (int32,
    shaped like ``kv_indices``) gives the tile of each listed partial block (entries past ``kv_num_blocks`` are 0).
    Identical tiles are stored once: a window pattern repeats a few block-level shapes across the sequence, so the
    tiles cost little memory even when most kept blocks are partial. Evaluates ``mask_mod`` on the partial blocks
    only (chunked), never on the whole score matrix. Cached per block mask, sequence lengths and device.
    """
    device = torch.device(device)
    key = (int(num_q), int(num_kv), str(device))
    try:
        per_mask = _BITS_CACHE.setdefault(block_mask, {})
    except TypeError:  # not weak-referenceable: compute without caching
        per_mask = {}
    if key in per_mask:
        return per_mask[key]
    bq, bkv = block_mask.BLOCK_SIZE
    words = math.ceil(bkv / 32)
    mask_device = block_mask.kv_indices.device
    nums = block_mask.kv_num_blocks.to(torch.int64)
    listed = torch.arange(block_mask.kv_indices.shape[-1], device=mask_device) < nums.unsqueeze(-1)
    flat = torch.nonzero(listed)  # (entries, 4): batch, head, query block, position in kv_indices
    kv_block = block_mask.kv_indices[listed].to(torch.int64)
    weights = torch.ones(32, dtype=torch.int64, device=mask_device) << torch.arange(32, device=mask_device)
    rows = torch.arange(bq, device=mask_device)
    cols = torch.arange(words * 32, device=mask_device)
    budget = _MASK_CHUNK_ELEMENTS * (4 if mask_device.type == "cuda" else 1)
    chunk = max(1, budget // (bq * words * 32))
    uniques, inverses, offset = [], [], 0
    for c0 in range(0, flat.shape[0], chunk):
        sel = slice(c0, c0 + chunk)
        bb, hh = flat[sel, 0].view(-1, 1, 1), flat[sel, 1].view(-1, 1, 1)
        q_idx = flat[sel, 2].view(-1, 1, 1) * bq + rows.view(1, -1, 1)
        kv_idx = kv_block[sel].view(-1, 1, 1) * bkv + cols.view(1, 1, -1)
        inside = (q_idx < num_q) & (kv_idx < num_kv) & (cols.view(1, 1, -1) < bkv)
        allowed = block_mask.mask_mod(bb, hh, q_idx.clamp(max=num_q - 1), kv_idx.clamp(max=num_kv - 1))
        allowed = (allowed & inside).to(torch.int64).view(-1, bq, words, 32)
        packed = (allowed * weights).sum(-1)
        packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)  # two's complement
        unique, inverse = torch.unique(packed.view(packed.shape[0], -1), dim=0, return_inverse=True)
        uniques.append(unique)
        inverses.append(inverse + offset)
        offset += unique.shape[0]
    tile_index = torch.zeros(block_mask.kv_indices.shape, dtype=torch.int32, device=mask_device)
    if uniques:
        bits, merged = torch.unique(torch.cat(uniques), dim=0, return_inverse=True)
        tile_index[listed] = merged[torch.cat(inverses)].to(torch.int32)
        bits = bits.view(-1, bq, words)
    else:
        bits = torch.zeros(1, bq, words, dtype=torch.int32, device=mask_device)
    result = (tile_index.to(device).contiguous(), bits.to(device).contiguous())
    per_mask[key] = result
    return result


def _check(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask | None) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"expected 4-D (B, H, S, D) tensors, got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"the triton kernel takes float16, bfloat16 or float32 q, k, v of one dtype; got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.shape[-1] != k.shape[-1] or v.shape[-1] != q.shape[-1]:
        raise ValueError("the triton kernel needs one head dim for q, k and v")
    if q.shape[-1] > _MAX_HEAD_DIM:
        raise ValueError(f"the triton kernel supports head dims up to {_MAX_HEAD_DIM}, got {q.shape[-1]}")
    if k.shape[:3] != v.shape[:3] or k.shape[0] != q.shape[0] or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"k{tuple(k.shape)} and v{tuple(v.shape)} do not fit q{tuple(q.shape)} (GQA needs query "
            "heads a multiple of key/value heads)"
        )
    if q.device != k.device or q.device != v.device:
        raise ValueError("q, k and v must be on one device")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"the triton kernel runs on CUDA tensors (got {q.device.type}); on CPU only under the "
            "Triton interpreter (TRITON_INTERPRET=1, for tests)"
        )
    if block_mask is None:
        return
    nb, nh, nqb = block_mask.kv_num_blocks.shape
    if nb not in (1, q.shape[0]) or nh not in (1, q.shape[1]):
        raise ValueError(
            f"block mask of batch {nb} and {nh} heads does not fit q{tuple(q.shape)}: use 1 or "
            f"{q.shape[0]} batch entries and 1 or {q.shape[1]} heads"
        )
    bq, bkv = block_mask.BLOCK_SIZE
    if nqb < math.ceil(q.shape[-2] / bq):
        raise ValueError(f"block mask covers {nqb} query blocks of {bq}; the call has {q.shape[-2]} queries")
    if block_mask.kv_indices.shape[-1] > math.ceil(k.shape[-2] / bkv):
        raise ValueError(
            f"block mask lists {block_mask.kv_indices.shape[-1]} key blocks of {bkv}; the call has only "
            f"{k.shape[-2]} keys (build the mask for this length)"
        )


def triton_block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: BlockMask | None,
    *,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    dense_block: int = 128,
) -> tuple[Tensor, Tensor]:
    """Attention of ``q`` (B, H, Sq, D) over ``k``/``v`` (B, Hkv, Skv, D) restricted to ``block_mask``.

    Returns ``(out, lse)``: ``out`` in q's dtype, ``lse`` float32 (B, H, Sq), natural log; rows with no allowed
    key give 0 and ``-inf``. ``block_mask=None`` means dense attention (all keys, blocks of ``dense_block``).
    The mask's batch and head dims may be 1 (shared) or B / H. ``block_m`` / ``block_n`` override the kernel tile
    (powers of two >= 16). Forward only: refuses inputs that require grad (use the ``torch`` backend).
    """
    refuse_grad("triton", q, k, v)
    _check(q, k, v, block_mask)
    batch, heads, num_q, dim = q.shape
    num_kv = k.shape[-2]
    device = q.device
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, num_q, dtype=torch.float32, device=device)
    if num_q == 0:
        return out, lse
    if num_kv == 0:
        return out.zero_(), lse.fill_(float("-inf"))

    if block_mask is None:
        bq = bkv = int(dense_block)
        dummy_i = torch.zeros(1, dtype=torch.int32, device=device)
        full_num = full_idx = part_num = part_idx = part_tile = dummy_i
        bits = dummy_i
        mask_strides = (0,) * 10
        has_partial = False
    else:
        bq, bkv = (int(x) for x in block_mask.BLOCK_SIZE)
        nb, nh, _ = block_mask.kv_num_blocks.shape
        part_num = block_mask.kv_num_blocks.to(device=device, dtype=torch.int32).contiguous()
        part_idx = block_mask.kv_indices.to(device=device, dtype=torch.int32).contiguous()
        if block_mask.full_kv_num_blocks is not None:
            full_num = block_mask.full_kv_num_blocks.to(device=device, dtype=torch.int32).contiguous()
            full_idx = block_mask.full_kv_indices.to(device=device, dtype=torch.int32).contiguous()
        else:
            full_num = torch.zeros_like(part_num)
            full_idx = torch.zeros_like(part_idx[..., :1])
        has_partial = bool(int(block_mask.kv_num_blocks.max()) > 0) if block_mask.kv_num_blocks.numel() else False
        if has_partial:
            part_tile, bits = partial_block_bits(block_mask, num_q, num_kv, device)
        else:
            part_tile = torch.zeros_like(part_idx)
            bits = torch.zeros(1, dtype=torch.int32, device=device)

        def bh_strides(t: Tensor) -> tuple[int, int]:
            return (0 if nb == 1 else t.stride(0)), (0 if nh == 1 else t.stride(1))

        mask_strides = (
            *bh_strides(part_num),
            *bh_strides(part_idx),
            part_idx.stride(2),
            *bh_strides(full_num),
            *bh_strides(full_idx),
            full_idx.stride(2),
        )

    interp = interpreting() or device.type != "cuda"
    block_d = _pow2_at_least(dim)
    args = (
        q,
        k,
        v,
        out,
        lse,
        full_num,
        full_idx,
        part_num,
        part_idx,
        part_tile,
        bits,
        scale * _LOG2E,
        num_q,
        num_kv,
        heads,
        heads // k.shape[1],
        dim,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        lse.stride(0),
        lse.stride(1),
        *mask_strides,
    )
    configs = _configs(q.dtype, block_d) if not interp else [(128 if block_d <= 64 else 64, 64, 4, 1)]
    if block_m or block_n:
        configs = [(block_m or c[0], block_n or c[1], c[2], c[3]) for c in configs[:1]]
    key = (str(device), q.dtype, block_d, bq, bkv, block_m, block_n, interp)
    start = min(_WORKING_CONFIG.get(key, 0), len(configs) - 1)
    for index in range(start, len(configs)):
        cap_m, cap_n, warps, stages = configs[index]
        bm = cap_m if block_m else _tile(bq, cap_m)
        bn = cap_n if block_n else _tile(bkv, cap_n)
        for name, value in (("block_m", bm), ("block_n", bn)):
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        sub_m, sub_n = math.ceil(bq / bm), math.ceil(bkv / bn)
        grid = (sub_m * math.ceil(num_q / bq), batch * heads)
        try:
            _kernel(interpreting())[grid](
                *args,
                BQ=bq,
                BKV=bkv,
                WORDS=math.ceil(bkv / 32),
                BLOCK_M=bm,
                BLOCK_N=bn,
                BLOCK_D=block_d,
                SUB_M=sub_m,
                SUB_N=sub_n,
                EVEN_M=bq % bm == 0 and num_q % bq == 0,
                EVEN_N=bkv % bn == 0 and num_kv % bkv == 0,
                EVEN_D=block_d == dim,
                DENSE=block_mask is None,
                HAS_PARTIAL=has_partial,
                UPCAST=interp,
                IEEE=q.dtype == torch.float32,
                num_warps=warps,
                num_stages=stages,
            )
        except OutOfResources:
            if index + 1 == len(configs):
                raise
            logger.info(
                "triton attention: tile config %s needs too much shared memory on %s; trying a smaller one",
                configs[index],
                device,
            )
            continue
        _WORKING_CONFIG[key] = index
        break
    return out, lse
