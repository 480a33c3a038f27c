"""The Erase tab: generate an image (or upload one into the canvas), paint over an object, and remove it with
Attentive Eraser (``diffattn.editing.erase``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..images import display_factor, enlarge, to_uint8
from ..inputs import DemoInputError, check_seed, check_steps, fit_prompt, mask_from_editor, vocabulary_warning
from ..models import CFG, Models, image_size
from .common import (
    IMAGE_MODEL,
    IMAGE_OUT,
    Progress,
    about,
    gradio_progress,
    image_editor,
    no_progress,
    seed_box,
    steps_box,
    user_errors,
    words_panel,
)

__all__ = ["generate_image", "EraseOutput", "run_erase", "build"]

ABOUT = (
    "Attentive Eraser: inside the painted mask the self-attention is turned away from the object toward the "
    "background around it, while the latents outside the mask follow the source."
)


def generate_image(models: Models, prompt: str, seed: Any, steps: Any) -> tuple[np.ndarray, str]:
    """One image of ``prompt`` (enlarged uint8, for the Erase canvas) and a note (a warning first when the prompt has
    words the model does not know)."""
    import torch

    seed, steps = check_seed(seed), check_steps(steps)
    with models.image() as pipe:
        prompt, note = fit_prompt(pipe, prompt)
        out = pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=CFG,
            output_type="np",
            generator=torch.Generator().manual_seed(seed),
        )
    image = to_uint8(np.asarray(out.images[0]))
    warning = vocabulary_warning([prompt], models.image_info.vocabulary)
    return enlarge(image, display_factor(image.shape[:2])), " ".join(filter(None, [warning, note]))


@dataclass(frozen=True)
class EraseOutput:
    source: np.ndarray
    mask: np.ndarray
    erased: np.ndarray
    note: str


def run_erase(models: Models, editor: Any, seed: Any, steps: Any, *, progress: Progress = no_progress) -> EraseOutput:
    """Erase tab: remove what the brush painted over, with Attentive Eraser (``diffattn.editing.erase``)."""
    from diffattn.editing import erase

    seed, steps = check_seed(seed), check_steps(steps)
    with models.image() as pipe:
        image, mask, note = mask_from_editor(editor, image_size(pipe))
        progress(0.1, "erasing")
        try:
            out = to_uint8(erase(pipe, image, mask, num_inference_steps=steps, seed=seed))
        except (ValueError, TypeError, AttributeError) as error:
            raise DemoInputError(f"erase cannot run on this model ({type(pipe).__name__}): {error}") from None
    factor = display_factor(image.shape[:2])
    shown = np.where(mask[..., None], (0.5 * image + 0.5 * np.array([255, 0, 255])).astype(np.uint8), image)
    return EraseOutput(
        enlarge(image, factor),
        enlarge(shown, factor),
        enlarge(out, factor),
        " ".join(filter(None, [note, f"{int(mask.sum())} of {mask.size} pixels masked, seed {seed}, {steps} steps."])),
    )


# ----------------------------------------------------------------------------------------------------------------
# Gradio
# ----------------------------------------------------------------------------------------------------------------
def build(models: Models, temp: Path) -> None:
    """The Erase tab's components, its Generate button (an image into the canvas) and its Remove button, inside the
    app's ``gr.Blocks``."""
    import gradio as gr

    with gr.Tab("Erase", id="erase"):
        about("erase-about", ABOUT)
        with gr.Row():
            r_prompt, r_generate, r_editor, r_seed, r_steps, r_run = _input_column(models)
            r_source, r_mask, r_erased, r_note = _output_column()
        r_generate.click(
            _on_generate(models),
            [r_prompt, r_seed, r_steps],
            [r_editor, r_note],
            api_name="generate",
            concurrency_limit=1,
            concurrency_id=IMAGE_MODEL,
        )
        r_run.click(
            _on_erase(models),
            [r_editor, r_seed, r_steps],
            [r_source, r_mask, r_erased, r_note],
            api_name="erase",
            concurrency_limit=1,
            concurrency_id=IMAGE_MODEL,
        )


def _input_column(models: Models) -> tuple[Any, ...]:
    """The prompt (the image model's words and a warning naming unknown ones under it), the Generate button, the
    canvas, the seed, the steps and the Remove button."""
    import gradio as gr

    with gr.Column():
        with gr.Row():
            r_prompt = gr.Textbox(
                models.image_info.prompts.erase,
                label="Generate an image (or upload one in the canvas)",
                elem_id="erase-prompt",
                scale=3,
            )
            r_generate = gr.Button("Generate", elem_id="erase-generate", scale=1)
        words_panel("erase-words", models.image_info, [r_prompt])
        r_editor = image_editor(
            type="numpy",
            format="png",
            sources=["upload"],
            label=("Paint over the object to remove"),
            elem_id="erase-editor",
            elem_classes=["pixelated"],
            brush=gr.Brush(default_size=40, colors=["#ff00ff"], color_mode="fixed"),
            eraser=gr.Eraser(default_size=40),
            transforms=(),
            layers=False,
            canvas_size=(256, 256),
        )
        with gr.Row():
            r_seed = seed_box("erase-seed")
            r_steps = steps_box("erase-steps", 10)
        r_run = gr.Button("Remove", variant="primary", elem_id="erase-run")
    return r_prompt, r_generate, r_editor, r_seed, r_steps, r_run


def _output_column() -> tuple[Any, ...]:
    """The image, the mask over it, the erased image and the note."""
    import gradio as gr

    with gr.Column():
        with gr.Row():
            r_source = gr.Image(label="Image", elem_id="erase-out-source", **IMAGE_OUT)
            r_mask = gr.Image(label="Mask", elem_id="erase-out-mask", **IMAGE_OUT)
            r_erased = gr.Image(label="Erased", elem_id="erase-out-erased", **IMAGE_OUT)
        r_note = gr.Markdown(elem_id="erase-note")
    return r_source, r_mask, r_erased, r_note


def _on_generate(models: Models) -> Callable[..., tuple]:
    """The Generate button's handler: :func:`generate_image` as the canvas's background."""

    def on_generate(prompt: str, seed: Any, steps: Any) -> tuple:
        with user_errors():
            image, note = generate_image(models, prompt, seed, steps)
        return {"background": image, "layers": [], "composite": image}, note

    return on_generate


def _on_erase(models: Models) -> Callable[..., tuple]:
    """The Remove button's handler: :func:`run_erase` on the canvas."""
    import gradio as gr

    def on_erase(editor: Any, seed: Any, steps: Any, progress: Any = gr.Progress(track_tqdm=True)) -> tuple:
        with user_errors():
            out = run_erase(models, editor, seed, steps, progress=gradio_progress(progress))
        return out.source, out.mask, out.erased, out.note

    return on_erase
