"""The Layout tab: the prompt without and with bounded attention (each subject word kept in its box), same noise, and
a preview of the boxes."""

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
    fit_prompt,
    parse_subjects,
    vocabulary_warning,
)
from ..models import CFG, Models
from .common import (
    IMAGE_MODEL,
    IMAGE_OUT,
    Progress,
    about,
    gradio_progress,
    image_editor,
    no_progress,
    number_box,
    seed_box,
    step_label,
    steps_box,
    user_errors,
    words_panel,
)

__all__ = ["BOX_COLOURS", "boxes_from_sketch", "draw_boxes", "LayoutOutput", "run_layout", "build"]

ABOUT = (
    "**Bounded attention** (Dahary et al., 2024): each subject's words attend only inside its box (and its box only "
    "to them), so the subjects land where the boxes are and do not mix. Type the boxes, or draw them: one colour "
    "per subject line, in order, then *Use the drawn boxes*. The boxes are outlined on both results."
)

BOX_COLOURS = ((255, 80, 80), (80, 160, 255), (80, 220, 80), (240, 200, 60))


def draw_boxes(
    subjects: Sequence[tuple[str, tuple[float, float, float, float]]],
    size: int = 256,
    canvas: np.ndarray | None = None,
) -> np.ndarray:
    """The subjects' boxes as outlines (one colour per subject, in order) on ``canvas`` (a copy; a square image of
    side ``size``) or, when ``None``, on a dark square."""
    canvas = np.full((size, size, 3), 24, np.uint8) if canvas is None else canvas.copy()
    for (_, (x0, y0, x1, y1)), colour in zip(subjects, BOX_COLOURS):
        a, b = int(round(x0 * (size - 1))), int(round(x1 * (size - 1)))
        c, d = int(round(y0 * (size - 1))), int(round(y1 * (size - 1)))
        for t in range(2):
            canvas[c : d + 1, min(a + t, b)] = colour
            canvas[c : d + 1, max(b - t, a)] = colour
            canvas[min(c + t, d), a : b + 1] = colour
            canvas[max(d - t, c), a : b + 1] = colour
    return canvas


def boxes_from_sketch(editor: Any, subjects_text: str) -> str:
    """The subject lines with each box replaced by the bounding box of the strokes drawn in that line's colour
    (:data:`BOX_COLOURS`, in order) on the sketch canvas (a ``gr.ImageEditor`` value); lines whose colour was not
    drawn keep their box. Refuses a sketch with no strokes or strokes of more colours than lines."""
    subjects = parse_subjects(subjects_text)
    layers = [np.asarray(layer) for layer in (editor or {}).get("layers") or [] if layer is not None]
    strokes = [layer for layer in layers if layer.ndim == 3 and layer.shape[2] == 4 and (layer[..., 3] > 0).any()]
    if not strokes:
        raise DemoInputError("draw a box with the brush first: one colour per subject line, in order")
    height, width = strokes[0].shape[:2]
    palette = np.array(BOX_COLOURS, float)
    found: dict[int, tuple[float, float, float, float]] = {}
    for layer in strokes:
        painted = layer[..., 3] > 0
        distance = np.linalg.norm(layer[..., :3][painted][:, None, :].astype(float) - palette[None], axis=-1)
        nearest = np.full(painted.shape, -1)
        nearest[painted] = distance.argmin(1)
        for index in np.unique(nearest[painted]):
            ys, xs = np.nonzero(nearest == index)
            found[int(index)] = (xs.min() / width, ys.min() / height, (xs.max() + 1) / width, (ys.max() + 1) / height)
    extra = sorted(i for i in found if i >= len(subjects))
    if extra:
        raise DemoInputError(
            f"strokes in the colour of subject {extra[0] + 1}, but there are {len(subjects)} subject lines: add a "
            "line for it, or erase that stroke"
        )
    lines = []
    for i, (word, box) in enumerate(subjects):
        x0, y0, x1, y1 = found.get(i, box)
        lines.append(f"{word}: {x0:.2f} {y0:.2f} {x1:.2f} {y1:.2f}")
    return "\n".join(lines)


@dataclass(frozen=True)
class LayoutOutput:
    boxes: np.ndarray
    plain: np.ndarray
    bounded: np.ndarray
    note: str


