"""``diffattn demo``: registered under the ``diffattn.commands`` entry points, so the library never imports the demo."""

from __future__ import annotations

import argparse

from diffattn.cli import require_extra

__all__ = ["register"]


def _demo(args: argparse.Namespace) -> int:
    """Serve the Gradio demo (its options: ``diffattn demo --help``)."""
    require_extra("demo", "gradio", "matplotlib", "tomesd")
    from .app import main

    return main(args.demo_args)


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``demo``; every argument after it goes to the demo's own parser (--port, --host, --image-model, ...)."""
    demo = commands.add_parser(
        "demo", help="the Gradio editing demo (options: diffattn demo --help)", add_help=False, prefix_chars="\0"
    )
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    demo.set_defaults(run=_demo)
