"""Tune dynamic top-k attention for the embedded video model at one clip size (issue #30) and save the profile.

    python scripts/tune_video.py --size 16x64x64 --psnr 25 --prompts 3 --steps 10 --out outputs/profiles/video-4096

``--cache SeaCache`` first calibrates that diffusers step cache's threshold to ``--cache-psnr`` (default ``--psnr`` +
2 dB) and then tunes the profile under it to ``--psnr``: the pair is meant to run together.

Calibration prompts are ShapesBench video prompts drawn with another seed than ``diffattn compare``'s report
prompts, so the profile is scored on prompts it never saw (``diffattn compare --profile DIR``). Prints the time,
the CPU, the mean budget and each layer's budgets per step range, and writes ``budgets.png`` (layers x heads, one
panel per step range) next to the profile.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import diffattn
from diffattn_bench import embedded
from diffattn_bench.compare import ClipSize
from diffattn_bench.peers import CALIBRATABLE_CACHES, calibratable_cache
from diffattn_bench.scoring import shapes_prompts
from diffattn_kernels import cpu_block_sparse

CALIBRATION_SEED = 4321  # diffattn compare scores shapes_prompts("video", n) with the default seed 1234


def _size(text: str) -> ClipSize:
    try:
        frames, height, width = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a clip size is FRAMESxHEIGHTxWIDTH, e.g. 16x64x64; got {text!r}") from None
    return ClipSize(frames, height, width)


def plot_budgets(profile: diffattn.TunedProfile, path: Path) -> None:
    """One heat map per step range: rows the layers, columns the heads, colour the chosen top-k fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ranges = profile.step_ranges
    fig, axes = plt.subplots(1, ranges, figsize=(3 + 2.5 * ranges, 0.3 * len(profile.layers) + 1.5), squeeze=False)
    for index, ax in enumerate(axes[0]):
        grid = np.array([layer.budgets[index] for layer in profile.layers])
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"steps {index + 1}/{ranges} of the schedule")
        ax.set_xlabel("head")
        ax.set_yticks(range(len(profile.layers)), [layer.name for layer in profile.layers] if index == 0 else [])
    fig.colorbar(image, ax=axes[0].tolist(), label="top-k fraction kept (1 = dense)")
    fig.suptitle(
        f"tuned budgets, relative L1 target {profile.error_target:g}; mean {profile.mean_budget():.3f}", y=1.08
    )
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=_size, default=ClipSize(16, 64, 64), help="FRAMESxHEIGHTxWIDTH (16x64x64)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--target", type=float, default=None, help="relative L1 error per head, e.g. 0.1")
    target.add_argument("--psnr", type=float, default=None, help="dB against dense on the calibration clips, e.g. 25")
    parser.add_argument("--prompts", type=int, default=3, help="calibration prompts (3)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps, as diffattn compare (10)")
    parser.add_argument("--ranges", type=int, default=2, help="step ranges with their own budgets (2)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the profile")
    parser.add_argument(
        "--no-costs",
        action="store_true",
        help="with --psnr: choose budgets by error alone (default: weigh each candidate's time against dense's)",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="compute every head's attention in bfloat16 (native with AMX / AVX512-BF16; the profile records it)",
    )
    parser.add_argument(
        "--cache",
        choices=sorted(CALIBRATABLE_CACHES),
        default=None,
        help="with --psnr: first calibrate this diffusers step cache's threshold (to --cache-psnr), then tune the "
        "profile under it to --psnr; writes cache.json beside the profile (diffattn compare --profile adds its rows)",
    )
    parser.add_argument(
        "--cache-psnr",
        type=float,
        default=None,
        help="dB the cache alone keeps on the calibration clips (default: --psnr + 2, leaving the profile the rest)",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.cache is not None and args.psnr is None:
        parser.error("--cache needs --psnr: the profile is tuned under the cache to a PSNR against dense")
    if args.cache_psnr is not None and args.cache is None:
        parser.error("--cache-psnr is the target of the cache chosen with --cache")
    torch.set_num_threads(args.threads)
    pipe = embedded.load_video_pipeline()
    pipe.set_progress_bar_config(disable=True)
    patch = pipe.transformer.config.patch_size
    grid = args.size.grid(patch)
    tile = tuple(min(t, n) for t, n in zip((4, 8, 8), grid))  # as diffattn compare's dynamic top-k
    prompts = shapes_prompts("video", args.prompts, seed=CALIBRATION_SEED)
    print(
        f"tuning on {cpu_block_sparse.cpu_model()}, {torch.get_num_threads()} threads; {args.size.label} "
        f"({args.size.tokens(patch)} tokens), {args.prompts} prompts x {args.steps} steps"
    )
    start = time.perf_counter()
    call = {"num_frames": args.size.frames, "height": args.size.height, "width": args.size.width}
    cache = None
    if args.cache is not None:
        make = calibratable_cache(args.cache)
        found = diffattn.calibrate_cache(
            pipe,
            make,
            prompts,
            psnr_target=args.psnr + 2 if args.cache_psnr is None else args.cache_psnr,
            num_inference_steps=args.steps,
            thresholds=CALIBRATABLE_CACHES[args.cache],
            **call,
        )
        found.save(args.out)
        cache = make(found.threshold)
        tried = ", ".join(f"{t.threshold:g}: {t.psnr:.1f} dB, {t.computed:.0%}" for t in found.trials)
        print(
            f"{args.cache}: threshold {found.threshold:g} keeps {found.psnr:.1f} dB with {found.computed:.0%} of "
            f"dense's attention calls ({time.perf_counter() - start:.0f} s; tried {tried})"
        )
    profile = diffattn.tune(
        pipe,
        "dynamic-topk",
        prompts,
        error_target=args.target,
        psnr_target=args.psnr,
        num_inference_steps=args.steps,
        step_ranges=args.ranges,
        tile=tile,
        checkpoint=args.out / "checkpoint",
        weigh_costs=not args.no_costs,
        compute_dtype=torch.bfloat16 if args.bf16 else None,
        cache=cache,
        **call,
    )
    seconds = time.perf_counter() - start
    profile.save(args.out)
    plot_budgets(profile, args.out / "budgets.png")
    reached = (
        "" if profile.calibration_psnr is None else f"; {profile.calibration_psnr:.1f} dB on the calibration clips"
    )
    print(
        f"tuned in {seconds:.0f} s; {profile.compute_dtype or 'float32'}; per-head threshold {profile.error_target:g}; "
        "mean top-k fraction "
        f"{profile.mean_budget():.3f}{reached}; saved to {args.out}"
    )
    for layer in profile.layers:
        rows = " | ".join(" ".join(f"{b:.2g}" for b in row) for row in layer.budgets)
        print(f"  {layer.name}: {rows}")
    if profile.layers[0].costs:
        print("time of each candidate top-k fraction, as a fraction of dense attention's, per layer:")
        print("  " + " ".join(f"{c:>5g}" for c in profile.candidates))
        for layer in profile.layers:
            print("  " + " ".join(f"{c:5.2f}" for c in layer.costs) + f"  {layer.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
