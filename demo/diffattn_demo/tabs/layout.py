"""The Layout tab: the prompt without and with bounded attention (each subject word kept in its box), same noise, and
a preview of the boxes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..images import display_factor, enlarge, to_uint8
from ..inputs import DemoInputError, check_seed, check_steps, fit_prompt, parse_subjects, vocabulary_warning
from ..models import CFG, Models
from .common import (
    IMAGE_MODEL,
    IMAGE_OUT,
    Progress,
    about,
    gradio_progress,
    no_progress,
    seed_box,
    steps_box,
    user_errors,
    words_panel,
)

__all__ = ["BOX_COLOURS", "draw_boxes", "LayoutOutput", "run_layout", "build"]

ABOUT = (
    "Bounded attention: each subject's words attend only inside its box (and its box only to them), so the "
    "subjects land where the boxes are and do not mix."
)

BOX_COLOURS = ((255, 80, 80), (80, 160, 255), (80, 220, 80), (240, 200, 60))


def draw_boxes(subjects: Sequence[tuple[str, tuple[float, float, float, float]]], size: int = 256) -> np.ndarray:
    """The subjects' boxes as outlines on a dark square canvas (one colour per subject, in order)."""
    canvas = np.full((size, size, 3), 24, np.uint8)
    for (_, (x0, y0, x1, y1)), colour in zip(subjects, BOX_COLOURS):
        a, b = int(round(x0 * (size - 1))), int(round(x1 * (size - 1)))
        c, d = int(round(y0 * (size - 1))), int(round(y1 * (size - 1)))
        for t in range(2):
            canvas[c : d + 1, min(a + t, b)] = colour
            canvas[c : d + 1, max(b - t, a)] = colour
            canvas[min(c + t, d), a : b + 1] = colour
            canvas[max(d - t, c), a : b + 1] = colour
    return canvas


@dataclass(frozen=True)
class LayoutOutput:
    boxes: np.ndarray
    plain: np.ndarray
    bounded: np.ndarray
    note: str


def run_layout(
    models: Models, prompt: str, subjects_text: str, seed: Any, steps: Any, *, progress: Progress = no_progress
) -> LayoutOutput:
    """Layout tab: the prompt without and with bounded attention (each subject word kept in its box), same noise."""
    from diffattn.editing import layout

    seed, steps = check_seed(seed), check_steps(steps)
    subjects = parse_subjects(subjects_text)
    with models.image() as pipe:
        prompt, note = fit_prompt(pipe, prompt)
        warning = vocabulary_warning([prompt], models.image_info.vocabulary)
        images = []
        for i, bounded in enumerate((False, True)):
            progress(0.1 + 0.45 * i, "bounded attention" if bounded else "plain prompt")
            try:
                images.append(
                    to_uint8(
                        layout(
                            pipe,
                            prompt,
                            subjects,
                            seed=seed,
                            bounded=bounded,
                            num_inference_steps=steps,
                            guidance_scale=CFG,
                        )
                    )
                )
            except ValueError as error:  # a subject word not in the prompt, a bad box: layout says which
                raise DemoInputError(str(error)) from None
    factor = display_factor(images[0].shape[:2])
    side = images[0].shape[0] * factor
    return LayoutOutput(
        draw_boxes(subjects, side),
        enlarge(images[0], factor),
        enlarge(images[1], factor),
        " ".join(
            filter(
                None,
                [
                    warning,
                    note,
                    f"seed {seed}, {steps} steps; boxes: "
                    + "; ".join(f"{w} ({x0:g}, {y0:g}) - ({x1:g}, {y1:g})" for w, (x0, y0, x1, y1) in subjects),
                ],
            )
        ),
    )


# ----------------------------------------------------------------------------------------------------------------
# Gradio
# ----------------------------------------------------------------------------------------------------------------
def build(models: Models, temp: Path) -> None:
    """The Layout tab's components, its box preview (redrawn as the subjects are typed) and its button, inside the
    app's ``gr.Blocks``."""
    import gradio as gr

    with gr.Tab("Layout", id="layout"):
        about("layout-about", ABOUT)
        with gr.Row():
            inputs, run = _input_column(models)
            outputs = _output_column()
        subjects, boxes = inputs[1], outputs[0]
        subjects.change(on_boxes, [subjects], [boxes], queue=False, show_progress="hidden")
        run.click(
            _on_layout(models),
            inputs,
            outputs,
            api_name="layout",
            concurrency_limit=1,
            concurrency_id=IMAGE_MODEL,
        )


def _input_column(models: Models) -> tuple[list[Any], Any]:
    """The inputs, in the order of :func:`_on_layout`'s parameters, and the Generate button; under the prompt, the
    image model's words and a warning naming unknown ones."""
    import gradio as gr

    with gr.Column():
        prompts = models.image_info.prompts
        l_prompt = gr.Textbox(prompts.layout, label="Prompt", elem_id="layout-prompt")
        words_panel("layout-words", models.image_info, [l_prompt])
        l_subjects = gr.Textbox(
            prompts.layout_subjects,
            lines=4,
            label="Subjects, one per line: word: x0 y0 x1 y1 (fractions, origin top-left)",
            elem_id="layout-subjects",
        )
        with gr.Row():
            l_seed = seed_box("layout-seed")
            l_steps = steps_box("layout-steps", 20)
        l_run = gr.Button("Generate both", variant="primary", elem_id="layout-run")
    return [l_prompt, l_subjects, l_seed, l_steps], l_run


def _output_column() -> list[Any]:
    """The boxes, plain and bounded images and the note."""
    import gradio as gr

    with gr.Column():
        with gr.Row():
            l_boxes = gr.Image(label="Boxes", elem_id="layout-boxes", **IMAGE_OUT)
            l_plain = gr.Image(label="Plain prompt", elem_id="layout-plain", **IMAGE_OUT)
            l_bounded = gr.Image(label="Bounded attention", elem_id="layout-bounded", **IMAGE_OUT)
        l_note = gr.Markdown(elem_id="layout-note")
    return [l_boxes, l_plain, l_bounded, l_note]


def on_boxes(text: str) -> Any:
    """The box preview of the subject lines (Gradio names this event after the function)."""
    try:
        return draw_boxes(parse_subjects(text))
    except DemoInputError:
        return None  # half-typed lines: the Generate button reports what is wrong


def _on_layout(models: Models) -> Callable[..., tuple]:
    """The Generate button's handler: :func:`run_layout` on the page's values."""
    import gradio as gr

    def on_layout(
        prompt: str, subjects: str, seed: Any, steps: Any, progress: Any = gr.Progress(track_tqdm=True)
    ) -> tuple:
        with user_errors():
            out = run_layout(models, prompt, subjects, seed, steps, progress=gradio_progress(progress))
        return out.boxes, out.plain, out.bounded, out.note

    return on_layout
