"""The Speed tab: ``diffattn compare`` for the chosen sparse methods and video size, run in the demo's process:
times and density against dense attention, a verdict on ShapesBench's bar for every row, the frames side by side
(each row labelled) and a speed plot drawn for the size it is shown at."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..images import enlarge, to_uint8
from ..inputs import DemoInputError, check_steps
from ..models import Models
from .common import (
    IMAGE_OUT,
    VIDEO_MODEL,
    Progress,
    about,
    gradio_progress,
    no_progress,
    steps_box,
    user_errors,
)

__all__ = [
    "SPEED_SIZES",
    "SPEED_MAX_STEPS",
    "SPEED_PROMPT",
    "PLOT_WIDTH",
    "PASS_COLOUR",
    "FAIL_COLOUR",
    "SpeedOutput",
    "run_speed",
    "verdict",
    "row_notes",
    "speed_table",
    "speed_plot",
    "frame_sheet",
    "build",
]

ABOUT = (
    "Sparse attention patterns on the video model, each run from the same noise as the stock dense attention: "
    "time, density and how far the frames moved."
)

# (frames, height, width) in pixels of the video model; the second (the tab's default) is `diffattn compare`'s size
SPEED_SIZES: dict[str, tuple[int, int, int]] = {
    "8 x 32 x 64 px (quick)": (8, 32, 64),
    "16 x 64 x 64 px (diffattn compare's size)": (16, 64, 64),
    "64 x 64 x 64 px (length extension, slow)": (64, 64, 64),
}
SPEED_MAX_STEPS = 10  # every step runs once per method; at 10 steps ShapesBench's score means something
SPEED_PROMPT = "a red circle on the left moving right"
#: The plot's width in pixels: the Speed tab's output column on a 1440 px wide window is about 770 px, so the plot is
#: shown at its own size (no shrinking) and its 10-point text stays legible.
PLOT_WIDTH = 720
PASS_COLOUR = (44, 160, 44)  # the plot's bar of a row that passes ShapesBench's bar
FAIL_COLOUR = (214, 39, 40)  # ... and of one that misses it
_STOCK = "dense (stock)"
_HOOKED_DENSE = "dense"
#: What the two dense rows are (every other row is a sparse method, explained by its settings).
DENSE_ROWS = {
    _STOCK: "diffusers' own attention processor, no diffattn: the reference for every time, speedup, PSNR and the "
    "shapes check.",
    _HOOKED_DENSE: "diffattn's Dense() through the same timing hook as the sparse methods: the reference for the "
    "attention speedup; its end-to-end speedup below 1x is what the hook costs, its frames are stock dense's.",
}


@dataclass(frozen=True)
class SpeedOutput:
    table: str  # markdown: the title, the table, the bar and a line per row
    frames: np.ndarray  # uint8: a labelled row per clip (first / middle / last frame)
    plot: np.ndarray  # uint8, PLOT_WIDTH px wide
    rows: list = field(default_factory=list)  # diffattn_bench.compare.CompareRow


def run_speed(
    models: Models,
    methods: Sequence[str],
    size: str,
    steps: Any,
    out_folder: Path,
    *,
    progress: Progress = no_progress,
) -> SpeedOutput:
    """Speed tab: ``diffattn compare`` for the chosen sparse methods at the chosen size, in this process: times and
    density against dense attention, the frames side by side and the speed plot; the table (``speed.md``) and the
    plot (``speed.png``) are also written to ``out_folder``."""
    import torch
    from PIL import Image

    from diffattn_kernels import cpu_block_sparse

    if size not in SPEED_SIZES:
        raise DemoInputError(f"size must be one of {', '.join(SPEED_SIZES)}, got {size!r}")
    steps = check_steps(
        steps, SPEED_MAX_STEPS, f"the speed comparison runs at most {SPEED_MAX_STEPS} steps: each runs every method"
    )
    frames, height, width = SPEED_SIZES[size]
    with models.video() as pipe:
        grid, rows, videos = _compare(pipe, methods, size, steps, progress)
    title = (
        f"{frames} frames x {height} x {width} px = {' x '.join(map(str, grid))} = {math.prod(grid)} tokens, "
        f"{steps} steps, {torch.get_num_threads()} threads, {cpu_block_sparse.cpu_model()}"
    )
    table = "\n".join(speed_table(title, rows, grid))
    plot = speed_plot(rows)
    sheet = frame_sheet(rows, videos, max(1, 2 * PLOT_WIDTH // 3 // (3 * width)))
    folder = Path(out_folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "speed.md").write_text(table + "\n")
    Image.fromarray(plot).save(folder / "speed.png")
    return SpeedOutput(table, sheet, plot, rows)


def _compare(
    pipe: Any, methods: Sequence[str], size: str, steps: int, progress: Progress
) -> tuple[tuple[int, int, int], list, dict]:
    """``(grid, rows, videos)``: the token grid of ``size`` and ``diffattn compare``'s rows and clips for dense
    attention and each chosen method (every one must be available at that grid and run)."""
    from diffattn_bench.compare import ClipSize, default_methods, run_video
    from diffattn_bench.peers import method_peer

    frames, height, width = SPEED_SIZES[size]
    grid = ClipSize(frames, height, width).grid(pipe.transformer.config.patch_size)
    available = default_methods(grid)
    chosen = [m for m in methods or []]
    unknown = [m for m in chosen if m not in available]
    if not chosen or unknown:
        raise DemoInputError(
            f"pick sparse methods among {', '.join(available)}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    progress(0.05, "comparing")
    import diffattn

    peers = [method_peer(_HOOKED_DENSE, diffattn.Dense()), *(method_peer(m, available[m]) for m in chosen)]
    rows, videos = run_video(
        pipe, ClipSize(frames, height, width), peers, prompts=[SPEED_PROMPT], steps=steps, desc="speed tab"
    )
    failed = [r for r in rows if r.error]
    if failed:
        raise DemoInputError(f"a method cannot run at {size}: " + "; ".join(f"{r.method}: {r.error}" for r in failed))
    return grid, rows, videos


def verdict(row: Any) -> str:
    """``"passes"`` or ``"fails: <first criterion missed>"`` on ShapesBench's video bar (``compare.failures``): the
    table, the plot's colour and its annotation all read this."""
    from diffattn_bench.compare import failures

    missed = failures(row)
    return "passes" if not missed else f"fails: {missed[0]}"


