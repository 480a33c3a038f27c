"""The ``torch`` backend's compiled CPU inner loop (``kernels/src/csrc/block_sparse_cpu.cpp``), built on first use.

Query blocks that see whole key blocks only (sliding tile, radial, top-k selections) are computed here when the
extension builds and the CPU has oneDNN's batch-reduce GEMM for the dtype (AVX-512; AMX for bf16): one task per
(batch, head, query block) walks that block's key runs with an online softmax, reading K and V packed once per
call. It replaces a stack of SDPA calls whose per-call query split and key repacking cost most in bf16.

``DIFFATTN_CPU_KERNEL=0`` turns it off (the SDPA path computes the same thing); :func:`status` says whether it is
in use and, if not, why.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DTYPES", "attend", "extension", "status", "supports"]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "block_sparse_cpu.cpp"
# dtypes routed to the compiled loop (others use the SDPA path)
DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float32)
_FLAGS = ["-O3", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
          "-mavx512dq", "-mfma"]
# keys per score tile (rounded down to whole key blocks, at least one)
KV_TILE = 256
_STATUS: dict[str, str] = {"state": "not built yet (built on the first CPU call)"}


@lru_cache(maxsize=1)
def extension() -> Any | None:
    """The compiled module, or None (with the reason in :func:`status`) when it is disabled or cannot build."""
    if os.environ.get("DIFFATTN_CPU_KERNEL", "1") == "0":
        _STATUS["state"] = "disabled by DIFFATTN_CPU_KERNEL=0"
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512":
        _STATUS["state"] = f"not used: needs an AVX-512 CPU (torch reports {capability})"
        return None
    try:
        from torch.utils.cpp_extension import load

        logger.info("diffattn: building the CPU block-sparse loop %s (once per source version, ~30 s)", SOURCE.name)
        with _tools_on_path():
            module = load(name="diffattn_block_sparse_cpu", sources=[str(SOURCE)], extra_cflags=_FLAGS, verbose=False)
    except Exception as exc:  # no compiler / ninja: the SDPA path still computes the same result, only slower
        _STATUS["state"] = f"not used: building {SOURCE.name} failed ({type(exc).__name__}: {exc})"
        logger.warning("diffattn: %s; block-sparse attention falls back to SDPA calls (slower, same result). "
                       "Install a C++ compiler and ninja (`pip install ninja`) to build it.", _STATUS["state"])
        return None
    _STATUS["state"] = "in use"
    return module


@contextlib.contextmanager
def _tools_on_path() -> Iterator[None]:
    """The environment's scripts folder on PATH while building: torch finds ``ninja`` through PATH, and a virtual
    environment used without activation (``.venv/bin/python ...``) has its ``ninja`` only there."""
    scripts = sysconfig.get_path("scripts")
    old = os.environ.get("PATH", "")
    if scripts in old.split(os.pathsep):
        yield
        return
    os.environ["PATH"] = os.pathsep.join([scripts, old]) if old else scripts
    try:
        yield
    finally:
        os.environ["PATH"] = old


def status() -> str:
    """Whether the compiled loop is in use and, if not, why."""
    return _STATUS["state"]


def _brgemm(dtype: torch.dtype) -> bool:
    """oneDNN's brgemm runs float32 on any AVX-512 CPU; bfloat16 needs AMX or AVX512-BF16 (cpublas' own check)."""
    module = extension()
    return module is not None and (dtype == torch.float32 or module.bf16_brgemm_supported())


def supports(q: Tensor) -> bool:
    """Whether :func:`attend` can compute this call (CPU, a routed dtype, even head dim, extension built)."""
    return (q.device.type == "cpu" and q.dtype in DTYPES and q.shape[-1] % 2 == 0 and q.stride(-1) == 1
            and _brgemm(q.dtype))


def _pack(k: Tensor, v: Tensor, block: int, order: list[int] | None = None) -> tuple[Tensor, Tensor]:
    """K^T and V padded to whole key blocks, key blocks in ``order`` (block i of the copy is block ``order[i]``;
    a partial last block must stay last), in the layouts the kernel reads (VNNI-2 pairs in bf16)."""
    pad = (-k.shape[2]) % block
    if pad:
        k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
    if order is not None:
        index = torch.tensor(order, device=k.device)
        k, v = (x.unflatten(2, (x.shape[2] // block, block)).index_select(2, index).flatten(2, 3) for x in (k, v))
    blocks = k.unflatten(2, (k.shape[2] // block, block))  # (B, H, S/Bk, Bk, D)
    if k.dtype == torch.bfloat16:
        kp = blocks.unflatten(-1, (k.shape[-1] // 2, 2)).permute(0, 1, 2, 4, 3, 5).contiguous()  # (B,H,S/Bk,D/2,Bk,2)
        vp = v.unflatten(2, (v.shape[2] // 2, 2)).transpose(3, 4).contiguous()  # (B, H, S/2, D, 2)
        return kp, vp
    return blocks.transpose(-1, -2).contiguous(), v.contiguous()  # (B, H, S/Bk, D, Bk), (B, H, S, D)


def attend(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
           members: list[tuple[int, list[tuple[int, int]]]], bq: int, bkv: int, scale: float,
           key_order: list[int] | None = None) -> None:
    """Write ``out`` and ``lse`` (views of the full outputs, (B, H, Sq, D) and (B, H, Sq)) for the query blocks in
    ``members``: ``(query_block, [(first_key_block, stop_key_block), ...])``, every listed block whole; with
    ``key_order``, the runs index a copy of the key blocks in that order."""
    module = extension()
    if module is None:
        raise RuntimeError(f"the compiled block-sparse loop is unavailable: {status()}")
    kp, vp = _pack(k, v, bkv, key_order)
    starts = torch.tensor([qb * bq for qb, _ in members], dtype=torch.int64)
    counts = torch.tensor([0] + [len(runs) for _, runs in members], dtype=torch.int64)
    runs = torch.tensor([[first * bkv, stop * bkv] for _, rs in members for first, stop in rs], dtype=torch.int64)
    module.block_sparse_forward(q, kp, vp, out, lse, starts, counts.cumsum(0), runs.view(-1, 2), bq, k.shape[2],
                                float(scale), KV_TILE)
