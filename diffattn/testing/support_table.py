"""The README's "Supported models" tables, generated from the code: every zoo case is built tiny and inspected with
one forward (:func:`diffattn.inspect`), so the roles, grids and methods listed are what the runtime reads; every
refused class is listed with the reason its adapter module gives.

``python -m diffattn.testing.support_table`` prints the tables; ``--write README.md`` replaces the block between the
README's markers. ``tests/models/test_support_table.py`` keeps the README in sync.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from pathlib import Path

import torch

from ..adapters import adapter_for, refused_models
from ..inspection import LayerReport, inspect
from .zoo import ZooCase, zoo_cases

__all__ = ["support_table", "refusal_table", "readme_block", "START", "END"]

START = "<!-- supported-models:start (generated: python -m diffattn.testing.support_table --write README.md) -->"
END = "<!-- supported-models:end -->"

#: Method groups shown per model: a group is listed when one of its methods acts on some layer of the model.
GROUPS = {
    "sparse": ("SlidingWindowAttention", "SlidingTileAttention", "DynamicSparseAttention", "PyramidSparseAttention"),
    "radial": ("RadialAttention",),
    "guidance": ("PAG", "SEG"),
    "prompt-to-prompt": ("PromptToPrompt",),
    "MasaCtrl": ("MutualSelfAttention",),
}


def _layers(case: ZooCase) -> tuple[LayerReport, ...]:
    model = case.build()
    inputs = case.inputs()
    report = inspect(model, run=lambda: model(**inputs)).models[0]
    return report.layers


def _roles(layers: tuple[LayerReport, ...]) -> str:
    parts = []
    for role in ("self", "cross", "joint"):
        chosen = [layer for layer in layers if layer.role == role]
        if chosen:
            side = ""
            if role == "joint":
                side = " (text first)" if chosen[0].text_first else " (text last)"
            parts.append(role + side)
    if any(layer.role is None for layer in layers):
        parts.append("some left alone")
    return ", ".join(parts)


def _groups(layers: tuple[LayerReport, ...]) -> str:
    acting = {name for layer in layers for name in layer.methods}
    if not any(layer.role in ("cross", "joint") for layer in layers):
        acting -= {"PromptToPrompt"}  # no text to take maps of
    return ", ".join(group for group, names in GROUPS.items() if acting & set(names)) or "-"


def _grid_kind(layers: tuple[LayerReport, ...]) -> str:
    dims = {len(layer.grid) for layer in layers if layer.grid}
    return "/".join({3: "video", 2: "image", 1: "sequence"}[d] for d in sorted(dims, reverse=True)) or "-"


def support_table() -> str:
    """One row per supported model class (its first zoo case)."""
    rows = [
        "| model class | family | attention roles | grid | grid from | methods that act |",
        "|---|---|---|---|---|---|",
    ]
    seen: set[str] = set()
    with torch.no_grad():
        for case in zoo_cases():
            if case.model_class in seen:
                continue
            seen.add(case.model_class)
            layers = _layers(case)
            adapter = adapter_for(case.build())
            rows.append(
                f"| `{case.model_class}` | {adapter.family} | {_roles(layers)} | {_grid_kind(layers)} | "
                f"{adapter.grid_source} | {_groups(layers)} |"
            )
    return "\n".join(rows)


def refusal_table() -> str:
    rows = ["| model class | why diffattn refuses it |", "|---|---|"]
    rows += [f"| `{name}` | {reason.replace('|', '/')} |" for name, reason in refused_models().items()]
    return "\n".join(rows)


def readme_block() -> str:
    supported = len({case.model_class for case in zoo_cases()})
    intro = (
        f"{supported} model classes, each tested on a tiny instance (`tests/models/test_zoo.py`): `Dense` is "
        "bitwise the stock output, a masked method acts and `remove()` restores the stock output, the grid is the "
        'hand-counted one. Layers "left alone" (refiners, audio streams, modules whose tokens are not the '
        "grid) run stock."
    )
    refused = (
        f"Refused ({len(refused_models())} classes): `diffattn.apply` raises `UnsupportedModelError` with the reason."
    )
    return "\n".join(
        [
            START,
            textwrap.fill(intro, 120),
            "",
            support_table(),
            "",
            textwrap.fill(refused, 120),
            "",
            refusal_table(),
            END,
        ]
    )


def replace_block(text: str, block: str) -> str:
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"the README has no {START!r} ... {END!r} block")
    return pattern.sub(lambda _: block, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="the README whose block to replace")
    args = parser.parse_args(argv)
    block = readme_block()
    if args.write is None:
        print(block)
        return 0
    args.write.write_text(replace_block(args.write.read_text(), block))
    return 0


if __name__ == "__main__":
    sys.exit(main())
