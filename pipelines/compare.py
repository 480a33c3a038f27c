"""``diffattn compare``: dense attention and each sparse method side by side, in one process, on the embedded
video model (random weights when it is not trained yet) at 16k+ tokens.

For every method it measures the end-to-end generation time, the time spent in attention cores, the speedup over
stock dense attention, the Amdahl bound that the model allows for that attention speedup, and PSNR / SSIM of the
output against the dense output for the same seed; it prints a table and saves a plot.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import diffattn
from diffattn.evaluation import psnr, ssim
from diffattn.kernels import cpu_block_sparse

__all__ = ["Timed", "default_methods", "run_compare", "CompareRow"]


@dataclass(frozen=True)
class Timed(diffattn.AttentionMethod):
    """Runs ``inner`` and records the wall time of every attention core it computes."""

    inner: diffattn.AttentionMethod
    seconds: list = field(default_factory=list, compare=False)

    @property
    def roles(self) -> frozenset[str]:  # type: ignore[override]
        return self.inner.roles

    @property
    def name(self) -> str:
        return self.inner.name

    def __call__(self, q, k, v, ctx):
        start = time.perf_counter()
        out = self.inner(q, k, v, ctx)
        self.seconds.append(time.perf_counter() - start)
        return out


def default_methods(grid: tuple[int, ...]) -> dict[str, diffattn.AttentionMethod]:
    """Methods at roughly 10% density on a ``(frames, h, w)`` token grid (radial is as dense as its rule makes it).

    Tiles are 4 frames x 8 x 8 tokens (256 tokens, the kernel's block): sliding tile keeps two tiles in time, one
    band of 8 rows and the whole width (one contiguous run of key blocks per query tile); the dynamic methods select
    among the same tiles. Re-ttention's density counts its calibration steps (dense + sparse), so it only pays off
    over more steps than the compare default.
    """
    from diffattn.methods.dynamic import DynamicSparseAttention, PyramidSparseAttention, Rettention, TokenDownsampling

    tile = (4, 8, 8)
    return {
        "sliding tile": diffattn.SlidingTileAttention(tile=tile, window=(2, 1, 4)),
        "radial": diffattn.RadialAttention(decay=0.2),
        "sliding window": diffattn.SlidingWindowAttention(window=tuple(min(w, n) for w, n in zip((5, 9, 9), grid))),
        "dynamic top-k": DynamicSparseAttention(topk=0.125, tile=tile),
        "pyramid (PSA)": PyramidSparseAttention(bands=(0.06, 0.08, 0.12, 0.2), tile=tile),  # 6+2/2+4/4+8/8 = 9 %
        "re-ttention": Rettention(base=DynamicSparseAttention(topk=0.125, tile=tile), calibrate_every=5),
        "ToDo 3x": TokenDownsampling(factor=3),  # keys and values on a 3x coarser grid per frame: 1/9
    }


@dataclass
class CompareRow:
    method: str
    seconds: float
    attention_seconds: float
    density: float
    selection_seconds: float = 0.0
    speedup: float = 1.0
    attention_speedup: float = 1.0
    amdahl_bound: float = 1.0
    ideal_bound: float = 1.0
    psnr: float = math.inf
    ssim: float = 1.0

    @property
    def reach(self) -> float:
        return self.speedup / self.amdahl_bound


def _generate(pipe: Any, prompt: str, frames: int, height: int, width: int, steps: int, seed: int) -> np.ndarray:
    out = pipe(prompt, num_frames=frames, height=height, width=width, num_inference_steps=steps,
               generator=torch.Generator().manual_seed(seed), output_type="np")
    return np.asarray(out.frames[0])


def run_compare(
    pipe: Any,
    *,
    frames: int = 32,
    height: int = 64,
    width: int = 128,
    steps: int = 2,
    prompt: str = "a red circle on the left moving right",
    methods: dict[str, diffattn.AttentionMethod] | None = None,
    seed: int = 0,
) -> tuple[list[CompareRow], dict[str, np.ndarray]]:
    patch = pipe.transformer.config.patch_size
    grid = (frames // patch[0], height // patch[1], width // patch[2])
    methods = methods if methods is not None else default_methods(grid)
    videos: dict[str, np.ndarray] = {}
    runs = [("dense (stock)", None), ("dense", diffattn.Dense()), *methods.items()]
    rows: list[CompareRow] = []
    # One untimed step first: the first generation would otherwise pay one-time costs (GEMM kernel creation,
    # allocator growth, loading the compiled attention loop) inside the stock dense time every ratio divides.
    cpu_block_sparse.extension()
    _generate(pipe, prompt, frames, height, width, 1, seed)
    for label, method in tqdm(runs, desc=f"compare at {math.prod(grid)} tokens", unit="run"):
        timed = None if method is None else Timed(method)
        handle = None if timed is None else diffattn.apply(pipe, timed, steps=None)
        try:
            start = time.perf_counter()
            videos[label] = _generate(pipe, prompt, frames, height, width, steps, seed)
            elapsed = time.perf_counter() - start
            metrics = {} if handle is None else handle.metrics()
            acted = {} if handle is None else handle.acted_calls()
        finally:
            if handle is not None:
                handle.remove()
        densities = [m["density"] for m in metrics.values() if "density" in m]
        selection = sum(m.get("selection_seconds", 0.0) * acted.get(layer, 0) for layer, m in metrics.items())
        rows.append(CompareRow(label, elapsed, sum(timed.seconds) if timed else math.nan,
                               sum(densities) / len(densities) if densities else 1.0, selection))
    stock, dense = rows[0], rows[1]
    attention_share = min(dense.attention_seconds / dense.seconds, 1.0)
    for row in rows[1:]:
        row.speedup = stock.seconds / row.seconds
        row.attention_speedup = dense.attention_seconds / row.attention_seconds
        row.amdahl_bound = 1.0 / ((1 - attention_share) + attention_share / row.attention_speedup)
        row.ideal_bound = 1.0 / ((1 - attention_share) + attention_share * row.density)
        row.psnr = psnr(videos[row.method], videos["dense (stock)"], data_range=1.0)
        row.ssim = float(np.mean([ssim(a, b, data_range=1.0) for a, b in zip(videos[row.method], videos["dense (stock)"])]))
    return rows, videos


def format_rows(rows: list[CompareRow]) -> str:
    header = (f"{'method':16s} {'density':>7s} {'total s':>8s} {'attn s':>8s} {'select s':>8s} {'attn x':>7s} {'e2e x':>6s} "
              f"{'Amdahl':>7s} {'reach':>6s} {'ideal':>6s} {'PSNR dB':>8s} {'SSIM':>6s}")
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.method == "dense (stock)":
            lines.append(f"{r.method:16s} {1.0:7.3f} {r.seconds:8.2f} {'':>8s} {'':>7s} {1.0:6.2f}")
            continue
        lines.append(
            f"{r.method:16s} {r.density:7.3f} {r.seconds:8.2f} {r.attention_seconds:8.2f} {r.selection_seconds:8.2f} "
            f"{r.attention_speedup:7.2f} "
            f"{r.speedup:6.2f} {r.amdahl_bound:7.2f} {r.reach:6.0%} {r.ideal_bound:6.2f} {r.psnr:8.1f} {r.ssim:6.3f}"
        )
    return "\n".join(lines)


def save_outputs(rows: list[CompareRow], videos: dict[str, np.ndarray], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps([r.__dict__ | {"reach": r.reach} for r in rows], indent=1, default=float))
    methods = [r for r in rows if r.method not in ("dense (stock)", "dense")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    x = np.arange(len(methods))
    axes[0].bar(x - 0.2, [r.speedup for r in methods], 0.4, label="end-to-end speedup (measured)")
    axes[0].bar(x + 0.2, [r.amdahl_bound for r in methods], 0.4, label="Amdahl bound (measured attention speedup)",
                alpha=0.6)
    axes[0].scatter(x, [r.ideal_bound for r in methods], marker="_", s=400, color="black",
                    label="bound if attention cost were proportional to density", zorder=3)
    for i, r in enumerate(methods):
        axes[0].text(i, max(r.speedup, r.amdahl_bound) * 1.02, f"attn {r.attention_speedup:.1f}x\nPSNR {r.psnr:.0f} dB",
                     ha="center", va="bottom", fontsize=8)
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set_xticks(x, [f"{r.method}\n(density {r.density:.2f})" for r in methods], fontsize=7, rotation=25,
                       ha="right")
    axes[0].set_ylabel("x faster than dense")
    axes[0].set_title(title, fontsize=9)
    axes[0].legend(fontsize=8, loc="upper right")
    axes[0].set_ylim(0, max(max(r.amdahl_bound, r.ideal_bound) for r in methods) * 1.35)
    # First, middle and last frame of each output, dense first.
    labels = ["dense (stock)", *[r.method for r in methods]]
    strips = []
    for label in labels:
        clip = videos[label]
        picks = [clip[0], clip[len(clip) // 2], clip[-1]]
        strips.append(np.concatenate(picks, axis=1))
    axes[1].imshow(np.concatenate(strips, axis=0).clip(0, 1), interpolation="nearest")
    axes[1].set_yticks([(i + 0.5) * videos[labels[0]].shape[1] for i in range(len(labels))], labels, fontsize=8)
    axes[1].set_xticks([])
    axes[1].set_title("first / middle / last frame", fontsize=9)
    fig.tight_layout()
    png = out / "compare.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return [png, out / "compare.json"]
