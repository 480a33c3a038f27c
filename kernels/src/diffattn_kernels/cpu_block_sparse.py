"""The ``torch`` backend's compiled CPU inner loop (``kernels/src/diffattn_kernels/csrc/block_sparse_cpu.cpp``), built
on first use.

Query blocks that see whole key blocks only (sliding tile, radial, top-k selections) are computed here: one task
per (batch, head, query block) walks that block's key runs with an online softmax, reading K and V packed once
per call. It replaces a stack of SDPA calls whose per-call query split and key repacking cost most in bf16.

The source is built once per instruction set, the way ATen builds its ``CPU_CAPABILITY`` kernels, and the build
is chosen at run time from what the CPU has: ``avx512`` and ``avx2`` on x86-64, ``neon`` on aarch64 (the flags
never say ``-march=native``: a cached build may move to another machine). Each build is cached under its own
name by ``torch.utils.cpp_extension`` (``TORCH_EXTENSIONS_DIR``), so switching is free after the first build. The
name holds a digest of the source, and the build compiles a copy of the source kept in its own folder: every
checkout, clone or installed copy of one source version that runs on the same torch installation shares one build
(torch's ninja build rebuilds whenever the compile command changes, ~40 s each time: the source's path is in it, and
so are the include paths of the torch it runs on).

Two GEMM kernels compute the tiles (:func:`kernel_for` says which one a dtype gets and why):

- ``vec``: register-tiled float32 GEMMs written with ATen's ``Vectorized<float>`` (every build). bfloat16
  inputs are computed in float32 (K and V packed as float32, q converted per query block), as dense SDPA does on
  CPUs without native bf16 math.
- ``onednn``: oneDNN's batch-reduce GEMM through ATen's cpublas (the ``avx512`` build only); chosen for
  bfloat16 where cpublas runs it natively (AMX / AVX512-BF16 as oneDNN sees the CPU).

Environment (read when the extension is first loaded; :func:`reset` re-reads it):

- ``DIFFATTN_CPU_ISA=auto|avx512|avx2|neon|none``: force a build (it must be one the CPU can run) or turn the
  loop off. ``auto`` takes the best the CPU has, capped by torch's own choice (``ATEN_CPU_CAPABILITY``).
- ``DIFFATTN_CPU_GEMM=auto|vec|onednn``: force the GEMM kernel (``onednn`` is refused where cpublas cannot run
  the dtype).
- ``DIFFATTN_CPU_KERNEL=0``: the loop is off (the SDPA path computes the same thing).

:func:`status` says which build and kernels are in use and, where a fallback is taken, why.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DTYPES",
    "ISAS",
    "attend",
    "attend_lists",
    "extension",
    "kernel_for",
    "reset",
    "runnable_isas",
    "selected_isa",
    "status",
    "supports",
]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "block_sparse_cpu.cpp"
# dtypes routed to the compiled loop (others use the SDPA path)
DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float32)
ISA_ENV, GEMM_ENV, SWITCH_ENV = "DIFFATTN_CPU_ISA", "DIFFATTN_CPU_GEMM", "DIFFATTN_CPU_KERNEL"
# build flags per instruction set: ATen's CPU_CAPABILITY defines select its Vectorized<float> specialisation; the
# -m flags exist only on x86 (aarch64 has NEON as its baseline, so its build adds no machine flag)
_COMMON_FLAGS = ("-O3",)
_ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "avx512": (
        "-DCPU_CAPABILITY=AVX512",
        "-DCPU_CAPABILITY_AVX512",
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
    ),
    "avx2": ("-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"),
    "neon": ("-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"),
}
ISAS: tuple[str, ...] = tuple(_ISA_FLAGS)  # best first within an architecture
_X86 = ("x86_64", "amd64")
_ARM = ("aarch64", "arm64")
# torch's CPU capability -> the best of our builds it allows on x86
_TORCH_CAP = {"AVX512": "avx512", "AVX2": "avx2"}
# keys per score tile (rounded down to whole key blocks, at least one)
KV_TILE = 256
_STATUS: dict[str, str] = {"state": "not built yet (built on the first CPU call)"}


@dataclass(frozen=True)
class Selection:
    """The build to load (``isa`` None: the loop is off) and why."""

    isa: str | None
    reason: str


def runnable_isas(machine: str | None = None) -> tuple[str, ...]:
    """The builds this CPU can run, best first: ``avx512``/``avx2`` by the CPU's flags on x86-64 (as torch's
    cpuinfo reads them), ``neon`` on aarch64, none elsewhere."""
    machine = (machine or platform.machine()).lower()
    if machine in _ARM:
        return ("neon",)
    if machine not in _X86:
        return ()
    found = []
    for isa, probe in (("avx512", "_is_avx512_supported"), ("avx2", "_is_avx2_supported")):
        check = getattr(torch.cpu, probe, None)
        if check is None:  # an older torch: fall back to its dispatch capability
            if _TORCH_CAP.get(torch.backends.cpu.get_cpu_capability()) in (isa, "avx512"):
                found.append(isa)
        elif check():
            found.append(isa)
    return tuple(found)


def selected_isa() -> Selection:
    """Which build the environment and the CPU select (see the module docstring for ``DIFFATTN_CPU_ISA``)."""
    if os.environ.get(SWITCH_ENV, "1") == "0":
        return Selection(None, f"disabled by {SWITCH_ENV}=0")
    requested = os.environ.get(ISA_ENV, "auto").strip().lower() or "auto"
    if requested == "none":
        return Selection(None, f"disabled by {ISA_ENV}=none")
    if requested != "auto" and requested not in ISAS:
        raise ValueError(
            f"{ISA_ENV}={requested!r} is not a build of the CPU loop: set it to one of auto, "
            f"{', '.join(ISAS)}, none (or unset it)"
        )
    machine = platform.machine()
    runnable = runnable_isas(machine)
    if requested != "auto":
        if requested not in runnable:
            return Selection(
                None,
                f"not used: {ISA_ENV}={requested} but this CPU ({machine}) runs "
                f"{', '.join(runnable) or 'none of the builds'}; unset {ISA_ENV} to pick the best",
            )
        return Selection(requested, f"forced by {ISA_ENV}={requested}")
    capability = torch.backends.cpu.get_cpu_capability()
    if machine.lower() in _X86:
        cap = _TORCH_CAP.get(capability)
        allowed = [isa for isa in runnable if cap is not None and ISAS.index(isa) >= ISAS.index(cap)]
    else:
        allowed = list(runnable)
    if not allowed:
        return Selection(
            None,
            f"not used: no build for this CPU ({machine}, torch reports {capability}; the loop "
            f"has avx512 and avx2 builds for x86-64 and a neon build for aarch64)",
        )
    return Selection(allowed[0], f"auto: the best build this CPU runs (torch reports {capability})")


@lru_cache(maxsize=1)
def extension() -> Any | None:
    """The compiled module of the selected build, or None (with the reason in :func:`status`) when it is off,
    the CPU has no build, or it cannot build."""
    selection = selected_isa()
    if selection.isa is None:
        _STATUS["state"] = selection.reason
        return None
    name = build_name(selection.isa)
    try:
        from torch.utils.cpp_extension import load

        logger.info(
            "diffattn: building the %s CPU block-sparse loop from %s (once per source version, ~40 s)",
            selection.isa,
            SOURCE.name,
        )
        _refuse_stale_lock(name)
        with _tools_on_path():
            module = load(
                name=name,
                sources=[str(_source_copy(name))],
                extra_cflags=[*_COMMON_FLAGS, *_ISA_FLAGS[selection.isa]],
                verbose=False,
            )
    except Exception as exc:  # no compiler / ninja: the SDPA path still computes the same result, only slower
        _STATUS["state"] = (
            f"not used: building the {selection.isa} build of {SOURCE.name} failed ({type(exc).__name__}: {exc})"
        )
        logger.warning(
            "diffattn: %s; block-sparse attention falls back to SDPA calls (slower, same result). "
            "Install a C++ compiler and ninja (`pip install ninja`) to build it.",
            _STATUS["state"],
        )
        return None
    if module.isa() != selection.isa:
        raise RuntimeError(
            f"{name} reports the {module.isa()} build: its cached copy is stale; delete "
            f"{name} under TORCH_EXTENSIONS_DIR (~/.cache/torch_extensions) to rebuild it"
        )
    _STATUS["state"] = f"in use: {selection.isa} build ({selection.reason}); " + "; ".join(
        f"{str(d).removeprefix('torch.')}: {_describe(module, d)}" for d in DTYPES
    )
    _STATUS["isa"] = selection.isa
    return module


#: A build lock older than this is left by a process killed while building (a build takes ~40 s): torch would wait on
#: it forever, so the loop is not used and the warning names the file to delete.
STALE_LOCK_SECONDS = 600.0


def build_name(isa: str) -> str:
    """The cached build's name for ``isa``: one per instruction set and source version (a digest of the source)."""
    return f"diffattn_block_sparse_cpu_{isa}_{hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]}"