def _dense_here(row: Any) -> bool:
    """A sparse method whose measured density is 1 at this grid: its pattern covers every query-key pair."""
    return row.method not in DENSE_ROWS and math.isfinite(row.density) and row.density >= 1.0 - 1e-6


def row_notes(rows: Sequence[Any], grid: tuple[int, ...]) -> list[str]:
    """One markdown line per row: what it is (the two dense rows; a sparse method's settings), whether a sparse
    method is dense at this ``grid``, and every criterion of ShapesBench's bar it misses."""
    from diffattn_bench.compare import failures

    grid_text = " x ".join(map(str, grid))
    notes = []
    for r in rows:
        what = DENSE_ROWS.get(r.method) or f"{r.settings}."
        if _dense_here(r):
            what += (
                f" **Dense at this size**: its pattern covers all {grid_text} tokens (density {r.density:.3f}, "
                "measured); a larger size shows it sparse."
            )
        missed = failures(r)
        bar = "passes the bar." if not missed else "misses the bar: " + "; ".join(missed) + "."
        notes.append(f"- **{r.method}**: {what} ShapesBench: {bar}")
    return notes


def speed_table(title: str, rows: Sequence[Any], grid: tuple[int, ...]) -> list[str]:
    """The markdown lines of the comparison: the title, per row its measured density (the fraction of query-key
    pairs its attention computed at this size), times, speedups, PSNR, trajectory error and verdict, then the bar
    and a line per row (:func:`row_notes`)."""
    from diffattn_bench.compare import PASS_POSITIONS, PASS_TRAJECTORY_ERROR, SHAPE_FRAMES_TOLERANCE

    lines = [
        f"Measured now, one process: {title}.",
        "",
        "| method | density | time | attention speedup | speedup (end to end) | PSNR vs stock | trajectory error | "
        "ShapesBench |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        error = r.scores.get("mean_trajectory_error", math.nan)
        stock = r.method == _STOCK
        if stock or r.method == _HOOKED_DENSE:
            density = "1 (all pairs)"
        else:
            density = f"{r.density:.3f}" + (" (dense here)" if _dense_here(r) else "")
        attention = "" if stock else f"{r.attention_speedup:.2f}x"
        psnr = "" if stock else ("identical" if math.isinf(r.psnr) else f"{r.psnr:.1f}\u00a0dB")
        lines.append(
            f"| {r.method} | {density} | {r.seconds:.2f}\u00a0s | {attention} | **{r.speedup:.2f}x** | {psnr} | "
            f"{error:.3f} | {verdict(r).split(':')[0]} |"
        )
    bar = (
        "Density: the fraction of query-key pairs the attention computed, measured at this size. Speedup: stock "
        "dense attention's generation time over the row's. "
        f"ShapesBench's bar (green in the plot: passes; red: fails): trajectory error < {PASS_TRAJECTORY_ERROR:g}, "
        f"positions >= {PASS_POSITIONS:.0%}, every object found, object-frames of the right shape at most "
        f"{100 * SHAPE_FRAMES_TOLERANCE:.0f} points below stock dense's."
    )
    stock_row = next((r for r in rows if r.method == _STOCK), None)
    if stock_row is not None and verdict(stock_row) != "passes":
        bar += (
            " At this size stock dense attention misses it too, so no method can pass here: the bar is meant for "
            "diffattn compare's size, 16 x 64 x 64 px."
        )
    return [*lines, "", bar, "", *row_notes(rows, grid)]


def speed_plot(rows: Sequence[Any], width: int = PLOT_WIDTH) -> np.ndarray:
    """Each row's end-to-end speedup over stock dense attention as a bar, green when the row passes ShapesBench's
    bar and red when it fails it (:func:`verdict`, written beside the bar), as a uint8 image ``width`` px wide at
    100 dpi with 10-point text: drawn for the size it is shown at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    def colour(rgb: tuple[int, int, int]) -> tuple[float, ...]:
        return tuple(c / 255 for c in rgb)

    verdicts = [verdict(r) for r in rows]
    speedups = [r.speedup for r in rows]
    fig, ax = plt.subplots(figsize=(width / 100, 0.5 * len(rows) + 1.4), dpi=100)
    try:
        y = np.arange(len(rows))
        ax.barh(
            y,
            speedups,
            0.6,
            color=[colour(PASS_COLOUR if v == "passes" else FAIL_COLOUR) for v in verdicts],
            antialiased=False,
        )
        for i, (speedup, text) in enumerate(zip(speedups, verdicts)):
            ax.text(speedup, i, f" {speedup:.2f}x, {text}", va="center", fontsize=9, bbox={"color": "white", "pad": 1})
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_xlim(0, max(max(speedups), 1.0) * 2.4)  # room for the verdicts beside the bars
        ax.set_yticks(y, [r.method for r in rows], fontsize=10)
        ax.invert_yaxis()
        ax.tick_params(axis="x", labelsize=9)
        ax.set_xlabel("end-to-end speedup over stock dense attention (x; grey line: 1x)", fontsize=10)
        keys = [("passes", PASS_COLOUR, "passes ShapesBench's bar"), ("fails", FAIL_COLOUR, "fails ShapesBench's bar")]
        ax.legend(  # only the colours drawn: no colour on the page that no bar has
            handles=[
                Patch(color=colour(rgb), label=label)
                for word, rgb, label in keys
                if any(v.startswith(word) for v in verdicts)
            ],
            fontsize=9,
            loc="lower left",
            bbox_to_anchor=(0.0, 1.0),
            ncol=2,
            frameon=False,
        )
        fig.tight_layout()
        fig.canvas.draw()
        image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    finally:
        plt.close(fig)
    return image


def frame_sheet(rows: Sequence[Any], videos: dict[str, np.ndarray], factor: int) -> np.ndarray:
    """One row per clip in the order of ``rows`` (first / middle / last frame, each pixel a ``factor`` x ``factor``
    block), the row's method written on its left and the frames named above them (uint8)."""
    from PIL import Image, ImageDraw, ImageFont

    labels = [r.method for r in rows if r.method in videos]
    if not labels:
        raise ValueError("frame_sheet needs the clip of at least one row")
    strips = []
    for label in labels:
        clip = to_uint8(videos[label])
        strips.append(enlarge(np.concatenate([clip[0], clip[len(clip) // 2], clip[-1]], axis=1), factor))
    font = ImageFont.load_default(size=14)
    gap, header = 4, 22
    label_width = 12 + max(int(math.ceil(font.getlength(label))) for label in labels)
    strip_h, strip_w = strips[0].shape[:2]
    sheet = Image.new("RGB", (label_width + strip_w, header + len(strips) * (strip_h + gap) - gap), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(("first frame", "middle frame", "last frame")):
        draw.text((label_width + (c + 0.5) * strip_w / 3, header / 2), name, fill=(0, 0, 0), font=font, anchor="mm")
    for i, (label, strip) in enumerate(zip(labels, strips)):
        top = header + i * (strip_h + gap)
        sheet.paste(Image.fromarray(strip), (label_width, top))
        draw.text((label_width - 6, top + strip_h / 2), label, fill=(0, 0, 0), font=font, anchor="rm")
    return np.asarray(sheet)


# ----------------------------------------------------------------------------------------------------------------
# Gradio
# ----------------------------------------------------------------------------------------------------------------
def build(models: Models, temp: Path) -> None:
    """The Speed tab's components and its button, inside the app's ``gr.Blocks``; results are written under
    ``temp``."""
    import gradio as gr

    with gr.Tab("Speed", id="speed"):
        about(
            "speed-about", ABOUT, f'Every clip\'s prompt: "{SPEED_PROMPT}" (the video model reads the shapes grammar).'
        )
        with gr.Row():
            inputs, run = _input_column()
            outputs = _output_column()
        speed_folder = temp / "speed"  # a fixed folder of the demo's own: no input names a path
        run.click(
            _on_speed(models, speed_folder),
            inputs,
            outputs,
            api_name="speed",
            concurrency_limit=1,
            concurrency_id=VIDEO_MODEL,
        )


def _input_column() -> tuple[list[Any], Any]:
    """The inputs, in the order of :func:`_on_speed`'s parameters, and the Compare button."""
    import gradio as gr

    from diffattn_bench.method_names import METHOD_NAMES

    speed_methods = list(METHOD_NAMES)
    with gr.Column(scale=1):
        s_methods = gr.CheckboxGroup(
            speed_methods,
            value=["sliding tile", "radial"],
            label="Sparse methods (against dense attention)",
            elem_id="speed-methods",
        )
        s_size = gr.Dropdown(
            list(SPEED_SIZES),
            value=list(SPEED_SIZES)[0],  # the quick size: a first run within seconds
            label="Video size (frames x height x width)",
            elem_id="speed-size",
        )
        s_steps = steps_box("speed-steps", SPEED_MAX_STEPS, SPEED_MAX_STEPS)
        gr.Markdown("Fewer steps run faster, but the clips are unfinished.", elem_id="speed-steps-note")
        s_run = gr.Button("Compare", variant="primary", elem_id="speed-run")
        quick, compare_size = list(SPEED_SIZES)[:2]
        gr.Examples(
            [
                [["sliding tile", "radial"], quick],
                [["dynamic top-k", "pyramid (PSA)", "re-ttention"], quick],
                [["sliding tile", "dynamic top-k", "ToDo 2x"], compare_size],
            ],
            [s_methods, s_size],
            label="Examples (click one to fill the methods and size, then Compare)",
            elem_id="speed-examples",
        )
    return [s_methods, s_size, s_steps], s_run


def _output_column() -> list[Any]:
    """The table, the plot and the frames."""
    import gradio as gr

    with gr.Column(scale=2):
        s_table = gr.Markdown(elem_id="speed-table")
        s_plot = gr.Image(label="Speed", elem_id="speed-plot", **IMAGE_OUT)
        s_frames = gr.Image(label="Frames", elem_id="speed-frames", **IMAGE_OUT)
    return [s_table, s_plot, s_frames]


def _on_speed(models: Models, speed_folder: Path) -> Callable[..., tuple]:
    """The Compare button's handler: :func:`run_speed` on the page's values, writing into ``speed_folder``."""
    import gradio as gr

    def on_speed(methods: list, size: str, steps: Any, progress: Any = gr.Progress(track_tqdm=True)) -> tuple:
        with user_errors():
            out = run_speed(models, methods, size, steps, speed_folder, progress=gradio_progress(progress))
        return out.table, out.plot, out.frames

    return on_speed
