"""The Guidance tab: a sweep of perturbed-attention guidance (PAG, SEG, SoftPAG) over scales, same seed, shown as a
grid of methods by scales with a table of how far each image moved from no guidance."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..images import display_factor, enlarge, to_uint8
from ..inputs import (
    LIMITS,
    DemoInputError,
    check_cfg,
    check_seed,
    check_steps,
    check_whole,
    fit_prompt,
    parse_scales,
    vocabulary_warning,
)
from ..models import CFG, ImageModel, Models, ModelStructure
from .common import (
    IMAGE_MODEL,
    IMAGE_OUT,
    Progress,
    about,
    gradio_progress,
    no_progress,
    number_box,
    seed_box,
    step_label,
    steps_box,
    user_errors,
    words_panel,
)

__all__ = ["GUIDANCE_METHODS", "GuidanceControls", "GuidanceOutput", "guidance_layer_choices", "run_guidance", "build"]

ABOUT = (
    "Perturbed-attention guidance runs a copy of the prediction with one block's self-attention degraded and steps "
    "away from it by the scale: **PAG** (Ahn et al., 2024: each token sees only itself), **SEG** (Hong, 2024: "
    "blurred queries), **SoftPAG** (halfway to PAG). Scale 0 is the image without it; the papers' claim is better "
    "structure at low CFG (try CFG 1)."
)


@dataclass(frozen=True)
class GuidanceControls:
    """The controls beside the sweep: the CFG scale and the steps the guidance acts on, ``start`` to ``end``
    (exclusive; ``None`` or 0: to the last step)."""

    cfg: Any = CFG
    start: Any = 0
    end: Any = None


GUIDANCE_METHODS = ("PAG", "SEG", "SoftPAG")


@dataclass(frozen=True)
class GuidanceOutput:
    grid: np.ndarray  # rows: methods, columns: scales (enlarged cells, 4 px gaps)
    table: str  # markdown: max |difference| to no guidance, per cell
    cells: dict[tuple[str, float], np.ndarray]  # (method, scale) -> uint8 image at model size


def _guidance_method(name: str, scale: float, layers: Any, steps: range | None = None) -> Any:
    from diffattn.guidance import PAG, SEG, SoftPAG

    if name == "PAG":
        return PAG(scale=scale, layers=layers, steps=steps)
    if name == "SEG":
        return SEG(scale=scale, layers=layers, steps=steps)
    if name == "SoftPAG":
        return SoftPAG(scale=scale, u=0.5, layers=layers, steps=steps)
    raise DemoInputError(f"guidance method must be one of {', '.join(GUIDANCE_METHODS)}, got {name!r}")


def guidance_layer_choices(structure: ModelStructure) -> list[str]:
    """'family default' and the top-level blocks with attention, for the Guidance tab's layer picker."""
    return ["family default", *structure.guidance_blocks]


def run_guidance(
    models: Models,
    prompt: str,
    methods: Sequence[str],
    scales_text: str,
    seed: Any,
    steps: Any,
    layers: str = "family default",
    *,
    controls: GuidanceControls = GuidanceControls(),
    progress: Progress = no_progress,
) -> GuidanceOutput:
    """Guidance tab: the prompt at each scale of each guidance method, same seed; scale 0 is the plain pipeline."""
    seed, steps = check_seed(seed), check_steps(steps)
    cfg = check_cfg(controls.cfg)
    start = check_whole(controls.start, "the first guided step", 0, steps - 1)
    end = steps if controls.end in (None, "", 0) else check_whole(controls.end, "the end step", start + 1, steps)
    active = None if (start, end) == (0, steps) else range(start, end)
    methods = [m for m in methods or []]
    if not methods:
        raise DemoInputError(f"pick at least one guidance method ({', '.join(GUIDANCE_METHODS)})")
    for name in methods:
        _guidance_method(name, 1.0, None)
    scales = parse_scales(scales_text)
    choices = guidance_layer_choices(models.structure())
    if layers not in choices:
        raise DemoInputError(f"layers must be one of {', '.join(choices)}, got {layers!r}")
    with models.image(progress) as pipe:
        prompt, note = fit_prompt(pipe, prompt)
        pattern = None if layers == "family default" else layers
        plain, cells = _sweep(pipe, prompt, methods, scales, seed, steps, pattern, progress, cfg, active)
    grid, lines = _grid_and_table(cells, methods, scales, plain)
    warning = vocabulary_warning([prompt], models.image_info.vocabulary)
    table = "\n".join(
        [
            *([warning, ""] if warning else []),
            *([note] if note else []),
            f"Rows: {', '.join(methods)}; columns: scales {', '.join(f'{s:g}' for s in scales)} "
            f"(layers: {layers}; steps {start} to {end - 1} of {steps}; seed {seed}, CFG {cfg:g}). Largest and "
            "mean |difference| to no guidance (levels of 255):",
            "",
            *lines,
        ]
    )
    return GuidanceOutput(grid, table, cells)