def _source_copy(name: str) -> Path:
    """The source, copied into build ``name``'s folder (written once, atomically): the build compiles that copy, so
    its command is the same from every checkout and ninja finds nothing to rebuild."""
    from torch.utils.cpp_extension import _get_build_directory

    copy = Path(_get_build_directory(name, False)) / SOURCE.name
    source = SOURCE.read_bytes()
    if not copy.is_file() or copy.read_bytes() != source:
        partial = copy.with_name(f"{copy.name}.{os.getpid()}.partial")
        partial.write_bytes(source)
        os.replace(partial, copy)
    return copy


def _refuse_stale_lock(name: str) -> None:
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        raise RuntimeError(
            f"{lock} is {age / 60:.0f} minutes old: a build was killed while holding it and torch would wait for it "
            "forever; delete that file (no build is running) to build the loop"
        )


def reset() -> None:
    """Forget the loaded build, so the next call re-reads the environment (tests switch builds with it)."""
    extension.cache_clear()
    kernel_for.cache_clear()
    _STATUS.clear()
    _STATUS["state"] = "not built yet (built on the first CPU call)"


def _ninja_package_folder() -> str | None:
    """The folder of the ``ninja`` distribution's own binary (a requirement of this package), found from its file
    list: ``ninja.BIN_DIR`` looks in the running interpreter's folders only, so it misses the binary when the package
    comes from another environment's site-packages (a ``.pth`` line, ``--system-site-packages``)."""
    from importlib import metadata

    try:
        files = metadata.distribution("ninja").files or ()
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name in ("ninja", "ninja.exe") and file.parent.name in ("bin", "Scripts"):
            path = Path(file.locate()).resolve()
            if path.is_file():
                return str(path.parent)
    return None


