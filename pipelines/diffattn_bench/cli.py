"""``diffattn compare``: registered under the ``diffattn.commands`` entry points (the library never imports the
bench). Heavy imports wait until the command runs, so ``diffattn --help`` stays fast."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffattn.cli import require_extra, whole_number

__all__ = ["register"]


def _clip_size(text: str) -> tuple[int, int, int]:
    """``FRAMESxHEIGHTxWIDTH`` in pixels, e.g. ``8x128x128``."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected FRAMESxHEIGHTxWIDTH in pixels, e.g. 8x128x128; got {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def _pipeline_folder(text: str) -> str:
    """A folder holding a saved diffusers pipeline (its ``model_index.json``)."""
    if not (Path(text) / "model_index.json").is_file():
        raise argparse.ArgumentTypeError(
            f"{text}: not a saved pipeline folder (no model_index.json); pass the folder a ShapesVideoPipeline was "
            "saved to with save_pretrained, or leave it out for the shipped model"
        )
    return text


def _out_folder(text: str) -> str:
    """A folder to write the report to: it may not exist yet, but it may not be a file."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; pass a folder (it is created if missing)")
    return text


def _compare(args: argparse.Namespace) -> int:
    """diffattn's methods and their peers on the embedded models: speed and ShapesBench quality from one run."""
    require_extra("bench", "matplotlib", "tqdm", "tomesd")
    import torch

    from diffattn_bench import embedded
    from diffattn_bench.compare import (
        PASS_SHAPE_FRAMES,
        QUALITY_SIZE,
        SHAPE_FRAMES_TOLERANCE,
        ClipSize,
        extension_runs,
        format_markdown,
        profile_peers,
        run_image,
        run_video,
        save_outputs,
        select_runs,
        shape_note,
        unsupported_note,
        video_peers,
    )
    from diffattn_bench.peers import calibrate_mag_cache
    from diffattn_bench.scoring import shapes_prompts
    from diffattn_kernels import cpu_block_sparse

    torch.set_num_threads(args.threads)
    if args.full:  # counts not given (None) take the --full defaults; argparse refused any count below 1
        args.prompts = 6 if args.prompts is None else args.prompts
        args.extension_prompts = 3 if args.extension_prompts is None else args.extension_prompts
    if args.quick:  # checks that the whole job works (CI): small clips, few steps
        args.frames, args.height, args.width, args.prompts, args.steps = 8, 32, 32, 1, 4
    prompts_n = 2 if args.prompts is None else args.prompts
    steps = 10 if args.steps is None else args.steps
    size = ClipSize(
        QUALITY_SIZE.frames if args.frames is None else args.frames,
        QUALITY_SIZE.height if args.height is None else args.height,
        QUALITY_SIZE.width if args.width is None else args.width,
    )
    pipe = embedded.load_video_pipeline(args.video_model)
    pipe.set_progress_bar_config(leave=False, desc="denoising")
    patch = pipe.transformer.config.patch_size
    longer = None  # the extension size
    if args.full or args.extension or args.extension_size:
        longer = (
            ClipSize(*args.extension_size)
            if args.extension_size
            else ClipSize(size.frames * 4, size.height, size.width)
        )
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
        pipe(
            prompts[0],
            num_frames=size.frames,
            height=size.height,
            width=size.width,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
        )

    ratios = calibrate_mag_cache(pipe, first_prompt, steps)
    sections = {}
    title = (
        f"embedded video model, {size.label} ({size.tokens(patch)} tokens), {prompts_n} ShapesBench prompts, "
        f"{steps} steps with CFG; {cpu_block_sparse.cpu_model()}, {torch.get_num_threads()} threads"
    )
    peers = video_peers(grid, ratios, steps, natten=args.full or args.quick)
    try:
        peers = select_runs(peers, args.only)
    except ValueError as exc:
        print(f"diffattn compare: {exc}", file=sys.stderr)
        return 2
    peers += [peer for folder in args.profile for peer in profile_peers(folder, ratios, steps)]
    sections[f"video {size.label}"] = run_video(pipe, size, peers, prompts=prompts, steps=steps, desc="video")
    if longer is not None:
        ext_prompts = prompts[: min(len(prompts), 2 if args.extension_prompts is None else args.extension_prompts)]
        what = (
            "4x the frames" if not args.extension_size else f"{longer.tokens(patch) / size.tokens(patch):g}x the tokens"
        )
        sections[f"video {longer.label} ({what})"] = run_video(
            pipe,
            longer,
            extension_runs(longer.grid(patch), size.tokens(patch)),
            prompts=ext_prompts,
            steps=steps if args.extension_steps is None else args.extension_steps,
            desc="length extension",
        )
    if not args.no_image:
        image_pipe = embedded.load_image_pipeline()
        image_pipe.set_progress_bar_config(leave=False, desc="denoising")
        sections["image 4x tokens"] = run_image(
            image_pipe,
            scale=4.0,
            prompts=shapes_prompts("image", args.image_prompts if not args.quick else 2),
            steps=steps,
        )
    for name, (rows, _) in sections.items():
        print(f"\n### {name}\n")
        print(format_markdown(rows, "image" if name.startswith("image") else "video"))
        if name.startswith("video"):
            print(f"\n{shape_note(rows)}")
    print(
        "\nspeedup: end to end over stock dense attention, same process, same prompts and seeds; attention x: "
        "attention-core time of diffattn's dense over the method's; Amdahl bound: the best end-to-end speedup that "
        "attention speedup allows; reach = speedup / bound. Shapes: object-frames with the prompted colour and shape "
        "(in brackets: points against stock dense). Trajectory error in bold: passes ShapesBench (< 0.04, "
        f"positions >= 90%, every object found, shapes at most {SHAPE_FRAMES_TOLERANCE:.0%} below stock dense's). "
        "Not compared: " + unsupported_note()
    )
    meta = {
        "cpu": cpu,
        "size": size.label,
        "prompts": list(prompts),
        "steps": steps,
        "mag_cache_ratios": ratios,
        "shape_frames_bar": {"dense": PASS_SHAPE_FRAMES, "tolerance_below_dense": SHAPE_FRAMES_TOLERANCE},
        "torch": torch.__version__,
    }
    for path in save_outputs(sections, Path(args.out), title, meta):
        print(f"wrote {path}")
    failed = [(name, row) for name, (rows, _) in sections.items() for row in rows if row.error]
    if failed:  # the report is written, but the exit status must not say every run worked
        print(
            f"diffattn compare: {len(failed)} run{'s' if len(failed) > 1 else ''} failed (marked 'failed' in the "
            "table and compare.json): " + "; ".join(f"{row.method} ({name}): {row.error}" for name, row in failed),
            file=sys.stderr,
        )
        return 1
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``compare`` (the main job)."""
    compare = commands.add_parser("compare", help="speed and quality of diffattn's methods and their peers (main job)")
    compare.add_argument(
        "--frames",
        type=whole_number(),
        default=None,
        help="frames of the quality size, where dense is right (default 16; height, width: 64)",
    )
    compare.add_argument("--height", type=whole_number(), default=None)
    compare.add_argument("--width", type=whole_number(), default=None)
    compare.add_argument(
        "--prompts", type=whole_number(), default=None, help="ShapesBench prompts per run (default 2; --full 6)"
    )
    compare.add_argument("--steps", type=whole_number(), default=None, help="denoising steps with CFG (default 10)")
    compare.add_argument(
        "--full", action="store_true", help="6 prompts, NATTEN and the length extension (3 prompts); about an hour"
    )
    compare.add_argument("--extension", action="store_true", help="add the 4x-frames length extension")
    compare.add_argument(
        "--extension-size",
        type=_clip_size,
        default=None,
        metavar="FxHxW",
        help="size of the extension run, e.g. 8x128x128 (implies --extension; default: 4x the frames)",
    )
    compare.add_argument("--extension-prompts", type=whole_number(), default=None, help="default 2; --full 3")
    compare.add_argument("--extension-steps", type=whole_number(), default=None, help="default: --steps")
    compare.add_argument(
        "--image-prompts", type=whole_number(), default=8, help="prompts of the image part (ToDo vs tomesd)"
    )
    compare.add_argument("--no-image", action="store_true", help="skip the image part")
    compare.add_argument(
        "--video-model",
        type=_pipeline_folder,
        default=None,
        help="a saved ShapesVideoPipeline (default: the shipped one)",
    )
    compare.add_argument(
        "--profile",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help=(
            "add the rows of a tuned profile saved in DIR (scripts/tune_video.py): alone and under each cache hook; "
            "repeatable"
        ),
    )
    compare.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help=(
            "keep only the video runs whose label contains TEXT (repeatable; stock dense, diffattn's dense and "
            "--profile rows always run), e.g. --only top-k --only SeaCache"
        ),
    )
    compare.add_argument("--threads", type=whole_number(), default=2)
    compare.add_argument(
        "--out", type=_out_folder, default="outputs/compare", help="folder for compare.json, compare.png, pareto.png"
    )
    compare.add_argument(
        "--quick",
        action="store_true",
        help="a short run (8 frames x 32 x 32 px, 1 prompt, 4 steps) that checks the whole job works (CI)",
    )
    compare.set_defaults(run=_compare)
