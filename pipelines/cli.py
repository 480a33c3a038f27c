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


def _clip_size(text: str) -> tuple[int, int, int]:
    """``FRAMESxHEIGHTxWIDTH`` in pixels, e.g. ``8x128x128``."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected FRAMESxHEIGHTxWIDTH in pixels, e.g. 8x128x128; got {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def _compare(args: argparse.Namespace) -> int:
    """diffattn's methods and their peers on the embedded models: speed and ShapesBench quality from one run."""
    from pathlib import Path

    import torch

    from diffattn.evaluation import shapes_prompts
    from diffattn.kernels import cpu_block_sparse
    from diffattn.pipelines import embedded
    from diffattn.pipelines.compare import (
        QUALITY_SIZE,
        ClipSize,
        extension_runs,
        format_markdown,
        run_image,
        run_video,
        save_outputs,
        unsupported_note,
        video_peers,
    )
    from diffattn.pipelines.peers import calibrate_mag_cache

    torch.set_num_threads(args.threads)
    if args.full:
        args.prompts, args.extension_prompts = args.prompts or 6, args.extension_prompts or 3
    if args.quick:  # checks that the whole job works (CI): small clips, few steps
        args.frames, args.height, args.width, args.prompts, args.steps = 8, 32, 32, 1, 4
    prompts_n, steps = args.prompts or 2, args.steps or 10
    size = ClipSize(QUALITY_SIZE.frames if args.frames is None else args.frames,
                    QUALITY_SIZE.height if args.height is None else args.height,
                    QUALITY_SIZE.width if args.width is None else args.width)
    pipe = embedded.load_video_pipeline(args.video_model)
    pipe.set_progress_bar_config(leave=False, desc="denoising")
    patch = pipe.transformer.config.patch_size
    longer = None  # the extension size
    if args.full or args.extension or args.extension_size:
        longer = ClipSize(*args.extension_size) if args.extension_size else ClipSize(size.frames * 4, size.height,
                                                                                      size.width)
    try:  # both sizes are checked before any work
        grid = size.grid(patch)
        if longer is not None:
            longer.grid(patch)
    except ValueError as exc:
        print(f"diffattn compare: {exc}", file=sys.stderr)
        return 2
    prompts = shapes_prompts("video", prompts_n)
    cpu = f"{cpu_block_sparse.cpu_model()}, {torch.get_num_threads()} threads; CPU loop: {cpu_block_sparse.status()}"
    print(f"diffattn compare on {cpu}")

    def first_prompt() -> None:
        pipe(prompts[0], num_frames=size.frames, height=size.height, width=size.width, num_inference_steps=steps,
             generator=torch.Generator().manual_seed(0))

    ratios = calibrate_mag_cache(pipe, first_prompt, steps)
    sections = {}
    title = (f"embedded video model, {size.label} ({size.tokens(patch)} tokens), {prompts_n} ShapesBench prompts, "
             f"{steps} steps with CFG; {cpu_block_sparse.cpu_model()}, {torch.get_num_threads()} threads")
    peers = video_peers(grid, ratios, steps, natten=args.full or args.quick)
    sections[f"video {size.label}"] = run_video(pipe, size, peers, prompts=prompts, steps=steps, desc="video")
    if longer is not None:
        ext_prompts = prompts[: max(1, min(len(prompts), args.extension_prompts or 2))]
        what = ("4x the frames" if not args.extension_size
                else f"{longer.tokens(patch) / size.tokens(patch):g}x the tokens")
        sections[f"video {longer.label} ({what})"] = run_video(
            pipe, longer, extension_runs(longer.grid(patch), size.tokens(patch)), prompts=ext_prompts,
            steps=args.extension_steps or steps, desc="length extension")
    if not args.no_image:
        image_pipe = embedded.load_image_pipeline()
        image_pipe.set_progress_bar_config(leave=False, desc="denoising")
        sections["image 4x tokens"] = run_image(image_pipe, scale=4.0, prompts=shapes_prompts("image", args.image_prompts
                                                                                               if not args.quick else 2),
                                                steps=steps)
    for name, (rows, _) in sections.items():
        print(f"\n### {name}\n")
        print(format_markdown(rows, "image" if name.startswith("image") else "video"))
    print("\nspeedup: end to end over stock dense attention, same process, same prompts and seeds; attention x: "
          "attention-core time of diffattn's dense over the method's; Amdahl bound: the best end-to-end speedup that "
          "attention speedup allows; reach = speedup / bound. Trajectory error in bold: passes ShapesBench (< 0.04, "
          "positions >= 90%, every object found). Not compared: " + unsupported_note())
    meta = {"cpu": cpu, "size": size.label, "prompts": list(prompts), "steps": steps, "mag_cache_ratios": ratios,
            "torch": torch.__version__}
    for path in save_outputs(sections, Path(args.out), title, meta):
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
    compare = sub.add_parser("compare", help="speed and quality of diffattn's methods and their peers (main job)")
    compare.add_argument("--frames", type=int, default=None,
                         help="frames of the quality size, where dense is right (default 16; height, width: 64)")
    compare.add_argument("--height", type=int, default=None)
    compare.add_argument("--width", type=int, default=None)
    compare.add_argument("--prompts", type=int, default=None, help="ShapesBench prompts per run (default 2; --full 6)")
    compare.add_argument("--steps", type=int, default=None, help="denoising steps with CFG (default 10)")
    compare.add_argument("--full", action="store_true",
                         help="6 prompts, NATTEN and the length extension (3 prompts); about an hour")
    compare.add_argument("--extension", action="store_true", help="add the 4x-frames length extension")
    compare.add_argument("--extension-size", type=_clip_size, default=None, metavar="FxHxW",
                         help="size of the extension run, e.g. 8x128x128 (implies --extension; default: 4x the frames)")
    compare.add_argument("--extension-prompts", type=int, default=None, help="default 2; --full 3")
    compare.add_argument("--extension-steps", type=int, default=None, help="default: --steps")
    compare.add_argument("--image-prompts", type=int, default=8, help="prompts of the image part (ToDo vs tomesd)")
    compare.add_argument("--no-image", action="store_true", help="skip the image part")
    compare.add_argument("--video-model", default=None, help="a saved ShapesVideoPipeline (default: the shipped one)")
    compare.add_argument("--threads", type=int, default=2)
    compare.add_argument("--out", default="outputs/compare", help="folder for compare.json, compare.png, pareto.png")
    compare.add_argument("--quick", action="store_true",
                         help="a short run (8 frames x 32 x 32 px, 1 prompt, 4 steps) that checks the whole job works (CI)")
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