def _tool_folders() -> list[str]:
    """Where the build's tools come from, first first: the ``ninja`` distribution's binary, then the environment's
    scripts folder. Every environment that sees the package then builds with the same ninja: ninja versions hash
    their commands differently (1.13 changed the hash), so two versions sharing one build folder (an installed copy
    seeing a venv's packages, with the system's ninja on PATH) rebuilt the loop (~40 s) at each switch."""
    folders = [_ninja_package_folder(), sysconfig.get_path("scripts")]
    return list(dict.fromkeys(f for f in folders if f))


@contextlib.contextmanager
def _tools_on_path() -> Iterator[None]:
    """:func:`_tool_folders` at the front of PATH while building: torch finds ``ninja`` through PATH, and a virtual
    environment used without activation (``.venv/bin/python ...``) has its ``ninja`` only in its own folders."""
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([*_tool_folders(), old]) if old else os.pathsep.join(_tool_folders())
    try:
        yield
    finally:
        os.environ["PATH"] = old


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; the platform string elsewhere), for speed figures."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def status() -> str:
    """Whether the compiled loop is in use, with which build and per-dtype kernel, and if not, why."""
    return _STATUS["state"]


@dataclass(frozen=True)
class KernelChoice:
    """The GEMM kernel a dtype runs (``vec`` or ``onednn``), the dtype it computes in, and why."""

    kernel: str
    compute: torch.dtype
    reason: str


