"""Graph breaks of a compiled tiny Wan (2 blocks) with and without diffattn methods (torch._dynamo.explain).

python scripts/graph_breaks.py
"""

from __future__ import annotations

import torch

import diffattn
from diffattn.testing import tiny_inputs, tiny_model


def breaks(method: diffattn.AttentionMethod | None) -> int:
    torch._dynamo.reset()
    model = tiny_model("wan")
    inputs = tiny_inputs("wan", (2, 4, 4), batch=1, text_len=3)
    handle = None if method is None else diffattn.apply(model, method)
    try:
        with torch.no_grad():
            return torch._dynamo.explain(model)(**inputs).graph_break_count
    finally:
        if handle is not None:
            handle.remove()


def main() -> None:
    blocks = len(tiny_model("wan").blocks)
    print(f"tiny Wan, {blocks} blocks; graph breaks under torch.compile:")
    for label, method in (
        ("stock", None),
        ("Dense()", diffattn.Dense()),
        ("SlidingTileAttention", diffattn.SlidingTileAttention(tile=(1, 2, 2), window=(1, 1, 1))),
    ):
        print(f"  {label:22s} {breaks(method)}")


if __name__ == "__main__":
    main()