def run_layout(
    models: Models,
    prompt: str,
    subjects_text: str,
    seed: Any,
    steps: Any,
    *,
    cfg: Any = CFG,
    progress: Progress = no_progress,
) -> LayoutOutput:
    """Layout tab: the prompt without and with bounded attention (each subject word kept in its box), same noise;
    the boxes are outlined on both images."""
    from diffattn.editing import layout

    seed, steps, cfg = check_seed(seed), check_steps(steps), check_cfg(cfg)
    subjects = parse_subjects(subjects_text)
    with models.image(progress) as pipe:
        prompt, note = fit_prompt(pipe, prompt)
        warning = vocabulary_warning([prompt], models.image_info.vocabulary)
        images = []
        for i, bounded in enumerate((False, True)):
            label = f"{i + 1} of 2: " + ("bounded attention" if bounded else "plain prompt")
            progress(0.1 + 0.45 * i, label)
            try:
                with step_label(pipe, label):
                    image = layout(
                        pipe,
                        prompt,
                        subjects,
                        seed=seed,
                        bounded=bounded,
                        num_inference_steps=steps,
                        guidance_scale=cfg,
                    )
                images.append(to_uint8(image))
            except ValueError as error:  # a subject word not in the prompt, a bad box: layout says which
                raise DemoInputError(str(error)) from None
    factor = display_factor(images[0].shape[:2])
    side = images[0].shape[0] * factor
    return LayoutOutput(
        draw_boxes(subjects, side),
        draw_boxes(subjects, side, enlarge(images[0], factor)),
        draw_boxes(subjects, side, enlarge(images[1], factor)),
        " ".join(
            filter(
                None,
                [
                    warning,
                    note,
                    f"seed {seed}, {steps} steps, CFG {cfg:g}; boxes (outlined on both images): "
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
        subjects.change(  # results drawn for other boxes would stand beside the new preview: cleared, said so
            _stale_results,
            None,
            outputs[1:],
            queue=False,
            show_progress="hidden",
            api_visibility="private",
        )
        sketch, use = _sketch_column(subjects)
        use.click(_on_sketch, [sketch, subjects], [subjects], queue=False, api_visibility="private")
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
            l_cfg = number_box("CFG scale", CFG, 1.0, LIMITS.max_cfg, "layout-cfg", step=0.5)
        l_run = gr.Button("Generate both", variant="primary", elem_id="layout-run")
        examples = models.image_info.prompts.layout_examples
        if examples:
            gr.Examples(
                [list(e) for e in examples],
                [l_prompt, l_subjects],
                label="Examples (click one to fill the prompt and the boxes, then Generate both)",
                elem_id="layout-examples",
            )
    return [l_prompt, l_subjects, l_seed, l_steps, l_cfg], l_run


def _sketch_column(subjects: Any) -> tuple[Any, Any]:
    """The box sketchpad (one brush colour per subject line) and the button that turns its strokes into the subject
    lines' boxes."""
    import gradio as gr

    with gr.Accordion("Draw the boxes", open=False, elem_id="layout-sketch-fold"):
        sketch = image_editor(
            value={"background": np.full((256, 256, 3), 24, np.uint8), "layers": [], "composite": None},
            type="numpy",
            format="png",
            sources=[],
            label="Draw each subject's box with its colour: 1st line red, 2nd blue, 3rd green, 4th yellow",
            elem_id="layout-sketch",
            brush=gr.Brush(
                default_size=8,
                colors=["#{:02x}{:02x}{:02x}".format(*c) for c in BOX_COLOURS],
                color_mode="fixed",
            ),
            eraser=gr.Eraser(default_size=16),
            transforms=(),
            layers=False,
            canvas_size=(256, 256),
        )
        use = gr.Button("Use the drawn boxes", elem_id="layout-use-sketch")
    return sketch, use


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


def _stale_results() -> tuple:
    """The Layout results after the boxes changed: none, and a note saying how to draw the new ones."""
    return None, None, "The boxes changed: *Generate both* draws them."


def _on_sketch(sketch: Any, subjects: str) -> str:
    """The "Use the drawn boxes" button: the subject lines with the drawn boxes."""
    with user_errors():
        return boxes_from_sketch(sketch, subjects)


def _on_layout(models: Models) -> Callable[..., tuple]:
    """The Generate button's handler: :func:`run_layout` on the page's values."""
    import gradio as gr

    def on_layout(
        prompt: str,
        subjects: str,
        seed: Any,
        steps: Any,
        cfg: Any = CFG,
        progress: Any = gr.Progress(track_tqdm=True),
    ) -> tuple:
        with user_errors():
            out = run_layout(models, prompt, subjects, seed, steps, cfg=cfg, progress=gradio_progress(progress))
        return out.boxes, out.plain, out.bounded, out.note

    return on_layout
