"""GPU benchmark: diffattn's Triton block-sparse kernel against dense FlashAttention / SDPA, per pattern and density.

For each sequence length (default 16k, 32k, 64k, 128k video tokens), dtype and pattern at several densities it
times, on the same q, k, v:

- dense ``scaled_dot_product_attention`` restricted to its FlashAttention backend (``sdpa-flash``) and with
  PyTorch's default choice (``sdpa``); ``flash_attn.flash_attn_func`` (FA2) and ``flash_attn_interface``
  (FA3, Hopper) when installed;
- the block mask on the ``triton`` backend (the kernel of ``kernels/src/diffattn_kernels/triton_block_sparse.py``), and
optionally on
  ``xformers`` (when it accepts the mask), ``flex-compiled`` and ``torch`` (``--backends``).

It prints and saves (``outputs/bench_gpu/<gpu>-<time>.json``) the median time, the density (fraction of token
pairs in kept blocks), the achieved attention TFLOP/s of the work done (4 * B * H * D * kept pairs / time), the
dense-equivalent TFLOP/s (4 * B * H * D * S^2 / time) and the speedup over ``sdpa-flash`` (and FA2 / FA3), next to
the ideal 1 / density. Mask building (pattern compile + the partial blocks' bit tiles) is timed once on its own.

    python scripts/bench_gpu.py                                   # all lengths, bf16, 24 heads x 128
    python scripts/bench_gpu.py --tokens 16384 32768 --dtypes float16 --heads 8 --dim 64
    python scripts/bench_gpu.py --plan                            # list configs and densities (no GPU needed)

Needs a CUDA GPU: without one it refuses to run (exit code 2); ``--plan`` only builds the masks on the CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import diffattn_kernels as kernels
from diffattn import TokenLayout
from diffattn.patterns import Radial, ShiftedWindow, SlidingWindow
from diffattn.patterns.compile import compile_pattern
from diffattn.patterns.tile import SlidingTile

# Video token grids (frames, height, width) per sequence length; image grids for the shifted window (HiDiffusion's
# MSW-MSA is an image method).
GRIDS = {16384: (16, 32, 32), 32768: (32, 32, 32), 65536: (16, 64, 64), 131072: (32, 64, 64)}
IMAGE_GRIDS = {16384: (128, 128), 32768: (128, 256), 65536: (256, 256), 131072: (256, 512)}
TILE = (2, 8, 8)  # 128-token tiles: every kernel block full or empty
DENSITIES = (0.05, 0.1, 0.2, 0.4)
RADIAL_DECAYS = (0.2, 0.5, 1.0)
BLOCK = 128


def _axis_windows(lengths: tuple[int, ...], density: float) -> tuple[int, ...]:
    """Per-axis window (in units of ``lengths``) whose product is about ``density`` of the whole."""
    per_axis = density ** (1.0 / len(lengths))
    return tuple(max(1, min(n, round(n * per_axis))) for n in lengths)


def _odd(window: tuple[int, ...], limits: tuple[int, ...]) -> tuple[int, ...]:
    """NATTEN-style odd windows, at most ``limits`` per axis."""
    out = []
    for w, limit in zip(window, limits):
        w = min(w, limit)
        out.append(max(1, w - 1 if w % 2 == 0 else w))
    return tuple(out)


def patterns(tokens: int, densities, decays):
    """(name, parameter label, pattern, block size, grid) for one sequence length."""
    grid = GRIDS[tokens]
    tiles = tuple(math.ceil(n / t) for n, t in zip(grid, TILE))
    for d in densities:
        window = _axis_windows(tiles, d)
        yield "sliding tile", f"tile={TILE} window={window}", SlidingTile(TILE, window), math.prod(TILE), grid
    for d in densities:
        window = _odd(_axis_windows(grid, d), grid)
        yield "sliding window", f"window={window}", SlidingWindow(window), BLOCK, grid
    d = densities[len(densities) // 2]
    window = _odd(_axis_windows(grid, d), grid)
    stride = tuple(max(1, w // 2) for w in window)
    yield "sliding window", f"window={window} stride={stride}", SlidingWindow(window, stride=stride), BLOCK, grid
    dilation = (1, 2, 2)
    window = _odd(_axis_windows(grid, d), tuple(n // dl for n, dl in zip(grid, dilation)))
    yield (
        "sliding window",
        f"window={window} dilation={dilation}",
        SlidingWindow(window, dilation=dilation),
        BLOCK,
        grid,
    )
    image = IMAGE_GRIDS[tokens]
    for windows in ((2, 2), (4, 4)):
        pattern = ShiftedWindow.from_fraction(image, 0.25, windows)
        yield "shifted window", f"image {image} windows={windows} shift=1/4", pattern, BLOCK, image
    for decay in decays:
        yield "radial", f"decay={decay}", Radial(decay=decay, block_size=BLOCK), BLOCK, grid


def cuda_time(fn, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn`` measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times)


def dense_baselines(q, k, v):
    """Dense attention callables available here: name -> fn()."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa_flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    out = {"sdpa-flash": sdpa_flash, "sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # (B, S, H, D) for flash_attn
    try:
        from flash_attn import flash_attn_func

        out["fa2"] = lambda: flash_attn_func(qt, kt, vt)
    except ImportError:
        pass
    try:
        from flash_attn_interface import flash_attn_func as fa3

        out["fa3"] = lambda: fa3(qt, kt, vt)
    except ImportError:
        pass
    return out


