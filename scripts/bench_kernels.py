"""Attention-op benchmark: dense SDPA vs diffattn's block-sparse kernels, in one process, same inputs.

For each sequence length, dtype and pattern (about 10% density) it times dense
``scaled_dot_product_attention``, the ``torch`` block-sparse kernel, compiled FlexAttention on the same
``BlockMask`` and, for sliding tile, NATTEN's ``flex-fna`` backend on the equivalent generalized neighborhood
attention (kernel = window x tile, stride = tile). Dynamic methods (block selection top-k, pyramid pooling) are
timed as whole calls, selection included, with the selection time on its own (``--no-dynamic`` skips them; on
random inputs the selection is arbitrary but costs what it costs). Ratios are measured in this run; expect 10-20%
noise.

    python scripts/bench_kernels.py --tokens 16384 32768 --dtypes float32 bfloat16

``--isa avx2`` (or ``DIFFATTN_CPU_ISA``) forces a build of the compiled CPU loop, e.g. the AVX2 one on an AVX-512
CPU; every row records the CPU model, the build and the GEMM kernel each dtype ran (``cpu``, ``cpu_loop``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import diffattn_kernels as kernels
from diffattn import TokenLayout
from diffattn.patterns.compile import compile_pattern
from diffattn.patterns.tile import SlidingTile
from diffattn_kernels import cpu_block_sparse
from diffattn_kernels.block_sparse import key_major_runs

HEADS, DIM = 8, 64
# grid, tile, window (odd windows and tile-aligned grids make NATTEN's GNA the same pattern)
# 256-token tiles; odd windows (or whole axes) so that NATTEN's GNA with stride = tile is the same pattern.
TILE_CONFIGS = {
    4096: ((16, 16, 16), (4, 8, 8), (1, 1, 2)),  # a quick check; the benchmark is 16k and 32k
    16384: ((16, 16, 64), (4, 8, 8), (1, 1, 7)),
    32768: ((32, 32, 32), (4, 8, 8), (1, 3, 4)),
}
# Radial's rule is only ~10% dense for long frames (e.g. 720p); at 16k-32k tokens it keeps 35-50% of the pairs.
RADIAL_CONFIGS = {4096: ((16, 16, 16), 0.2), 16384: ((32, 16, 32), 0.2), 32768: ((16, 32, 64), 0.2)}  # (f, h, w), decay


def loop_path(dtype: torch.dtype) -> str:
    """Which build and GEMM kernel of the compiled CPU loop ``dtype`` ran (or why none)."""
    choice = cpu_block_sparse.kernel_for(dtype)
    if choice is None:
        return f"SDPA path ({cpu_block_sparse.status()})"
    compute = "" if choice.compute == dtype else f" in {str(choice.compute).removeprefix('torch.')}"
    return f"{cpu_block_sparse.selected_isa().isa} {choice.kernel}{compute}"


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def patterns_for(tokens: int):
    grid, tile, window = TILE_CONFIGS[tokens]
    yield "sliding tile", SlidingTile(tile, window), grid, math.prod(tile), (tile, window)
    try:
        from diffattn.patterns import Radial
    except ImportError:
        return
    grid, decay = RADIAL_CONFIGS[tokens]
    yield "radial", Radial(decay=decay, block_size=128), grid, 128, None


def dynamic_methods():
    from diffattn.methods.dynamic_sparse import DynamicSparseAttention
    from diffattn.methods.pyramid import PyramidSparseAttention

    tile = (4, 8, 8)  # the TILE_CONFIGS tile: 256-token blocks
    yield "dynamic top-k", DynamicSparseAttention(topk=0.1, tile=tile)
    yield "pyramid (PSA)", PyramidSparseAttention(bands=(0.06, 0.08, 0.12, 0.2), tile=tile)


def time_dynamic(method, q, k, v, grid, repeats: int) -> dict:
    """Whole-call time of a dynamic method (selection included) and what it reported about itself."""
    from diffattn.testing import standalone_context

    ctx, reports = standalone_context(TokenLayout(grid))
    seconds = timed(lambda: method(q, k, v, ctx), repeats)
    return {"total_s": seconds, "select_s": reports["selection_seconds"], "density": reports["density"]}


def natten_tile(q, k, v, grid, tile, window, head: int = 0):
    """NATTEN's generalized neighborhood attention equal to the sliding tile pattern, on one head: its CPU path
    (eager flex) materialises the score matrix, so all heads at once would not fit in memory at 16k+ tokens; the
    benchmark times one head and multiplies by the number of heads."""
    from diffattn_bench.peers import natten_tile as natten_sliding_tile

    one = slice(head, head + 1)
    return natten_sliding_tile(q[:, one], k[:, one], v[:, one], grid, tile, window)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--no-flex", action="store_true", help="skip compiled FlexAttention (compiles per shape)")
    parser.add_argument("--no-natten", action="store_true")
    parser.add_argument("--no-dynamic", action="store_true", help="skip the dynamic methods (selection + kernel)")
    parser.add_argument("--only-dynamic", action="store_true", help="only the dynamic methods (no static patterns)")
    parser.add_argument(
        "--natten-max-gb",
        type=float,
        default=1.5,
        help="NATTEN's CPU path materialises one head's score matrix (several copies); skip above this",
    )
    parser.add_argument(
        "--kv-tile",
        type=int,
        default=cpu_block_sparse.KV_TILE,
        help="keys per score tile of the compiled CPU loop (a tuning knob)",
    )
    parser.add_argument(
        "--isa",
        choices=["auto", *cpu_block_sparse.ISAS, "none"],
        help=f"build of the compiled CPU loop (sets {cpu_block_sparse.ISA_ENV}; default: the environment's)",
    )
    parser.add_argument(
        "--gemm",
        choices=["auto", "vec", "onednn"],
        help=f"GEMM kernel of the compiled CPU loop (sets {cpu_block_sparse.GEMM_ENV})",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_kernels.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu_block_sparse.KV_TILE = args.kv_tile
    for env, value in ((cpu_block_sparse.ISA_ENV, args.isa), (cpu_block_sparse.GEMM_ENV, args.gemm)):
        if value is not None:
            os.environ[env] = value
    cpu_block_sparse.reset()
    cpu_block_sparse.extension()  # built (once per source version and build) before any timing
    cpu = cpu_block_sparse.cpu_model()
    print(f"CPU: {cpu} (torch: {torch.backends.cpu.get_cpu_capability()}); loop: {cpu_block_sparse.status()}")
    rows = []
    cases = [] if args.only_dynamic else [(n, d, p) for n in args.tokens for d in args.dtypes for p in patterns_for(n)]
    for tokens, dtype_name, (name, pattern, grid, block, natten_cfg) in tqdm(cases, desc="benchmark"):
        dtype = getattr(torch, dtype_name)
        layout = TokenLayout(grid)
        start = time.perf_counter()
        plan = compile_pattern(pattern, layout, block_size=block)
        mask_build_s = time.perf_counter() - start
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, HEADS, plan.kernel_length, DIM, generator=g).to(dtype) for _ in range(3))
        row = {
            "tokens": tokens,
            "dtype": dtype_name,
            "pattern": name,
            "grid": grid,
            "density": plan.density,
            "mask_build_s": mask_build_s,
            "threads": args.threads,
            "cpu": cpu,
            "cpu_loop": loop_path(dtype),
        }
        row["runs_per_query_block"], row["runs_per_query_block_reordered"] = key_major_runs(
            plan.block_mask, plan.kernel_length, plan.kernel_length
        )
        row["dense_s"] = timed(functools.partial(F.scaled_dot_product_attention, q, k, v), args.repeats)
        out, _ = kernels.attention(q, k, v, plan.block_mask, backend="torch")
        row["torch_s"] = timed(
            functools.partial(kernels.attention, q, k, v, plan.block_mask, backend="torch"), args.repeats
        )
        if not args.no_flex:
            start = time.perf_counter()
            flex_out, _ = kernels.attention(q, k, v, plan.block_mask, backend="flex-compiled", return_lse=False)
            row["flex_compile_s"] = time.perf_counter() - start
            row["flex_max_diff"] = float((flex_out.float() - out.float()).abs().max())
            row["flex_s"] = timed(
                functools.partial(
                    kernels.attention, q, k, v, plan.block_mask, backend="flex-compiled", return_lse=False
                ),
                args.repeats,
            )
        score_gb = tokens * tokens * 4 / 1e9  # one head's fp32 scores
        if natten_cfg and not args.no_natten and score_gb <= args.natten_max_gb:
            try:
                raster = [x.index_select(2, plan.scatter) for x in (q, k, v)]  # NATTEN takes raster order
                start = time.perf_counter()
                nat = natten_tile(*raster, grid, *natten_cfg)
                row["natten_s"] = (time.perf_counter() - start) * HEADS  # one head, timed once, x heads
                ours = out.index_select(2, plan.scatter)[:, :1]  # (1, 1, S, D) like NATTEN's output here
                row["natten_max_diff"] = float((nat.float() - ours.float()).abs().max())
            except (ImportError, RuntimeError) as exc:  # not installed, or out of memory
                row["natten_error"] = str(exc)[:200]
        elif natten_cfg and not args.no_natten:
            row["natten_error"] = f"skipped: NATTEN's CPU path would materialise {score_gb:.1f} GB of scores per head"
        row["speedup_torch"] = row["dense_s"] / row["torch_s"]
        row["torch_cpu_loop_status"], row["kv_tile"] = cpu_block_sparse.status(), args.kv_tile
        row["target"] = 0.8 / plan.density
        rows.append(row)
        tqdm.write(
            f"{tokens:6d} {dtype_name:8s} {name:12s} density {plan.density:.3f}  dense {row['dense_s']:.2f}s  "
            f"torch {row['torch_s']:.3f}s ({row['speedup_torch']:.1f}x, target {row['target']:.1f}x)"
            + (f"  flex {row['flex_s']:.3f}s ({row['dense_s'] / row['flex_s']:.1f}x)" if "flex_s" in row else "")
            + (
                f"  natten {row['natten_s']:.2f}s ({row['dense_s'] / row['natten_s']:.2f}x)"
                if "natten_s" in row
                else ""
            )
        )
    dynamic_cases = (
        [] if args.no_dynamic else [(n, d, m) for n in args.tokens for d in args.dtypes for m in dynamic_methods()]
    )
    for tokens, dtype_name, (name, method) in tqdm(dynamic_cases, desc="dynamic"):
        dtype = getattr(torch, dtype_name)
        grid = TILE_CONFIGS[tokens][0]
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, HEADS, math.prod(grid), DIM, generator=g).to(dtype) for _ in range(3))
        row = {
            "tokens": tokens,
            "dtype": dtype_name,
            "pattern": name,
            "grid": grid,
            "threads": args.threads,
            "cpu": cpu,
            "cpu_loop": loop_path(dtype),
        }
        row["dense_s"] = timed(functools.partial(F.scaled_dot_product_attention, q, k, v), args.repeats)
        result = time_dynamic(method, q, k, v, grid, args.repeats)
        row.update(density=result["density"], torch_s=result["total_s"], select_s=result["select_s"])
        row["speedup_torch"] = row["dense_s"] / row["torch_s"]
        row["target"] = 0.8 / row["density"]
        rows.append(row)
        tqdm.write(
            f"{tokens:6d} {dtype_name:8s} {name:12s} density {row['density']:.3f}  dense {row['dense_s']:.2f}s  "
            f"torch {row['torch_s']:.3f}s incl. selection {row['select_s']:.3f}s "
            f"({row['speedup_torch']:.1f}x, target {row['target']:.1f}x)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(markdown_table(rows))
    return 0


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| tokens | dtype | pattern | CPU loop | density | dense SDPA | torch kernel (incl. selection) | selection | "
        "speedup | target 0.8/density | compiled flex | NATTEN flex-fna |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flex = f"{r['flex_s']:.3f} s ({r['dense_s'] / r['flex_s']:.1f}x)" if "flex_s" in r else "–"
        nat = f"{r['natten_s']:.2f} s ({r['dense_s'] / r['natten_s']:.2f}x)" if "natten_s" in r else "–"
        select = f"{r['select_s']:.3f} s" if "select_s" in r else "–"
        lines.append(
            f"| {r['tokens']} | {r['dtype']} | {r['pattern']} | {r.get('cpu_loop', '?')} | {r['density']:.3f} | "
            f"{r['dense_s']:.2f} s | "
            f"{r['torch_s']:.3f} s | {select} | {r['speedup_torch']:.1f}x | {r['target']:.1f}x | {flex} | {nat} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
