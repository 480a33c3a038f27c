"""The compiled CPU loop (``diffattn_kernels.cpu_block_sparse``) on every build this CPU can run (``avx512``,
``avx2`` forced on an AVX-512 CPU through ``DIFFATTN_CPU_ISA``, ``neon`` on aarch64) and with each GEMM kernel,
against the float64 reference; how it reports its build, its bf16 path and why it is off; flags that keep the
source portable (no x86 flag outside the x86 builds, x86 intrinsics behind their build's define)."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

import diffattn_kernels as kernels
from diffattn import TokenLayout
from diffattn.patterns import Radial
from diffattn.patterns.compile import compile_pattern
from diffattn.patterns.tile import SlidingTile
from diffattn_kernels import cpu_block_sparse as loop

# max abs error vs float64 on unit-variance inputs (as tests/methods/test_sparse_static.py)
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
RUNNABLE = loop.runnable_isas()
_ENV = (loop.ISA_ENV, loop.GEMM_ENV, loop.SWITCH_ENV)


def random_qkv(batch, heads, n, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, dim, generator=g).to(dtype) for _ in range(3)]


@pytest.fixture
def use_loop():
    """Factory: select a build / GEMM kernel through the environment (as a user would) and reload; the previous
    environment and the default build come back afterwards."""
    saved = {name: os.environ.get(name) for name in _ENV}

    def select(isa: str | None = None, gemm: str | None = None, switch: str | None = None):
        for name, value in zip(_ENV, (isa, gemm, switch)):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        loop.reset()
        return loop

    yield select
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    loop.reset()


def _isa_param(isa: str, *more):
    return pytest.param(
        isa,
        *more,
        marks=pytest.mark.skipif(
            isa not in RUNNABLE,
            reason=(
                f"this CPU cannot run the {isa} build (it runs {', '.join(RUNNABLE) or 'none'}); "
                f"the builds it runs are tested instead"
            ),
        ),
    )


ISA_PARAMS = [_isa_param(isa) for isa in loop.ISAS]

COMPILED_LOOP_CASES = [
    # (pattern, layout, block size): whole tiles, radial with text (its blocks with text are partial and go to the
    # SDPA path) and a partial last key block, radial whose key blocks the backend reorders (the loop reads the
    # blocks where they are, whatever order its runs come in)
    (SlidingTile((2, 2, 4), (1, 3, 3)), TokenLayout((4, 6, 12)), 16),
    (Radial(decay=0.2, block_size=16), TokenLayout((8, 4, 8), text_len=3), 16),
    (Radial(decay=0.2, block_size=64), TokenLayout((16, 8, 16), text_len=5), 64),
]


def test_this_cpu_has_a_tested_build():
    """x86-64 and aarch64 machines run at least one build (so the reference tests below never all skip there)."""
    import platform

    if platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64"):
        assert RUNNABLE, f"no build of the CPU loop runs on this {platform.machine()} CPU"
    assert set(RUNNABLE) <= set(loop.ISAS)


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(COMPILED_LOOP_CASES)))
def test_compiled_cpu_loop_matches_reference_and_sdpa_path(use_loop, monkeypatch, isa, dtype, case):
    """The compiled loop (full-block query blocks) on each runnable build against the float64 reference and the
    SDPA path, with q, k, v in the (B, S, H, D) memory layout attention processors pass (strided heads). bf16 runs
    on every build (computed in float32 where the CPU has no native bf16 GEMM)."""
    use_loop(isa=isa)
    assert loop.extension() is not None, loop.status()
    assert f"in use: {isa} build" in loop.status()
    pattern, layout, block = COMPILED_LOOP_CASES[case]
    plan = compile_pattern(pattern, layout, block_size=block)
    n = plan.kernel_length
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in random_qkv(2, 3, n, 32, dtype, seed=case))
    assert loop.supports(q), f"{dtype} is not routed to the compiled loop: {loop.status()}"
    calls = []
    real, real_lists = loop.attend, loop.attend_lists
    # query blocks per call: attend's members, or attend_lists' block lists (all query blocks of a mask of whole blocks)
    monkeypatch.setattr(loop, "attend", lambda *a: (calls.append((len(a[5]),)), real(*a))[1])
    monkeypatch.setattr(loop, "attend_lists", lambda *a: (calls.append((len(a[5]) - 1,)), real_lists(*a))[1])
    out, lse = kernels.attention(q, k, v, plan.block_mask, backend="torch")
    assert calls and sum(c[0] for c in calls) > 0, "no query block went through the compiled loop"
    ref64, lse64 = kernels.attention(q.double(), k.double(), v.double(), plan.block_mask, backend="reference")
    assert (out.double() - ref64).abs().max().item() <= TOLERANCE[dtype]
    finite = torch.isfinite(lse64)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite], lse64[finite].float(), rtol=0, atol=1e-3)
    monkeypatch.setattr(loop, "DTYPES", ())
    sdpa_out, sdpa_lse = kernels.attention(q, k, v, plan.block_mask, backend="torch")
    assert len(calls) == 1, "DTYPES=() must route everything to the SDPA path"
    assert (out.float() - sdpa_out.float()).abs().max().item() <= 2 * TOLERANCE[dtype]


def _per_head_whole_block_mask(heads: int, num_qb: int, num_kb: int, n: int, block: int, seed: int):
    """A BlockMask of whole blocks only with different, unsorted key-block lists per head (as top-k selections
    make), one query block per head with no block at all, and a partial last key block when ``n`` is not a multiple
    of ``block``."""
    from torch.nn.attention.flex_attention import BlockMask

    g = torch.Generator().manual_seed(seed)
    num = torch.randint(1, num_kb + 1, (1, heads, num_qb), generator=g, dtype=torch.int32)
    num[0, :, 0] = 0  # (a different empty query block per head below)
    idx = torch.stack([torch.randperm(num_kb, generator=g) for _ in range(heads * num_qb)]).to(torch.int32)
    idx = idx.view(1, heads, num_qb, num_kb)
    for h in range(heads):
        num[0, h, 0] = num_kb
        num[0, h, (h + 1) % num_qb] = 0
    zeros = torch.zeros_like(num)
    return BlockMask.from_kv_blocks(zeros, idx.clone(), num, idx, BLOCK_SIZE=block, seq_lengths=(n, n))


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,kv_heads", [(128, 3), (120, 1)])
def test_per_head_whole_blocks_take_one_call(use_loop, monkeypatch, isa, dtype, n, kv_heads):
    """A mask of whole blocks with per-head lists (top-k selections) is computed by one call of the loop for every
    head and query block (block lists built by tensor ops), and matches the float64 reference: unsorted lists, a
    query block with no key (0 / lse -inf), a partial last key and query block (n=120), grouped-query heads."""
    use_loop(isa=isa)
    heads, block = 3, 16
    num_qb = math.ceil(n / block)
    mask = _per_head_whole_block_mask(heads, num_qb, num_qb, n, block, seed=n)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, heads, n, 32, generator=g).to(dtype)
    k, v = (torch.randn(2, kv_heads, n, 32, generator=g).to(dtype) for _ in range(2))
    calls = []
    real_lists = loop.attend_lists
    monkeypatch.setattr(loop, "attend", lambda *a: pytest.fail("per-query-block calls for a mask of whole blocks"))
    monkeypatch.setattr(loop, "attend_lists", lambda *a: (calls.append(len(a[5]) - 1), real_lists(*a))[1])
    out, lse = kernels.attention(q, k, v, mask, backend="torch")
    assert calls == [heads * num_qb]
    ref64, lse64 = kernels.attention(q.double(), k.double(), v.double(), mask, backend="reference")
    assert (out.double() - ref64).abs().max().item() <= TOLERANCE[dtype]
    finite = torch.isfinite(lse64)
    assert not finite.all(), "the mask was meant to leave a query block without keys"
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite], lse64[finite].float(), rtol=0, atol=1e-3)
    assert (out[~finite.unsqueeze(-1).expand_as(out)] == 0).all()


def _expected(q, k, v, members, bq, bkv, scale, order):
    """float64 attention of each member query block over exactly the keys of its runs (run bounds in key blocks
    of the copy whose block i is original block ``order[i]``); rows of other blocks stay 0 / -inf."""
    num_kv = k.shape[2]
    blocks = math.ceil(num_kv / bkv)
    order = order or list(range(blocks))
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float64)
    for qb, runs in members:
        keys = [
            j
            for first, stop in runs
            for b in range(first, stop)
            for j in range(order[b] * bkv, min((order[b] + 1) * bkv, num_kv))
        ]
        rows = slice(qb * bq, min((qb + 1) * bq, q.shape[2]))
        s = q[:, :, rows].double() @ k[:, :, keys].double().transpose(-1, -2) * scale
        out[:, :, rows] = torch.softmax(s, -1) @ v[:, :, keys].double()
        lse[:, :, rows] = torch.logsumexp(s, -1)
    return out, lse


@pytest.mark.parametrize("isa,gemm", [*(_isa_param(isa, "vec") for isa in loop.ISAS), _isa_param("avx512", "onednn")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape",
    [
        # (query rows, key rows, head dim, query block, key block, key order): ragged edges of the register tiles —
        # blocks of 8 / 24 keys and head dims 20 / 34 (not multiples of the 8- or 16-float vectors), query blocks of 16
        # and 13 rows (not multiples of the 6-row tile), a partial last query block, padded last key block, reordered
        # key blocks, and key tiles that split long runs (48-key block, 256-key tiles)
        (40, 36, 20, 16, 8, None),
        (50, 96, 34, 13, 24, [2, 0, 3, 1]),
        (64, 600, 64, 32, 48, None),
    ],
)
def test_loop_edges_match_float64(use_loop, isa, gemm, dtype, shape):
    """:func:`attend` called directly on shapes that exercise every tail of the GEMM micro-kernels."""
    nq, nk, dim, bq, bkv, order = shape
    use_loop(isa=isa, gemm=gemm)
    if loop.extension() is None:
        pytest.fail(loop.status())
    module = loop.extension()
    if gemm == "onednn" and not module.onednn_supported(dtype == torch.bfloat16):
        pytest.skip(
            f"cpublas runs no {dtype} brgemm in the {isa} build on this CPU (the onednn kernel needs the "
            f"avx512 build, and AMX / AVX512-BF16 for bf16)"
        )
    choice = loop.kernel_for(dtype)
    assert choice is not None and choice.kernel == gemm
    q = random_qkv(1, 2, nq, dim, dtype, seed=nq)[0]
    _, k, v = random_qkv(1, 2, nk, dim, dtype, seed=nk)
    blocks = math.ceil(nk / bkv)
    # query block i sees key blocks [i % blocks, ...) as one or two runs; the last query block sees none
    members = []
    for qb in range(math.ceil(nq / bq) - 1):
        first = qb % blocks
        runs = [(first, min(blocks, first + 2))]
        if first >= 2:
            runs.append((0, 1))
        if qb == 1:
            runs = [(0, blocks)]  # every key: several tiles when the blocks exceed a tile
        members.append((qb, runs))
    scale = dim**-0.5
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:3], float("-inf"))
    loop.attend(q, k, v, out, lse, members, bq, bkv, scale, order)
    ref, ref_lse = _expected(q, k, v, members, bq, bkv, scale, order)
    assert (out.double() - ref).abs().max().item() <= TOLERANCE[dtype]
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-3)


def test_status_names_the_build_and_the_bf16_path(use_loop):
    use_loop()
    if loop.extension() is None:
        pytest.fail(f"this CPU runs {RUNNABLE} but the loop did not load: {loop.status()}")
    text = loop.status()
    isa = loop.selected_isa().isa
    assert text.startswith(f"in use: {isa} build (auto"), text
    bf16 = loop.kernel_for(torch.bfloat16)
    assert "bfloat16: " + bf16.kernel in text
    if bf16.kernel == "vec":
        assert bf16.compute == torch.float32 and "bfloat16: vec kernel in float32" in text
    assert loop.kernel_for(torch.float16) is None


def test_forced_avx2_on_an_avx512_cpu(use_loop):
    """The override builds and runs the AVX2 code on a CPU that would pick AVX-512 (here: an AVX-512 EPYC)."""
    if "avx2" not in RUNNABLE:
        pytest.skip(f"this CPU runs {RUNNABLE or 'no x86 build'}")
    use_loop(isa="avx2")
    module = loop.extension()
    assert module is not None, loop.status()
    assert module.isa() == "avx2" and module.vector_width() == 8
    assert "forced by DIFFATTN_CPU_ISA=avx2" in loop.status()
    assert not module.onednn_supported(False), "the avx2 build has no oneDNN path"


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"DIFFATTN_CPU_KERNEL": "0"}, "DIFFATTN_CPU_KERNEL=0"),
        ({"DIFFATTN_CPU_ISA": "none"}, "DIFFATTN_CPU_ISA=none"),
    ],
)
def test_compiled_cpu_loop_reports_why_it_is_off(use_loop, env, expected):
    use_loop(isa=env.get(loop.ISA_ENV), switch=env.get(loop.SWITCH_ENV))
    assert loop.extension() is None
    assert expected in loop.status()
    q = torch.zeros(1, 1, 16, 8)
    assert not loop.supports(q)
    with pytest.raises(RuntimeError, match="unavailable"):
        loop.attend(q, q, q, q.clone(), torch.zeros(1, 1, 16), [(0, [(0, 1)])], 16, 16, 1.0)


def test_a_build_the_cpu_cannot_run_is_refused_with_the_reason(use_loop, monkeypatch):
    monkeypatch.setattr(loop, "runnable_isas", lambda machine=None: ("avx2",))
    use_loop(isa="avx512")
    assert loop.extension() is None
    assert "DIFFATTN_CPU_ISA=avx512 but this CPU" in loop.status() and "runs avx2" in loop.status()
    monkeypatch.setattr(loop, "runnable_isas", lambda machine=None: ())
    monkeypatch.setattr(loop.platform, "machine", lambda: "riscv64")
    use_loop()
    assert loop.extension() is None and "no build for this CPU (riscv64" in loop.status()


def test_bad_settings_say_how_to_fix(use_loop):
    use_loop(isa="avx1024")
    with pytest.raises(ValueError, match="set it to one of auto, avx512, avx2, neon, none"):
        loop.extension()
    use_loop(gemm="blas")
    with pytest.raises(ValueError, match="set it to auto, vec or onednn"):
        loop.kernel_for(torch.float32)


def test_runnable_builds_follow_the_architecture(monkeypatch):
    assert loop.runnable_isas("aarch64") == ("neon",) and loop.runnable_isas("arm64") == ("neon",)
    assert loop.runnable_isas("ppc64le") == ()
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx2_supported", lambda: True)
    assert loop.runnable_isas("x86_64") == ("avx2",)


def test_flags_assume_x86_only_in_x86_builds():
    for isa, flags in loop._ISA_FLAGS.items():
        machine_flags = [f for f in flags if f.startswith("-m")]
        assert (isa in ("avx512", "avx2")) == bool(machine_flags), (isa, flags)
        assert not any("native" in f for f in (*flags, *loop._COMMON_FLAGS)), "a cached build may move machines"


def _syntax_check(compiler: str, flags: list[str]) -> subprocess.CompletedProcess:
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in (*include_paths(), sysconfig.get_paths()["include"])]
    cmd = [compiler, "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=check", *includes, *flags, str(loop.SOURCE)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_source_compiles_without_x86_machine_flags():
    """The neon build's flags on this host's compiler: every x86 intrinsic must sit behind its build's define
    (unguarded AVX code fails to compile without -m flags), which is what an aarch64 build needs too."""
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        pytest.fail("no C++ compiler: the loop cannot build on this machine either (install g++)")
    result = _syntax_check(compiler, [*loop._COMMON_FLAGS, *loop._ISA_FLAGS["neon"]])
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_source_compiles_for_aarch64_neon():
    """With a cross compiler (Debian: ``apt-get install g++-aarch64-linux-gnu``), the neon build type-checks for
    aarch64 against torch's headers (ATen's NEON Vectorized<float>)."""
    compiler = shutil.which("aarch64-linux-gnu-g++")
    if compiler is None:
        pytest.skip("no aarch64 cross compiler (apt-get install g++-aarch64-linux-gnu) to check the neon build")
    result = _syntax_check(compiler, [*loop._COMMON_FLAGS, *loop._ISA_FLAGS["neon"]])
    assert result.returncode == 0, result.stderr[-3000:]


def test_benchmark_records_the_cpu_and_the_forced_build(use_loop, tmp_path):
    """``scripts/bench_kernels.py --isa`` runs the requested build and says so in every row (a quick 4k case)."""
    import importlib.util
    import json

    isa = RUNNABLE[-1] if RUNNABLE else pytest.skip("no build runs on this CPU")
    use_loop()
    spec = importlib.util.spec_from_file_location(
        "bench_kernels", Path(__file__).parents[2] / "scripts" / "bench_kernels.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert (
        bench.main(
            [
                "--tokens",
                "4096",
                "--dtypes",
                "bfloat16",
                "--repeats",
                "1",
                "--no-flex",
                "--no-natten",
                "--no-dynamic",
                "--isa",
                isa,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())
    assert {r["pattern"] for r in rows} == {"sliding tile", "radial"}
    for row in rows:
        assert row["cpu"] and row["cpu_loop"].startswith(f"{isa} "), row["cpu_loop"]
        assert row["torch_s"] > 0 and row["dense_s"] > 0
        assert f"in use: {isa} build" in row["torch_cpu_loop_status"]


@pytest.mark.skipif(not RUNNABLE, reason="this CPU runs no build of the loop")
def test_a_stale_build_lock_is_named_instead_of_waited_on_forever(use_loop, tmp_path, monkeypatch):
    """A build killed while holding torch's lock leaves the file behind, and torch waits on it forever: the loop is
    not used, the result stays the same (SDPA path) and the status names the file to delete."""
    selected = use_loop()
    name = selected.build_name(selected.selected_isa().isa)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / name / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    old = lock.stat().st_mtime - loop.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    assert loop.extension() is None
    assert str(lock) in loop.status() and "delete that file" in loop.status()


def test_every_copy_of_one_source_version_shares_one_build(tmp_path, monkeypatch):
    """The build's name holds a digest of the source and the build compiles a copy kept in its own folder: a clone or
    an installed copy of the same source finds the same name and the same compiled path (torch's ninja build would
    rebuild, ~40 s, whenever the path changed; with the same torch it now finds nothing to rebuild); another source
    version gets a build of its own."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    original = loop.SOURCE
    copies = []
    for where in ("clone", "installed"):
        source = tmp_path / where / original.name
        source.parent.mkdir()
        source.write_bytes(original.read_bytes())
        monkeypatch.setattr(loop, "SOURCE", source)
        name = loop.build_name("avx2")
        copies.append((name, loop._source_copy(name)))
    (name_a, copy_a), (name_b, copy_b) = copies
    assert name_a == name_b and copy_a == copy_b and copy_a.read_bytes() == original.read_bytes()
    assert copy_a.parent == tmp_path / "cache" / name_a and not list(copy_a.parent.glob("*.partial"))
    changed = tmp_path / "changed" / original.name
    changed.parent.mkdir()
    changed.write_bytes(original.read_bytes() + b"\n// another version\n")
    monkeypatch.setattr(loop, "SOURCE", changed)
    assert loop.build_name("avx2") != name_a and loop.build_name("avx2").startswith("diffattn_block_sparse_cpu_avx2_")


def test_the_build_finds_the_ninja_package_before_another_ninja_on_path(tmp_path, monkeypatch):
    """Two ninja versions sharing a build folder hash its command differently and rebuild it (~40 s) at each switch:
    an installed copy of the package that saw a venv's packages used the system's ninja, the venv its own. The build
    puts the ninja package (a requirement) first on PATH, whatever else is there, and restores PATH after."""
    pytest.importorskip("ninja")
    package = loop._ninja_package_folder()
    assert package is not None and (Path(package) / "ninja").is_file()
    other = tmp_path / "bin"
    other.mkdir()
    (other / "ninja").write_text("#!/bin/sh\necho 0.0.0\n")
    (other / "ninja").chmod(0o755)
    # the environment's own scripts folder already on PATH, behind another ninja (an activated venv, say)
    path = os.pathsep.join([str(other), sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    monkeypatch.setenv("PATH", path)
    assert shutil.which("ninja") == str(other / "ninja")
    with loop._tools_on_path():
        found = shutil.which("ninja")
    assert found is not None and Path(found).parent == Path(package)
    assert os.environ["PATH"] == path
