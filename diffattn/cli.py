"""The ``diffattn`` command: ``example`` and ``inspect`` here; ``compare`` (the bench) and ``demo`` come from the
packages that register them under the ``diffattn.commands`` entry points, so the library never imports the layers
above it."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from importlib.metadata import entry_points

from .errors import DiffattnError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = ["COMMANDS", "MissingExtraError", "main", "require_extra", "whole_number"]

COMMANDS = "diffattn.commands"  # entry-point group: name -> ``register(subparsers)``
EXTRAS = {"compare": "bench", "demo": "demo"}  # the extra that brings each command that is not the library's own


class MissingExtraError(DiffattnError):
    """A command needs packages of an extra that is not installed."""


def require_extra(extra: str, *modules: str) -> None:
    """Raise :class:`MissingExtraError` naming ``extra`` when any of ``modules`` cannot be imported."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(
            f"this command needs the {extra!r} extra ({', '.join(missing)} not installed): "
            f"pip install './kernels' '.[{extra}]' from a clone of the repository (scripts/bootstrap.sh installs "
            "every extra)"
        )


def whole_number(minimum: int = 1, *, multiple_of: int = 1, what: str = ""):
    """An argparse ``type``: the argument as an int >= ``minimum`` (and a multiple of ``multiple_of``), else an
    error that says what is allowed, e.g. ``argument --steps: expected a whole number >= 1, got '0'``."""
    allowed = f"a multiple of {multiple_of} >= {minimum}" if multiple_of > 1 else f"a whole number >= {minimum}"
    allowed += f" ({what})" if what else ""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or value % multiple_of:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    parse.__name__ = "whole_number"
    return parse


def _example(args: argparse.Namespace) -> int:
    """Apply Dense and a local Masked method to a tiny Flux pipeline and report what changed."""
    import numpy as np
    import torch

    import diffattn

    from .testing import tiny_pipeline

    pipe = tiny_pipeline("flux", seed=0)
    pipe.set_progress_bar_config(desc="denoising", leave=False)

    def generate() -> np.ndarray:
        out = pipe(
            "a red circle on the left",
            num_inference_steps=args.steps,
            height=args.size,
            width=args.size,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        )
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
        rows.append(
            (
                label,
                float(np.abs(image - stock).max()),
                f"{len({s for s, _ in acted})} steps x {len({l for _, l in acted})} layers",
            )
        )

    print(f"tiny FluxPipeline, {args.size}x{args.size} px, {args.steps} steps (random weights)")
    print(f"{'method':32s} {'max |diff| vs stock':>20s}  acted on")
    for label, diff, acted in rows:
        print(f"{label:32s} {diff:20.3g}  {acted}")
    return 0


def _missing(extra: str, reason: str):
    def run(args: argparse.Namespace) -> int:
        print(
            f"diffattn {args.command}: needs the {extra!r} extra ({reason}): pip install './kernels' '.[{extra}]' "
            "from a clone of the repository",
            file=sys.stderr,
        )
        return 2

    return run


def _register_plugins(commands: argparse._SubParsersAction) -> None:
    """The commands of the bench and the demo, or a stand-in that says which extra brings a missing one."""
    found = set()
    for point in entry_points(group=COMMANDS):
        try:
            point.load()(commands)
        except ImportError as error:
            extra = EXTRAS.get(point.name, point.name)
            commands.add_parser(point.name, add_help=False).set_defaults(run=_missing(extra, str(error)))
        found.add(point.name)
    for name, extra in EXTRAS.items():
        if name not in found:
            commands.add_parser(name, add_help=False, help=f"(needs the {extra!r} extra)").set_defaults(
                run=_missing(extra, "not installed")
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffattn", description="Attention methods for diffusers models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what diffattn installs")
    commands = parser.add_subparsers(dest="command")
    example = commands.add_parser("example", help="apply methods to a tiny pipeline and show what changed")
    example.add_argument(
        "--steps",
        type=whole_number(2, what="the row with a 50% dense warm-up needs two"),
        default=4,
        help="denoising steps (at least 2; default 4)",
    )
    example.add_argument(
        "--size",
        type=whole_number(16, multiple_of=16, what="pixels"),
        default=64,
        help="image size in pixels (a multiple of 16; default 64)",
    )
    example.set_defaults(run=_example)
    from .inspect_command import register as register_inspect

    register_inspect(commands, whole_number)
    _register_plugins(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except MissingExtraError as error:
        print(f"diffattn {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
