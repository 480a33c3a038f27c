"""The sweep behind ``default_methods`` in ``pipelines/diffattn_bench/compare.py``: candidate settings of each sparse
method on the embedded video model at the compare's quality size, speed and ShapesBench quality from one run (as
``diffattn compare``). ``python scripts/sweep_compare_methods.py`` (about 4 min on 2 cores; ``--only top-k psa`` for a
subset).
"""

from __future__ import annotations

import argparse
import sys

import torch

import diffattn
from diffattn.methods.downsampling import TokenDownsampling
from diffattn.methods.dynamic_sparse import DynamicSparseAttention
from diffattn.methods.pyramid import PyramidSparseAttention
from diffattn_bench import embedded
from diffattn_bench.compare import QUALITY_SIZE, ClipSize, format_markdown, run_video
from diffattn_bench.peers import method_peer
from diffattn_bench.scoring import shapes_prompts


def candidates() -> dict[str, diffattn.AttentionMethod]:
    """Each method at the settings tried (tiles in tokens of the 16 x 16 x 16 grid, windows in tiles)."""
    tile = diffattn.SlidingTileAttention
    return {
        "dense": diffattn.Dense(),
        "sliding tile 4x8x8 w2x1x4": tile(tile=(4, 8, 8), window=(2, 1, 4)),
        "sliding tile 4x8x8 w3x1x4": tile(tile=(4, 8, 8), window=(3, 1, 4)),
        "sliding tile 4x8x8 w2x2x4": tile(tile=(4, 8, 8), window=(2, 2, 4)),
        "sliding tile 4x8x8 w3x2x4": tile(tile=(4, 8, 8), window=(3, 2, 4)),
        "sliding tile 4x4x4 w3x3x3": tile(tile=(4, 4, 4), window=(3, 3, 3)),
        "sliding tile 2x8x8 w3x1x2": tile(tile=(2, 8, 8), window=(3, 1, 2)),
        "top-k 0.125 4x4x4": DynamicSparseAttention(topk=0.125, tile=(4, 4, 4)),
        "top-k 0.125 4x8x8": DynamicSparseAttention(topk=0.125, tile=(4, 8, 8)),
        "top-k 0.2 4x4x4": DynamicSparseAttention(topk=0.2, tile=(4, 4, 4)),
        "top-k 0.25 4x8x8": DynamicSparseAttention(topk=0.25, tile=(4, 8, 8)),
        "psa (0.06, 0.08, 0.12, 0.2)": PyramidSparseAttention(bands=(0.06, 0.08, 0.12, 0.2), tile=(4, 8, 8)),
        "psa (0.08, 0.12, 0.2, 0.35)": PyramidSparseAttention(bands=(0.08, 0.12, 0.2, 0.35), tile=(4, 8, 8)),
        "psa (0.1, 0.15, 0.25, 0.5)": PyramidSparseAttention(bands=(0.1, 0.15, 0.25, 0.5), tile=(4, 8, 8)),
        "ToDo 2x": TokenDownsampling(factor=2),
        "ToDo 3x": TokenDownsampling(factor=3),
        "sliding window 7x11x11": diffattn.SlidingWindowAttention(window=(7, 11, 11)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=None, help="keep candidates whose name contains one of these")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--size",
        type=int,
        nargs=3,
        default=None,
        metavar=("FRAMES", "HEIGHT", "WIDTH"),
        help="pixels (default: the compare's quality size); the tiles above assume 16 x 16 x 16 tokens",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    chosen = candidates()
    if args.only:
        chosen = {k: v for k, v in chosen.items() if any(word in k for word in args.only)}
        if not chosen:
            parser.error(f"--only {' '.join(args.only)} matches none of: {', '.join(candidates())}")
    pipe = embedded.load_video_pipeline(None)
    pipe.set_progress_bar_config(disable=True)
    size = ClipSize(*args.size) if args.size else QUALITY_SIZE
    rows, _ = run_video(
        pipe,
        size,
        [method_peer(k, v) for k, v in chosen.items()],
        prompts=shapes_prompts("video", args.prompts),
        steps=args.steps,
        desc="sweep",
    )
    print(format_markdown(rows, "video"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
