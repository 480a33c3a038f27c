"""``diffattn inspect``: the table of :func:`diffattn.inspect` for a tiny test pipeline or a local diffusers folder,
with the grid and text of each module from one denoising step at a small size. torch and the library load when the
command runs, not when the ``diffattn`` command registers it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["register", "run"]

_DENOISERS = ("transformer", "unet", "transformer_2")


def _step(pipe: Any, args: argparse.Namespace) -> None:
    """One denoising step of ``pipe`` at the requested size (frames too when the pipeline takes them)."""
    import inspect as signature_of

    import torch

    kwargs: dict[str, Any] = dict(num_inference_steps=1, height=args.height, width=args.width, output_type="latent")
    if "num_frames" in signature_of.signature(type(pipe).__call__).parameters:
        kwargs["num_frames"] = args.frames
    pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs)


def _load_folder(folder: Path) -> tuple[Any, bool]:
    """The pipeline in ``folder`` (``True``: it can run), or, when its pipeline class is not diffusers' own, its
    denoiser alone (``False``: roles only)."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(folder, local_files_only=True), True
    except (AttributeError, ValueError, ImportError, OSError):
        index = json.loads((folder / "model_index.json").read_text())
        for name in _DENOISERS:
            library, cls = index.get(name, (None, None))
            if library == "diffusers":
                import diffusers

                return getattr(diffusers, cls).from_pretrained(folder / name, local_files_only=True), False
        raise


def run(args: argparse.Namespace) -> int:
    from .inspection import inspect
    from .testing import PIPELINE_KINDS, tiny_pipeline

    target = args.target
    if target in PIPELINE_KINDS:
        pipe, runs = tiny_pipeline(target, seed=0), True
    else:
        folder = Path(target)
        if not (folder / "model_index.json").is_file():
            print(
                f"diffattn inspect: {target!r} is neither a tiny pipeline kind ({', '.join(PIPELINE_KINDS)}) nor a "
                "diffusers pipeline folder (with model_index.json)"
            )
            return 2
        pipe, runs = _load_folder(folder)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    report = inspect(pipe, run=(lambda: _step(pipe, args)) if runs else None)
    print(report)
    if not runs:
        print(f"\n(grids and text lengths are read at each call; {type(pipe).__name__} was inspected without a run)")
    return 0


def register(commands: argparse._SubParsersAction, whole_number: Any) -> None:
    parser = commands.add_parser(
        "inspect", help="list a model's attention modules: role, grid, text, and the methods that can act on each"
    )
    parser.add_argument("target", help="a tiny test pipeline (sd, sdxl, flux, wan, sd3) or a local diffusers folder")
    parser.add_argument("--height", type=whole_number(16, multiple_of=16, what="pixels"), default=64)
    parser.add_argument("--width", type=whole_number(16, multiple_of=16, what="pixels"), default=96)
    parser.add_argument("--frames", type=whole_number(1, what="video frames"), default=5)
    parser.set_defaults(run=run)