def _choose(module: Any, dtype: torch.dtype) -> KernelChoice:
    bf16 = dtype == torch.bfloat16
    native = bool(module.onednn_supported(bf16))
    requested = os.environ.get(GEMM_ENV, "auto").strip().lower() or "auto"
    if requested not in ("auto", "vec", "onednn"):
        raise ValueError(f"{GEMM_ENV}={requested!r}: set it to auto, vec or onednn (or unset it)")
    if requested == "onednn":
        if not native:
            raise ValueError(
                f"{GEMM_ENV}=onednn, but cpublas runs no {dtype} brgemm in the {module.isa()} build on "
                f"this CPU (needs the avx512 build; bfloat16 needs AMX or AVX512-BF16 as oneDNN sees "
                f"it): unset {GEMM_ENV} or set it to vec"
            )
        return KernelChoice("onednn", dtype, f"forced by {GEMM_ENV}=onednn")
    forced = f"forced by {GEMM_ENV}=vec" if requested == "vec" else ""
    if bf16:
        if requested == "auto" and native:
            return KernelChoice("onednn", dtype, "cpublas runs bfloat16 brgemm natively here (AMX / AVX512-BF16)")
        why = forced or (
            "oneDNN has no bfloat16 brgemm on this CPU (needs AMX or AVX512-BF16 as oneDNN sees it)"
            if module.isa() == "avx512"
            else f"the {module.isa()} build has no native bfloat16 GEMM"
        )
        return KernelChoice("vec", torch.float32, why)
    return KernelChoice("vec", torch.float32, forced or "at::vec float32 GEMMs")


def _describe(module: Any, dtype: torch.dtype) -> str:
    try:
        choice = _choose(module, dtype)
    except ValueError as exc:  # raised again when a call of that dtype arrives
        return f"refused ({exc})"
    compute = "" if choice.compute == dtype else f" in {str(choice.compute).removeprefix('torch.')}"
    return f"{choice.kernel} kernel{compute} ({choice.reason})"


@cache
def kernel_for(dtype: torch.dtype) -> KernelChoice | None:
    """The GEMM kernel :func:`attend` uses for ``dtype`` (None: the loop is off or the dtype is not routed)."""
    module = extension()
    if module is None or dtype not in (torch.float32, torch.bfloat16):
        return None
    return _choose(module, dtype)


def supports(q: Tensor) -> bool:
    """Whether :func:`attend` can compute this call (CPU, a routed dtype, even head dim, extension built)."""
    return (
        q.device.type == "cpu"
        and q.dtype in DTYPES
        and q.shape[-1] % 2 == 0
        and q.stride(-1) == 1
        and kernel_for(q.dtype) is not None
    )