def plan_only(args) -> None:
    for tokens in args.tokens:
        for name, label, pattern, block, grid in patterns(tokens, args.densities, args.decays):
            layout = TokenLayout(grid, text_len=args.text)
            t0 = time.perf_counter()
            plan = compile_pattern(pattern, layout, block_size=block)
            bm = plan.block_mask
            print(
                f"{tokens:>7} {name:<15} {label:<45} density {plan.density:6.3f}  "
                f"partial blocks {int(bm.kv_num_blocks.sum()):>7}  full {int(bm.full_kv_num_blocks.sum()):>7}  "
                f"compile {time.perf_counter() - t0:5.1f} s",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=sorted(GRIDS), choices=sorted(GRIDS))
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16"])
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--text", type=int, default=0, help="text tokens of joint attention (dense rows/columns)")
    parser.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    parser.add_argument("--decays", type=float, nargs="+", default=list(RADIAL_DECAYS))
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["triton", "xformers"],
        help="block-mask backends to time (triton, xformers, flex-compiled, torch)",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--check", action="store_true", help="compare triton with the torch backend (max abs error)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_gpu"))
    parser.add_argument("--plan", action="store_true", help="only build the masks and print densities (CPU is fine)")
    args = parser.parse_args()

    if args.plan:
        plan_only(args)
        return
    if not torch.cuda.is_available():
        print(
            "bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False): it measures the Triton kernel "
            "compiled for the GPU and has no CPU fallback. Use scripts/bench_kernels.py on CPU, or --plan to list "
            "the configurations.",
            file=sys.stderr,
        )
        sys.exit(2)
    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(device)
    results = []
    print(
        f"GPU: {gpu}; torch {torch.__version__}; heads {args.heads} x dim {args.dim}, batch {args.batch}, "
        f"text tokens {args.text}"
    )
    header = (
        f"{'tokens':>7} {'dtype':<8} {'pattern':<15} {'parameters':<45} {'density':>7} {'backend':<13} "
        f"{'ms':>9} {'TFLOP/s':>8} {'dense-eq':>8} {'speedup':>8} {'ideal':>6}"
    )
    for tokens in args.tokens:
        n = tokens + args.text
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v = (
                torch.randn(args.batch, args.heads, n, args.dim, device=device, dtype=dtype, generator=g)
                for _ in range(3)
            )
            dense_flops = 4.0 * args.batch * args.heads * args.dim * n * n
            print(header)
            baseline = {}
            for name, fn in dense_baselines(q, k, v).items():
                try:
                    seconds = cuda_time(fn, args.warmup, args.repeats)
                except RuntimeError as error:  # e.g. no flash kernel for this dtype / GPU
                    print(f"{tokens:>7} {dtype_name:<8} dense {name}: not available ({error})")
                    continue
                baseline[name] = seconds
                print(
                    f"{tokens:>7} {dtype_name:<8} {'dense':<15} {'':<45} {1.0:7.3f} {name:<13} {seconds * 1e3:9.2f} "
                    f"{dense_flops / seconds / 1e12:8.1f} {dense_flops / seconds / 1e12:8.1f} {'':>8} {'':>6}"
                )
                results.append(
                    dict(
                        tokens=n,
                        dtype=dtype_name,
                        pattern="dense",
                        parameters="",
                        density=1.0,
                        backend=name,
                        seconds=seconds,
                        tflops=dense_flops / seconds / 1e12,
                    )
                )
            reference = baseline.get("sdpa-flash") or baseline.get("sdpa")
            for pname, label, pattern, block, grid in patterns(tokens, args.densities, args.decays):
                t0 = time.perf_counter()
                plan = compile_pattern(pattern, TokenLayout(grid, text_len=args.text), block_size=block, device=device)
                torch.cuda.synchronize()
                compile_s = time.perf_counter() - t0
                bm = plan.block_mask
                if int(bm.kv_num_blocks.sum()):
                    from diffattn_kernels.triton_block_sparse import partial_block_bits

                    t0 = time.perf_counter()
                    partial_block_bits(bm, n, n, device)
                    torch.cuda.synchronize()
                    bits_s = time.perf_counter() - t0
                else:
                    bits_s = 0.0
                qk, kk, vk = (x.index_select(-2, plan.gather) for x in (q, k, v))
                work_flops = dense_flops * plan.density
                for backend in args.backends:
                    try:
                        kernels.select_backend(backend, qk, kk.shape[-2], block_mask=bm)
                    except ValueError as error:
                        print(
                            f"{tokens:>7} {dtype_name:<8} {pname:<15} {label:<45} {plan.density:7.3f} "
                            f"{backend:<13} skipped: {error}"
                        )
                        continue
                    fn = functools.partial(kernels.attention, qk, kk, vk, bm, backend=backend, return_lse=False)
                    seconds = cuda_time(fn, args.warmup, args.repeats)
                    speedup = reference / seconds if reference else float("nan")
                    row = dict(
                        tokens=n,
                        dtype=dtype_name,
                        pattern=pname,
                        parameters=label,
                        density=plan.density,
                        backend=backend,
                        seconds=seconds,
                        tflops=work_flops / seconds / 1e12,
                        dense_equivalent_tflops=dense_flops / seconds / 1e12,
                        speedup_vs_sdpa_flash=speedup,
                        ideal_speedup=1.0 / plan.density,
                        mask_compile_s=compile_s,
                        mask_bits_s=bits_s,
                        partial_blocks=int(bm.kv_num_blocks.sum()),
                        full_blocks=int(bm.full_kv_num_blocks.sum()),
                    )
                    for other in ("fa2", "fa3"):
                        if other in baseline:
                            row[f"speedup_vs_{other}"] = baseline[other] / seconds
                    if args.check and backend == "triton":
                        got = kernels.attention(qk, kk, vk, bm, backend="triton", return_lse=False)[0]
                        ref = kernels.attention(qk, kk, vk, bm, backend="torch", return_lse=False)[0]
                        row["max_abs_err_vs_torch"] = (got.float() - ref.float()).abs().max().item()
                    results.append(row)
                    print(
                        f"{tokens:>7} {dtype_name:<8} {pname:<15} {label:<45} {plan.density:7.3f} {backend:<13} "
                        f"{seconds * 1e3:9.2f} {row['tflops']:8.1f} {row['dense_equivalent_tflops']:8.1f} "
                        f"{speedup:8.2f} {1.0 / plan.density:6.1f}",
                        flush=True,
                    )
                del qk, kk, vk
            del q, k, v
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.out / f"{gpu.replace(' ', '_')}-{stamp}.json"
    meta = dict(gpu=gpu, torch=torch.__version__, heads=args.heads, dim=args.dim, batch=args.batch, text=args.text)
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    path.write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
