"""Side-by-side samples and ShapesBench scores of PAG / SEG scales, from `scripts/eval_shapes.py` output folders.

    for m in "none 0" "pag 1.5" "pag 3" "pag 5" "seg 1.5" "seg 3" "seg 5"; do set -- $m
      python scripts/eval_shapes.py image --prompts 60 --steps 20 $( [ $1 = none ] || echo --$1 $2 ) \
          --out outputs/eval-guidance/$1-$2; done
    python scripts/guidance_grid.py outputs/eval-guidance --out docs/images/guidance_grid.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

SETTINGS = ["none-0", "pag-1.5", "pag-3", "pag-5", "seg-1.5", "seg-3", "seg-5"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--rows", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("docs/images/guidance_grid.png"))
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompts = json.loads((args.folder / SETTINGS[0] / "prompts.json").read_text())
    names = sorted(prompts)[: args.rows]
    fig, axes = plt.subplots(args.rows, len(SETTINGS), figsize=(len(SETTINGS) * 1.3, args.rows * 1.45))
    for c, setting in enumerate(SETTINGS):
        scores = json.loads((args.folder / setting / "scores.json").read_text())
        label = (
            "no guidance"
            if setting == "none-0"
            else setting.replace("-", " ").upper().replace("PAG", "PAG s=").replace("SEG", "SEG s=")
        )
        axes[0, c].set_title(f"{label}\ncol+pos {scores['colour_position_single']:.0%}", fontsize=7)
        for r, name in enumerate(names):
            axes[r, c].imshow(np.asarray(Image.open(args.folder / setting / name)), interpolation="nearest")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if c == 0:
                axes[r, c].set_ylabel(
                    prompts[name]
                    .replace(" and ", "\n& ")
                    .replace(" at the ", "\n")
                    .replace(" on the ", "\n")
                    .replace(" in the ", "\n"),
                    fontsize=5,
                    rotation=0,
                    ha="right",
                    va="center",
                )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
