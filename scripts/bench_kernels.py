"""Attention-op benchmark: dense SDPA vs diffattn's block-sparse kernels, in one process, same inputs.

For each sequence length, dtype and pattern (about 10% density) it times dense
``scaled_dot_product_attention``, the ``torch`` block-sparse kernel, compiled FlexAttention on the same
``BlockMask`` and, for sliding tile, NATTEN's ``flex-fna`` backend on the equivalent generalized neighborhood
attention (kernel = window x tile, stride = tile). Ratios are measured in this run; expect 10-20% noise.

    python scripts/bench_kernels.py --tokens 16384 32768 --dtypes float32 bfloat16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffattn import TokenLayout, kernels
from diffattn.patterns.compile import compile_pattern
from diffattn.patterns.tile import SlidingTile

HEADS, DIM = 8, 64
# grid, tile, window (odd windows and tile-aligned grids make NATTEN's GNA the same pattern)
TILE_CONFIGS = {16384: ((16, 32, 32), (2, 8, 8), (5, 3, 1)), 32768: ((32, 32, 32), (2, 8, 8), (3, 3, 3))}
RADIAL_CONFIGS = {16384: ((32, 16, 32), 1.0), 32768: ((64, 16, 32), 1.0)}  # (frames, h, w), decay


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


def natten_tile(q, k, v, grid, tile, window):
    import natten

    def heads_last(x):
        return x[0].permute(1, 0, 2).reshape(1, *grid, HEADS, DIM)

    kernel = tuple(w * t for w, t in zip(window, tile))
    out = natten.na3d(heads_last(q), heads_last(k), heads_last(v), kernel_size=kernel, stride=tile, backend="flex-fna")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--no-flex", action="store_true", help="skip compiled FlexAttention (compiles per shape)")
    parser.add_argument("--no-natten", action="store_true")
    parser.add_argument("--natten-max-gb", type=float, default=10.0,
                        help="NATTEN's CPU path materialises the score matrix; skip it above this size")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_kernels.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    cases = [(n, d, p) for n in args.tokens for d in args.dtypes for p in patterns_for(n)]
    for tokens, dtype_name, (name, pattern, grid, block, natten_cfg) in tqdm(cases, desc="benchmark"):
        dtype = getattr(torch, dtype_name)
        layout = TokenLayout(grid)
        plan = compile_pattern(pattern, layout, block_size=block)
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, HEADS, plan.kernel_length, DIM, generator=g).to(dtype) for _ in range(3))
        row = {"tokens": tokens, "dtype": dtype_name, "pattern": name, "grid": grid, "density": plan.density,
               "threads": args.threads}
        row["dense_s"] = timed(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats)
        out, _ = kernels.attention(q, k, v, plan.block_mask, backend="torch")
        row["torch_s"] = timed(lambda: kernels.attention(q, k, v, plan.block_mask, backend="torch"), args.repeats)
        if not args.no_flex:
            start = time.perf_counter()
            flex_out, _ = kernels.attention(q, k, v, plan.block_mask, backend="flex-compiled", return_lse=False)
            row["flex_compile_s"] = time.perf_counter() - start
            row["flex_max_diff"] = float((flex_out.float() - out.float()).abs().max())
            row["flex_s"] = timed(lambda: kernels.attention(q, k, v, plan.block_mask, backend="flex-compiled", return_lse=False),
                                  args.repeats)
        score_gb = HEADS * tokens * tokens * 4 / 1e9
        if natten_cfg and not args.no_natten and score_gb <= args.natten_max_gb:
            try:
                nat = natten_tile(q, k, v, grid, *natten_cfg)
                ours = out[0].permute(1, 0, 2).reshape(1, *grid, HEADS, DIM)
                row["natten_max_diff"] = float((nat.float() - ours.float()).abs().max())
                row["natten_s"] = timed(lambda: natten_tile(q, k, v, grid, *natten_cfg), 1)
            except (ImportError, RuntimeError) as exc:  # not installed, or out of memory
                row["natten_error"] = str(exc)[:200]
        elif natten_cfg and not args.no_natten:
            row["natten_error"] = f"skipped: NATTEN's CPU path would materialise {score_gb:.0f} GB of scores"
        row["speedup_torch"] = row["dense_s"] / row["torch_s"]
        row["target"] = 0.8 / plan.density
        rows.append(row)
        tqdm.write(
            f"{tokens:6d} {dtype_name:8s} {name:12s} density {plan.density:.3f}  dense {row['dense_s']:.2f}s  "
            f"torch {row['torch_s']:.3f}s ({row['speedup_torch']:.1f}x, target {row['target']:.1f}x)"
            + (f"  flex {row['flex_s']:.3f}s ({row['dense_s'] / row['flex_s']:.1f}x)" if "flex_s" in row else "")
            + (f"  natten {row['natten_s']:.2f}s ({row['dense_s'] / row['natten_s']:.2f}x)" if "natten_s" in row else "")
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(markdown_table(rows))
    return 0


def markdown_table(rows: list[dict]) -> str:
    lines = ["| tokens | dtype | pattern | density | dense SDPA | torch kernel | speedup | target 0.8/density | compiled flex | NATTEN flex-fna |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flex = f"{r['flex_s']:.3f} s ({r['dense_s'] / r['flex_s']:.1f}x)" if "flex_s" in r else "–"
        nat = f"{r['natten_s']:.2f} s ({r['dense_s'] / r['natten_s']:.2f}x)" if "natten_s" in r else "–"
        lines.append(f"| {r['tokens']} | {r['dtype']} | {r['pattern']} | {r['density']:.3f} | {r['dense_s']:.2f} s | "
                     f"{r['torch_s']:.3f} s | {r['speedup_torch']:.1f}x | {r['target']:.1f}x | {flex} | {nat} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
