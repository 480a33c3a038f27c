"""Attention kernels: ``q, k, v, block mask -> (out, lse)``. No diffusers import here.

Backends share one signature and say what they support; ``select_backend("auto", ...)`` picks the fastest that
supports a call and explains why it rejected the others.

Backends (what; devices; backward):

- ``reference``: float64 dense masked attention (the oracle); CPU, CUDA; backward through autograd of its torch ops.
- ``torch``: block-sparse. On x86 (AVX-512, AVX2) and ARM CPUs a compiled loop (``cpu_block_sparse``: vectorised
  float32 GEMMs per ISA build, online softmax) for query blocks that see whole key blocks; otherwise runs of key
  blocks as views, fused SDPA per run, log-sum-exp merge. Any device (the fallback for devices no backend lists:
  mps, xpu, ...); backward in :mod:`.ops` (custom op, flash-style backward).
- ``flex``: FlexAttention, eager (exact, slow on CPU); CPU, CUDA; backward on CUDA only (none on CPU).
- ``flex-compiled``: FlexAttention under ``torch.compile``; CPU, CUDA (compiles per shape); backward on CUDA only.
- ``triton``: block-sparse flash attention in Triton (``triton_block_sparse.py``); CUDA, and CPU only under
  ``TRITON_INTERPRET=1`` (tests); no backward.
- ``xformers``: xformers memory-efficient attention for dense and local (one key run per query block) masks; CUDA;
  no backward.

``triton`` and ``xformers`` are optional (the ``gpu`` extra) and imported only when a call runs on them. A call whose
q, k or v requires grad (with grad mode on) goes only to backends with a backward; the others raise
:class:`KernelUnsupportedError` naming one that has it. The ``torch`` backend is the custom op
``diffattn::block_sparse_attention`` with a fake implementation, so ``torch.compile(..., fullgraph=True)`` traces
through ``attention(..., backend="torch")``. Importing this package changes no process-wide setting.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .block_sparse import dense_attention
from .errors import GRAD_ALTERNATIVE, KernelUnsupportedError, needs_grad
from .flex import flex_block_attention
from .joint import dense_block_mask, key_padding_block_mask, split_text_attention
from .ops import block_sparse_attention
from .reference import merge_attention, reference_attention

__all__ = [
    "BACKENDS",
    "KernelSupport",
    "KernelUnsupportedError",
    "attention",
    "block_mask_to_dense",
    "block_sparse_attention",
    "dense_attention",
    "dense_block_mask",
    "flex_block_attention",
    "key_padding_block_mask",
    "split_text_attention",
    "merge_attention",
    "reference_attention",
    "select_backend",
]


@dataclass(frozen=True)
class KernelSupport:
    """What a backend supports. Device sets: ``None`` means any device torch runs on."""

    name: str
    devices: frozenset[str] | None
    dtypes: frozenset[torch.dtype]
    max_tokens: int | None = None  # dense-memory backends
    note: str = ""
    lse_devices: frozenset[str] | None = None  # where it can return the log-sum-exp (None: wherever it runs)
    grad_devices: frozenset[str] | None = None  # where it has a backward (None: wherever it runs)
    # Further conditions (installed package, interpreter, head dim, mask structure): (q, num_kv, block_mask) ->
    # the reason it cannot run the call, or None.
    check: Callable[[Tensor, int, BlockMask | None], str | None] | None = field(default=None, compare=False)

    def rejects(
        self,
        q: Tensor,
        num_kv: int,
        need_lse: bool = False,
        block_mask: BlockMask | None = None,
        need_grad: bool = False,
    ) -> str | None:
        device = q.device.type
        if need_lse and self.lse_devices is not None and device not in self.lse_devices:
            return f"{self.name}: cannot return the log-sum-exp on {device}"
        if self.devices is not None and device not in self.devices:
            return f"{self.name}: runs on {sorted(self.devices)}, not {device}"
        if need_grad and self.grad_devices is not None and device not in self.grad_devices:
            where = f"on {device} " if self.grad_devices else ""
            return f"{self.name}: no backward {where}(q, k or v requires grad); {GRAD_ALTERNATIVE}"
        if q.dtype not in self.dtypes:
            return f"{self.name}: no {q.dtype}"
        if self.max_tokens is not None and max(q.shape[-2], num_kv) > self.max_tokens:
            return f"{self.name}: materialises scores; limited to {self.max_tokens} tokens"
        if self.check is not None:
            reason = self.check(q, num_kv, block_mask)
            if reason:
                return f"{self.name}: {reason}"
        return None


def _triton_check(q: Tensor, num_kv: int, block_mask: BlockMask | None) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton, or the diffattn[gpu] extra)"
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return (
            "runs on CPU only under the Triton interpreter (TRITON_INTERPRET=1, for tests; ~1000x slower than "
            "SDPA); on CPU use backend='torch'"
        )
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} > 256"
    if block_mask is not None:
        nb, nh, _ = block_mask.kv_num_blocks.shape
        if nb not in (1, q.shape[0]) or nh not in (1, q.shape[1]):
            return f"block mask of batch {nb} and {nh} heads does not fit {q.shape[0]} x {q.shape[1]}"
    return None


def _xformers_check(q: Tensor, num_kv: int, block_mask: BlockMask | None) -> str | None:
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed"
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} > 256"
    if block_mask is None:
        return None
    from .xformers_attention import mask_structure

    kind, reason = mask_structure(block_mask, q.shape[-2], num_kv)
    return None if kind else f"serves dense and local masks only: {reason}"


_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_CPU_CUDA = frozenset({"cpu", "cuda"})
BACKENDS: dict[str, KernelSupport] = {
    "torch": KernelSupport("torch", None, _FLOATS, note="block-sparse with backward; runs wherever torch does"),
    "flex-compiled": KernelSupport(
        "flex-compiled",
        _CPU_CUDA,
        _FLOATS - {torch.float64},
        note="compiles once per (dtype, heads, length, block size)",
        lse_devices=frozenset({"cuda"}),
        grad_devices=frozenset({"cuda"}),
    ),
    "flex": KernelSupport(
        "flex",
        _CPU_CUDA,
        _FLOATS,
        max_tokens=16384,
        note="eager: evaluates the mask on the full score matrix",
        grad_devices=frozenset({"cuda"}),
    ),
    "reference": KernelSupport("reference", _CPU_CUDA, _FLOATS, max_tokens=16384, note="float64 oracle"),
    "triton": KernelSupport(
        "triton",
        _CPU_CUDA,
        frozenset({torch.float16, torch.bfloat16, torch.float32}),
        note="fused block-sparse flash attention; CPU only under TRITON_INTERPRET=1",
        grad_devices=frozenset(),
        check=_triton_check,
    ),
    "xformers": KernelSupport(
        "xformers",
        frozenset({"cuda"}),
        frozenset({torch.float16, torch.bfloat16, torch.float32}),
        note="dense and local (one key run per query block) masks",
        grad_devices=frozenset(),
        check=_xformers_check,
    ),
}
# The Triton interpreter is never chosen automatically on CPU (it is for tests). Devices not listed here (mps, xpu,
# ...) get the torch backend, the one that runs on any device.
_AUTO_ORDER = {
    "cpu": ("torch", "flex-compiled", "flex", "reference"),
    "cuda": ("xformers", "triton", "flex-compiled", "torch", "flex"),
}
_AUTO_OTHER_DEVICES = ("torch",)


def select_backend(
    name: str,
    q: Tensor,
    num_kv: int,
    need_lse: bool = False,
    block_mask: BlockMask | None = None,
    need_grad: bool = False,
) -> tuple[str, list[str]]:
    """The backend to run (``name`` itself unless it is ``"auto"``) and the reasons for skipping others.
    ``block_mask`` (optional) lets backends that serve only some mask structures (xformers) check the call;
    ``need_grad``: the call must be differentiable. Raises :class:`KernelUnsupportedError` (a ``ValueError``)."""
    if name != "auto":
        if name not in BACKENDS:
            raise KernelUnsupportedError(f"unknown kernel backend {name!r}; choose one of {['auto', *BACKENDS]}")
        reason = BACKENDS[name].rejects(q, num_kv, need_lse, block_mask, need_grad)
        if reason:
            raise KernelUnsupportedError(f"backend {reason}; use backend='auto' to pick one that supports this call")
        return name, []
    reasons = []
    for candidate in _AUTO_ORDER.get(q.device.type, _AUTO_OTHER_DEVICES):
        reason = BACKENDS[candidate].rejects(q, num_kv, need_lse, block_mask, need_grad)
        if reason is None:
            return candidate, reasons
        reasons.append(reason)
    raise KernelUnsupportedError("no kernel supports this call: " + "; ".join(reasons))


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
                dense[rows, kb * bkv : (kb + 1) * bkv] = True
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
    when ``return_lse=False`` and the backend does not compute it). Differentiable when q, k or v requires grad
    (backends without a backward are refused, or skipped by ``"auto"``)."""
    name, _ = select_backend(
        backend, q, k.shape[-2], need_lse=return_lse, block_mask=block_mask, need_grad=needs_grad(q, k, v)
    )
    if name == "torch":
        return block_sparse_attention(q, k, v, block_mask, scale=scale)
    if name == "triton":
        from .triton_block_sparse import triton_block_sparse_attention

        return triton_block_sparse_attention(q, k, v, block_mask, scale=scale)
    if name == "xformers":
        from .xformers_attention import xformers_block_attention

        return xformers_block_attention(q, k, v, block_mask, scale=scale, return_lse=return_lse)
    if name in ("flex", "flex-compiled"):
        return flex_block_attention(
            q, k, v, block_mask, scale=scale, compiled=name == "flex-compiled", return_lse=return_lse
        )
    out, lse = _reference(q, k, v, block_mask, scale)
    return out, lse.float()
