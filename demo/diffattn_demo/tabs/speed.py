"""The Speed tab: ``diffattn compare`` for the chosen sparse methods and video size, run in the demo's process:
times and density against dense attention, the frames side by side and the speed plot."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..images import display_factor, enlarge, to_uint8
from ..inputs import DemoInputError, check_steps
from ..models import Models
from .common import IMAGE_OUT, VIDEO_MODEL, Progress, about, gradio_progress, no_progress, user_errors

__all__ = ["SPEED_SIZES", "SPEED_MAX_STEPS", "SPEED_PROMPT", "SpeedOutput", "run_speed", "build"]

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


@dataclass(frozen=True)
class SpeedOutput:
    table: str  # markdown
    frames: np.ndarray  # rows: dense (stock), then each method; first / middle / last frame
    plot: np.ndarray  # the compare plot (uint8)
    rows: list = field(default_factory=list)  # diffattn_bench.compare.CompareRow


SPEED_PROMPT = "a red circle on the left moving right"


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
    density against dense attention, the frames side by side and the speed plot."""
    import torch
    from PIL import Image

    from diffattn_bench.compare import save_outputs
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
        f"{frames} frames x {height}x{width} px = {int(np.prod(grid))} tokens, {steps} steps, "
        f"{torch.get_num_threads()} threads, {cpu_block_sparse.cpu_model()}"
    )
    png = save_outputs({"video": (rows, videos)}, Path(out_folder), title, {"title": title})[1]
    plot = np.asarray(Image.open(png).convert("RGB"))
    lines = _table(title, rows)
    sheet, labels = _frame_sheet(rows, videos)
    factor = display_factor(sheet.shape[:2], 512)
    lines += ["", "Frames (first / middle / last), top to bottom: " + ", ".join(labels) + "."]
    return SpeedOutput("\n".join(lines), enlarge(sheet, factor), plot, rows)


def _compare(
    pipe: Any, methods: Sequence[str], size: str, steps: int, progress: Progress
) -> tuple[tuple[int, int, int], list, dict]:
    """``(grid, rows, videos)``: the token grid of ``size`` and ``diffattn compare``'s rows and clips for dense
    attention and each chosen method (every one must be available at that grid and run)."""
    from diffattn_bench.compare import ClipSize, default_methods, run_video
    from diffattn_bench.peers import method_peer

    frames, height, width = SPEED_SIZES[size]
    patch = pipe.transformer.config.patch_size
    grid = (frames // patch[0], height // patch[1], width // patch[2])
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

    peers = [method_peer("dense", diffattn.Dense()), *(method_peer(m, available[m]) for m in chosen)]
    rows, videos = run_video(
        pipe, ClipSize(frames, height, width), peers, prompts=[SPEED_PROMPT], steps=steps, desc="speed tab"
    )
    failed = [r for r in rows if r.error]
    if failed:
        raise DemoInputError(f"a method cannot run at {size}: " + "; ".join(f"{r.method}: {r.error}" for r in failed))
    return grid, rows, videos


def _table(title: str, rows: list) -> list[str]:
    """The markdown lines of the comparison: per method density, times, speedups, PSNR and ShapesBench's score."""
    lines = [
        f"Measured now, one process: {title}.",
        "",
        "| method | density | generation | attention | attention speedup | end-to-end speedup | PSNR vs dense | "
        "ShapesBench trajectory error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        error = r.scores.get("mean_trajectory_error", float("nan"))
        if r.method == "dense (stock)":
            lines.append(f"| {r.method} | 1 | {r.seconds:.2f} s | | | 1.00x | | {error:.3f} |")
        else:
            lines.append(
                f"| {r.method} | {r.density:.3f} | {r.seconds:.2f} s | {r.attention_seconds:.2f} s | "
                f"{r.attention_speedup:.2f}x | **{r.speedup:.2f}x** | {r.psnr:.1f} dB | {error:.3f} |"
            )
    return lines


def _frame_sheet(rows: list, videos: dict) -> tuple[np.ndarray, list[str]]:
    """``(sheet, labels)``: one row per clip but the plain dense one (first / middle / last frame), and its labels."""
    strips = []
    labels = [r.method for r in rows if r.method != "dense"]
    for label in labels:
        clip = to_uint8(videos[label])
        strips.append(np.concatenate([clip[0], clip[len(clip) // 2], clip[-1]], axis=1))
    return np.concatenate(strips, axis=0), labels


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

    from diffattn_bench.compare import default_methods

    speed_methods = list(default_methods((8, 8, 16)))
    with gr.Column(scale=1):
        s_methods = gr.CheckboxGroup(
            speed_methods,
            value=["sliding tile", "radial"],
            label="Sparse methods (against dense attention)",
            elem_id="speed-methods",
        )
        s_size = gr.Dropdown(
            list(SPEED_SIZES),
            value=list(SPEED_SIZES)[1],
            label="Video size (frames x height x width)",
            elem_id="speed-size",
        )
        s_steps = gr.Slider(
            1,
            SPEED_MAX_STEPS,
            value=SPEED_MAX_STEPS,
            step=1,
            label="Steps (fewer: faster, but the clips are unfinished)",
            elem_id="speed-steps",
        )
        s_run = gr.Button("Compare", variant="primary", elem_id="speed-run")
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