def _pack(k: Tensor, v: Tensor, block: int, dtype: torch.dtype, vnni: bool = False) -> tuple[Tensor, Tensor]:
    """K^T and V padded to whole key blocks, in ``dtype`` and the layouts the kernel reads (VNNI-2 pairs for the
    bf16 oneDNN kernel; otherwise K^T per key block and V). One copy each: conversion and layout change at once."""
    pad = (-k.shape[2]) % block
    if pad:
        k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
    blocks = k.unflatten(2, (k.shape[2] // block, block))  # (B, H, S/Bk, Bk, D)
    if vnni:
        kp = blocks.unflatten(-1, (k.shape[-1] // 2, 2)).permute(0, 1, 2, 4, 3, 5)  # (B, H, S/Bk, D/2, Bk, 2)
        vp = v.unflatten(2, (v.shape[2] // 2, 2)).transpose(3, 4)  # (B, H, S/2, D, 2)
    else:
        kp, vp = blocks.transpose(-1, -2), v  # (B, H, S/Bk, D, Bk), (B, H, S, D)
    return tuple(
        x.contiguous() if x.dtype == dtype else torch.empty(x.shape, dtype=dtype, device=x.device).copy_(x)
        for x in (kp, vp)
    )


def _block_lists(
    members: list[tuple[int, list[tuple[int, int]]]], key_order: list[int] | None
) -> tuple[Tensor, Tensor]:
    """Each member's key blocks as ascending block ids of k (runs index the ``key_order`` copy when given), in CSR
    form: offsets (members + 1) and ids. The kernel reads the blocks where they are, so no reordered copy is made;
    ascending order keeps a partial last block last."""
    lists = [
        sorted(b if key_order is None else key_order[b] for first, stop in runs for b in range(first, stop))
        for _, runs in members
    ]
    offsets = torch.tensor([0] + [len(ids) for ids in lists], dtype=torch.int64).cumsum(0)
    return offsets, torch.tensor([b for ids in lists for b in ids], dtype=torch.int64)


def block_lists(num_blocks: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """A ``BlockMask``'s block lists of batch entry 0 (``num_blocks`` (1, H, Q), ``indices`` (1, H, Q, slots)) in the
    CSR form the kernel reads: offsets ``(H * Q + 1,)`` (head-major) and ascending block ids, built with tensor ops
    (no Python loop over heads or query blocks)."""
    num, idx = num_blocks[0].to(torch.int64), indices[0].to(torch.int64)
    listed = torch.arange(idx.shape[-1], device=idx.device) < num.unsqueeze(-1)
    ordered = torch.where(listed, idx, torch.iinfo(torch.int64).max).sort(dim=-1).values  # listed ones first
    offsets = torch.zeros(num.numel() + 1, dtype=torch.int64)
    torch.cumsum(num.reshape(-1).cpu(), 0, out=offsets[1:])
    return offsets, ordered[listed].cpu()  # the first ``num`` of each sorted row are its listed blocks


def attend_lists(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    offsets: Tensor,
    ids: Tensor,
    bq: int,
    bkv: int,
    scale: float,
) -> None:
    """Write ``out`` and ``lse`` ((B, H, Sq, D), (B, H, Sq)) for every query block at once, in one call: query block
    ``i`` sees the whole key blocks ``ids[offsets[r]:offsets[r + 1]]`` (ascending), with ``r = i`` when ``offsets``
    has one entry per query block + 1 (lists shared by the heads), ``r = h * Q + i`` when it has one per head and
    query block + 1 (:func:`block_lists`). A query block with no key block gets 0 and lse ``-inf``."""
    _forward(q, k, v, out, lse, torch.arange(0, q.shape[2], bq, dtype=torch.int64), offsets, ids, bq, bkv, scale)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    members: list[tuple[int, list[tuple[int, int]]]],
    bq: int,
    bkv: int,
    scale: float,
    key_order: list[int] | None = None,
) -> None:
    """Write ``out`` and ``lse`` (views of the full outputs, (B, H, Sq, D) and (B, H, Sq)) for the query blocks in
    ``members``: ``(query_block, [(first_key_block, stop_key_block), ...])``, every listed block whole; with
    ``key_order``, the runs index the key blocks in that order (block i is block ``key_order[i]`` of k)."""
    starts = torch.tensor([qb * bq for qb, _ in members], dtype=torch.int64)
    offsets, ids = _block_lists(members, key_order)
    _forward(q, k, v, out, lse, starts, offsets, ids, bq, bkv, scale)


def _forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    starts: Tensor,
    offsets: Tensor,
    ids: Tensor,
    bq: int,
    bkv: int,
    scale: float,
) -> None:
    """K and V packed once for the call, then the compiled loop over the query blocks starting at ``starts`` with
    the CSR key-block lists ``offsets`` / ``ids`` (one per query block, or one per head and query block)."""
    module = extension()
    choice = kernel_for(q.dtype)
    if module is None or choice is None:
        raise RuntimeError(f"the compiled block-sparse loop is unavailable for {q.dtype}: {status()}")
    # packed in the compute dtype (float32 for the vec kernel: bf16 computed in float32); O(S x D) per call
    kp, vp = _pack(k, v, bkv, choice.compute, vnni=choice.kernel == "onednn" and q.dtype == torch.bfloat16)
    module.block_sparse_forward(
        q, kp, vp, out, lse, starts, offsets, ids, bq, k.shape[2], float(scale), KV_TILE, choice.kernel
    )