def _sweep(
    pipe: Any,
    prompt: str,
    methods: list[str],
    scales: list[float],
    seed: int,
    steps: int,
    pattern: str | None,
    progress: Progress,
    cfg: float = CFG,
    active: range | None = None,
) -> tuple[np.ndarray, dict[tuple[str, float], np.ndarray]]:
    """``(plain, cells)``: the image without guidance, generated once, and the image of each ``(method, scale)``
    (scale 0 being ``plain``), every one from the same seed."""
    import torch

    import diffattn

    cells: dict[tuple[str, float], np.ndarray] = {}

    def generate(index: int, what: str) -> np.ndarray:
        label = f"image {index} of {total}: {what}"
        progress((index - 1) / total, label)
        with step_label(pipe, label):
            out = pipe(
                prompt,
                num_inference_steps=steps,
                guidance_scale=cfg,
                output_type="np",
                generator=torch.Generator().manual_seed(seed),
            )
        return to_uint8(np.asarray(out.images[0]))

    total = 1 + len(methods) * (len(scales) - 1)
    done = 1
    plain = generate(done, "no guidance")
    for name in methods:
        cells[(name, 0.0)] = plain
        for scale in scales[1:]:
            done += 1
            try:
                handle = diffattn.guidance.enable(pipe, _guidance_method(name, scale, pattern, active))
            except diffattn.DiffattnError as error:
                raise DemoInputError(str(error)) from None
            try:
                cells[(name, scale)] = generate(done, f"{name} scale {scale:g}")
            finally:
                handle.remove()
    return plain, cells


