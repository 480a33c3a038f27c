"""The ``diffattn`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = ["main"]


def _example(args: argparse.Namespace) -> int:
    """Apply Dense and a local Masked method to a tiny Flux pipeline and report what changed."""
    import numpy as np
    import torch

    import diffattn
    from diffattn.pipelines.tiny import tiny_pipeline

    pipe = tiny_pipeline("flux", seed=0)
    pipe.set_progress_bar_config(desc="denoising", leave=False)

    def generate() -> np.ndarray:
        out = pipe("a red circle on the left", num_inference_steps=args.steps, height=args.size, width=args.size,
                   output_type="np", generator=torch.Generator().manual_seed(0))
        return np.asarray(out.images)

    def local(q_idx: torch.Tensor, kv_idx: torch.Tensor, ctx: diffattn.AttentionContext) -> torch.Tensor:
        """Image tokens see text and image tokens within 1 row/column; text sees everything."""
        ql, kl = ctx.q_layout, ctx.kv_layout
        qy, qx = ql.visual_coords(q_idx)
        ky, kx = kl.visual_coords(kv_idx)
        near = ((qy - ky).abs() <= 1) & ((qx - kx).abs() <= 1)
        return near | ql.is_text(q_idx) | kl.is_text(kv_idx)

    stock = generate()
    rows = [("stock processors", 0.0, "-")]
    for label, method, steps in (
        ("Dense", diffattn.Dense(), None),
        ("Masked 3x3 window", diffattn.Masked(local), None),
        ("Masked 3x3, dense warm-up 50%", diffattn.Masked(local), 0.5),
    ):
        with diffattn.apply(pipe, method, steps=steps) as handle:
            image = generate()
            acted = handle.acted()
        rows.append((label, float(np.abs(image - stock).max()),
                     f"{len({s for s, _ in acted})} steps x {len({l for _, l in acted})} layers"))

    print(f"tiny FluxPipeline, {args.size}x{args.size} px, {args.steps} steps (random weights)")
    print(f"{'method':32s} {'max |diff| vs stock':>20s}  acted on")
    for label, diff, acted in rows:
        print(f"{label:32s} {diff:20.3g}  {acted}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    """Dense vs sparse methods on the embedded video model at 16k+ tokens: times, Amdahl bound, PSNR/SSIM."""
    from pathlib import Path

    import torch

    from diffattn.pipelines import embedded
    from diffattn.pipelines.compare import format_rows, run_compare, save_outputs

    torch.set_num_threads(args.threads)
    if args.quick:
        args.frames, args.height, args.width, args.steps = 8, 32, 64, 1
    try:
        pipe = embedded.load_video_pipeline()
        weights = "trained embedded video model"
    except FileNotFoundError:
        pipe = embedded.random_video_pipeline(seed=0)
        weights = "embedded video architecture, random weights (train it: scripts/train_shapes_video.py)"
    pipe.set_progress_bar_config(leave=False, desc="denoising")
    rows, videos = run_compare(pipe, frames=args.frames, height=args.height, width=args.width, steps=args.steps)
    patch = pipe.transformer.config.patch_size
    tokens = (args.frames // patch[0]) * (args.height // patch[1]) * (args.width // patch[2])
    title = (f"{weights}; {args.frames} frames x {args.height}x{args.width} px = {tokens} tokens, "
             f"{args.steps} steps with CFG, {torch.get_num_threads()} CPU threads")
    print(title)
    print(format_rows(rows))
    print("e2e x: speedup of the whole generation over stock dense attention; Amdahl: the best e2e speedup the model "
          "allows for that method's measured attention speedup; reach = e2e / Amdahl; ideal: the bound if attention "
          "cost were exactly proportional to density.")
    for path in save_outputs(rows, videos, Path(args.out), title):
        print(f"wrote {path}")
    return 0


def demo_app_path() -> Path:
    """``demo/app.py`` of the source tree this package runs from (the demo ships with the repository, not as a module
    of the installed package)."""
    return Path(__file__).resolve().parents[1] / "demo" / "app.py"


def _demo(args: argparse.Namespace) -> int:
    """Serve the Gradio demo (``demo/app.py``; its options: ``diffattn demo --help``)."""
    import importlib.util

    path = demo_app_path()
    if not path.is_file():
        print(f"diffattn demo: {path} is missing; the demo runs from a clone of the repository installed with "
              "`pip install -e \".[demo]\"` (scripts/bootstrap.sh does this)", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("diffattn_demo_app", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.main(args.demo_args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffattn", description="Attention methods for diffusers models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what diffattn installs")
    sub = parser.add_subparsers(dest="command")
    example = sub.add_parser("example", help="apply methods to a tiny pipeline and show what changed")
    example.add_argument("--steps", type=int, default=4)
    example.add_argument("--size", type=int, default=64, help="image size in pixels (multiple of 16)")
    example.set_defaults(run=_example)
    compare = sub.add_parser("compare", help="speed and quality of sparse methods vs dense attention (main job)")
    compare.add_argument("--frames", type=int, default=32)
    compare.add_argument("--height", type=int, default=64)
    compare.add_argument("--width", type=int, default=128)
    compare.add_argument("--steps", type=int, default=2, help="denoising steps (each runs cond and uncond passes)")
    compare.add_argument("--threads", type=int, default=2)
    compare.add_argument("--out", default="outputs/compare", help="folder for compare.png and compare.json")
    compare.add_argument("--quick", action="store_true",
                         help="a short run (8 frames x 32 x 64 px, 1 step) that checks the whole job works (CI)")
    compare.set_defaults(run=_compare)
    # every argument after "demo" goes to demo/app.py's own parser (--port, --host, --image-model, ...)
    demo = sub.add_parser("demo", help="the Gradio editing demo (options: diffattn demo --help)", add_help=False,
                          prefix_chars="\0")
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
