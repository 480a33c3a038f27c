"""Graphs and graph breaks of a compiled tiny Wan (2 blocks) with and without diffattn methods
(``torch._dynamo.explain``), and whether ``torch.compile(..., fullgraph=True)`` compiles it.

python scripts/graph_breaks.py
"""

from __future__ import annotations

import torch

import diffattn
from diffattn.testing import tiny_inputs, tiny_model


def _apply(model: torch.nn.Module, method: diffattn.AttentionMethod | None) -> diffattn.Handle | None:
    if method is None:
        return None
    if isinstance(method, diffattn.PAG):
        return diffattn.guidance.enable(model, method)
    return diffattn.apply(model, method)


def measure(method: diffattn.AttentionMethod | None) -> tuple[int, int, str]:
    """(graphs, graph breaks, fullgraph=True outcome) of the tiny Wan with ``method``."""
    torch._dynamo.reset()
    model = tiny_model("wan")
    inputs = tiny_inputs("wan", (2, 4, 4), batch=1, text_len=3)
    handle = _apply(model, method)
    try:
        with torch.no_grad(), diffattn.denoising_step(0, 1, batch_roles=("cond",)):
            explained = torch._dynamo.explain(model)(**inputs)
            torch._dynamo.reset()
            try:
                torch.compile(model, fullgraph=True)(**inputs)
                fullgraph = "compiles"
            except torch._dynamo.exc.Unsupported as error:
                fullgraph = "refused: " + str(error).split("reason: ")[-1].split("\n")[0].removesuffix(")")
        return explained.graph_count, explained.graph_break_count, fullgraph
    finally:
        if handle is not None:
            handle.remove()
        torch._dynamo.reset()


def main() -> None:
    blocks = len(tiny_model("wan").blocks)
    print(f"tiny Wan, {blocks} blocks, under torch.compile: graphs, graph breaks, fullgraph=True")
    for label, method in (
        ("stock", None),
        ("Dense()", diffattn.Dense()),
        ("SlidingTileAttention", diffattn.SlidingTileAttention(tile=(1, 2, 2), window=(1, 1, 1))),
        ("PAG (guidance)", diffattn.PAG(scale=3.0)),
    ):
        graphs, graph_breaks, fullgraph = measure(method)
        print(f"  {label:22s} {graphs} graph(s), {graph_breaks} break(s); fullgraph=True {fullgraph}")


if __name__ == "__main__":
    main()