def _grid_and_table(
    cells: dict[tuple[str, float], np.ndarray], methods: list[str], scales: list[float], plain: np.ndarray
) -> tuple[np.ndarray, list[str]]:
    """The grid of enlarged cells (rows: methods, columns: scales, 4 px gaps) and the markdown table of each cell's
    max |difference| to ``plain``."""
    factor = display_factor(plain.shape[:2], 128)
    gap = 4
    h, w = plain.shape[0] * factor, plain.shape[1] * factor
    grid = np.full((len(methods) * (h + gap) - gap, len(scales) * (w + gap) - gap, 3), 255, np.uint8)
    header = "| method | " + " | ".join(f"scale {s:g}" for s in scales) + " |"
    lines = [header, "|" + "---|" * (len(scales) + 1)]
    for r, name in enumerate(methods):
        row = []
        for c, scale in enumerate(scales):
            cell = cells[(name, scale)]
            grid[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = enlarge(cell, factor)
            change = np.abs(cell.astype(int) - plain.astype(int))
            row.append(f"{int(change.max())} / {change.mean():.1f}")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return grid, lines


# ----------------------------------------------------------------------------------------------------------------
# Gradio
# ----------------------------------------------------------------------------------------------------------------
def build(models: Models, temp: Path) -> None:
    """The Guidance tab's components and its button, inside the app's ``gr.Blocks``; the layer choices are the image
    model's blocks (its :class:`ModelStructure`)."""
    import gradio as gr

    layer_choices = guidance_layer_choices(models.structure())
    info = models.image_info
    if info.guidance.layer not in layer_choices:
        raise ValueError(
            f"the Guidance default layer {info.guidance.layer!r} of {info.name} is not a block of this model "
            f"({', '.join(layer_choices)}); fix its GuidanceDefaults in diffattn_demo.models.IMAGE_MODELS"
        )
    with gr.Tab("Guidance", id="guidance"):
        about("guidance-about", ABOUT)
        with gr.Row():
            inputs, run = _input_column(layer_choices, info)
            outputs = _output_column()
        run.click(
            _on_guidance(models),
            inputs,
            outputs,
            api_name="guidance",
            concurrency_limit=1,
            concurrency_id=IMAGE_MODEL,
        )


def _input_column(layer_choices: list[str], info: ImageModel) -> tuple[list[Any], Any]:
    """The inputs, in the order of :func:`_on_guidance`'s parameters, and the Sweep button; the first values of the
    prompt, scales and layer are the image model's (``models.IMAGE_MODELS``); under the prompt, the model's words and
    a warning naming unknown ones."""
    import gradio as gr

    defaults = info.guidance
    with gr.Column():
        g_prompt = gr.Textbox(info.prompts.guidance, label="Prompt", elem_id="guidance-prompt")
        words_panel("guidance-words", info, [g_prompt])
        g_methods = gr.CheckboxGroup(
            list(GUIDANCE_METHODS),
            value=list(defaults.methods),
            label="Methods (rows)",
            elem_id="guidance-methods",
        )
        g_scales = gr.Textbox(
            defaults.scales_text, label="Scales (columns; 0 = no guidance)", elem_id="guidance-scales"
        )
        g_layers = gr.Dropdown(layer_choices, value=defaults.layer, label="Layers", elem_id="guidance-layers")
        with gr.Row():
            g_seed = seed_box("guidance-seed")
            g_steps = steps_box("guidance-steps", 20)
            g_cfg = number_box("CFG scale", CFG, 1.0, LIMITS.max_cfg, "guidance-cfg", step=0.5)
        with gr.Row():
            g_start = number_box("Guided from step", 0, 0, LIMITS.max_steps - 1, "guidance-start")
            g_end = number_box("... to step (exclusive; 0: to the last)", 0, 0, LIMITS.max_steps, "guidance-end")
        g_run = gr.Button("Sweep", variant="primary", elem_id="guidance-run")
        if info.prompts.guidance_examples:
            gr.Examples(
                [[p] for p in info.prompts.guidance_examples],
                [g_prompt],
                label="Examples (click one to fill the prompt, then Sweep)",
                elem_id="guidance-examples",
            )
    return [g_prompt, g_methods, g_scales, g_layers, g_seed, g_steps, g_cfg, g_start, g_end], g_run


def _output_column() -> list[Any]:
    """The grid and the table."""
    import gradio as gr

    with gr.Column():
        # no label over the image (it covered the first row); the table under it names rows and columns
        g_grid = gr.Image(
            label="Rows: methods; columns: scales (same seed)", show_label=False, elem_id="guidance-grid", **IMAGE_OUT
        )
        g_table = gr.Markdown(elem_id="guidance-table")
    return [g_grid, g_table]


def _on_guidance(models: Models) -> Callable[..., tuple]:
    """The Sweep button's handler: :func:`run_guidance` on the page's values."""
    import gradio as gr

    def on_guidance(
        prompt: str,
        methods: list,
        scales: str,
        layers: str,
        seed: Any,
        steps: Any,
        cfg: Any = CFG,
        start: Any = 0,
        end: Any = None,
        progress: Any = gr.Progress(track_tqdm=True),
    ) -> tuple:
        controls = GuidanceControls(cfg, start, end)
        with user_errors():
            out = run_guidance(
                models,
                prompt,
                methods,
                scales,
                seed,
                steps,
                layers,
                controls=controls,
                progress=gradio_progress(progress),
            )
        return out.grid, out.table

    return on_guidance
