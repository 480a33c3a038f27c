"""Attention kernels: ``q, k, v, block mask -> (out, lse)``. No diffusers import here.

Backends share one signature and say what they support; ``select_backend("auto", ...)`` picks the fastest that
supports a call and explains why it rejected the others.

| backend | what | devices |
|---|---|---|
| ``reference`` | float64 dense masked attention (the oracle) | any |
| ``torch`` | block-sparse: runs of key blocks as views, fused SDPA per run, log-sum-exp merge | any |
| ``flex`` | FlexAttention, eager (exact, slow on CPU) | any |
| ``flex-compiled`` | FlexAttention under ``torch.compile`` | any (compiles per shape) |
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .block_sparse import block_sparse_attention
from .flex import flex_block_attention
from .reference import merge_attention, reference_attention

__all__ = [
    "BACKENDS",
    "KernelSupport",
    "attention",
    "block_mask_to_dense",
    "block_sparse_attention",
    "flex_block_attention",
    "merge_attention",
    "reference_attention",
    "select_backend",
]


@dataclass(frozen=True)
class KernelSupport:
    name: str
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    max_tokens: int | None = None  # dense-memory backends
    note: str = ""
    lse_devices: frozenset[str] = frozenset({"cpu", "cuda"})  # where it can return the log-sum-exp

    def rejects(self, q: Tensor, num_kv: int, need_lse: bool = False) -> str | None:
        if need_lse and q.device.type not in self.lse_devices:
            return f"{self.name}: cannot return the log-sum-exp on {q.device.type}"
        if q.device.type not in self.devices:
            return f"{self.name}: runs on {sorted(self.devices)}, not {q.device.type}"
        if q.dtype not in self.dtypes:
            return f"{self.name}: no {q.dtype}"
        if self.max_tokens is not None and max(q.shape[-2], num_kv) > self.max_tokens:
            return f"{self.name}: materialises scores; limited to {self.max_tokens} tokens"
        return None


_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
BACKENDS: dict[str, KernelSupport] = {
    "torch": KernelSupport("torch", frozenset({"cpu", "cuda"}), _FLOATS),
    "flex-compiled": KernelSupport("flex-compiled", frozenset({"cpu", "cuda"}), _FLOATS - {torch.float64},
                                   note="compiles once per (dtype, heads, length, block size)",
                                   lse_devices=frozenset({"cuda"})),
    "flex": KernelSupport("flex", frozenset({"cpu", "cuda"}), _FLOATS, max_tokens=16384,
                          note="eager: evaluates the mask on the full score matrix"),
    "reference": KernelSupport("reference", frozenset({"cpu", "cuda"}), _FLOATS, max_tokens=16384,
                               note="float64 oracle"),
}
_AUTO_ORDER = {"cpu": ("torch", "flex-compiled", "flex", "reference"), "cuda": ("flex-compiled", "torch", "flex")}


def select_backend(name: str, q: Tensor, num_kv: int, need_lse: bool = False) -> tuple[str, list[str]]:
    """The backend to run (``name`` itself unless it is ``"auto"``) and the reasons for skipping others."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown kernel backend {name!r}; choose one of {['auto', *BACKENDS]}")
        reason = BACKENDS[name].rejects(q, num_kv, need_lse)
        if reason:
            raise ValueError(f"backend {reason}; use backend='auto' to pick one that supports this call")
        return name, []
    reasons = []
    for candidate in _AUTO_ORDER.get(q.device.type, tuple(BACKENDS)):
        reason = BACKENDS[candidate].rejects(q, num_kv, need_lse)
        if reason is None:
            return candidate, reasons
        reasons.append(reason)
    raise ValueError("no kernel supports this call: " + "; ".join(reasons))


def block_mask_to_dense(block_mask: BlockMask, num_q: int, num_kv: int, head: int = 0) -> Tensor:
    """Token-level boolean mask (num_q, num_kv) of one head: kept blocks, with ``mask_mod`` inside partial blocks.
    For tests and the reference backend (it is n x n)."""
    bq, bkv = block_mask.BLOCK_SIZE
    h = head if block_mask.kv_num_blocks.shape[1] > 1 else 0
    dense = torch.zeros(num_q, num_kv, dtype=torch.bool)
    q_idx = torch.arange(num_q).view(-1, 1)
    kv_idx = torch.arange(num_kv).view(1, -1)
    allowed = block_mask.mask_mod(torch.tensor(0), torch.tensor(h), q_idx, kv_idx).expand(num_q, num_kv)
    for qb in range(math.ceil(num_q / bq)):
        rows = slice(qb * bq, (qb + 1) * bq)
        n = int(block_mask.kv_num_blocks[0, h, qb])
        for kb in block_mask.kv_indices[0, h, qb, :n].tolist():
            cols = slice(kb * bkv, (kb + 1) * bkv)
            dense[rows, cols] = allowed[rows, cols]
        if block_mask.full_kv_num_blocks is not None:
            nf = int(block_mask.full_kv_num_blocks[0, h, qb])
            for kb in block_mask.full_kv_indices[0, h, qb, :nf].tolist():
                dense[rows, kb * bkv:(kb + 1) * bkv] = True
    return dense


def _reference(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, scale: float | None) -> tuple[Tensor, Tensor]:
    heads = block_mask.kv_num_blocks.shape[1]
    masks = torch.stack([block_mask_to_dense(block_mask, q.shape[-2], k.shape[-2], h) for h in range(heads)])
    return reference_attention(q, k, v, mask=masks.unsqueeze(0).to(q.device), scale=scale)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: BlockMask,
    *,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Block-sparse attention with the chosen backend: ``(out, lse)``, lse float32 of shape (B, H, Sq) (``None``
    when ``return_lse=False`` and the backend does not compute it)."""
    name, _ = select_backend(backend, q, k.shape[-2], need_lse=return_lse)
    if name == "torch":
        return block_sparse_attention(q, k, v, block_mask, scale=scale)
    if name in ("flex", "flex-compiled"):
        return flex_block_attention(q, k, v, block_mask, scale=scale, compiled=name == "flex-compiled",
                                    return_lse=return_lse)
    out, lse = _reference(q, k, v, block_mask, scale)
    return out, lse.float()
