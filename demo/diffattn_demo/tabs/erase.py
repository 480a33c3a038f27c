"""The Erase tab: generate an image (or upload one into the canvas), paint over an object, and remove it with
Attentive Eraser (``diffattn.editing.erase``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..images import dilate, display_factor, enlarge, to_uint8
from ..inputs import (
    LIMITS,
    DemoInputError,
    check_canvas_image,
    check_number,
    check_seed,
    check_steps,
    check_whole,
    fit_prompt,
    mask_from_editor,
    vocabulary_warning,
)
from ..models import CFG, Models, image_size
from ..upload_check import MESSAGE_ID
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
    steps_box,
    user_errors,
    words_panel,
)

__all__ = ["generate_image", "EraseControls", "EraseOutput", "run_erase", "build"]

ABOUT = (
    "**Attentive Eraser** (Sun et al., 2025): inside the painted mask the self-attention is turned away from the "
    "object toward the background around it, while the latents outside the mask follow the source. *Without "
    "suppression* is the same masked regeneration with plain attention: what the eraser adds."
)


@dataclass(frozen=True)
class EraseControls:
    """The Attentive Eraser pipeline's controls: ``strength`` (the share of the steps re-run from noise),
    ``guidance`` (the removal guidance scale between the plain and the suppressed branch), ``ss_scale`` (similarity
    suppression: the masked queries' logits times this) and ``dilation`` (pixels the mask grows by, at model
    size)."""

    strength: Any = 0.8
    guidance: Any = 9.0
    ss_scale: Any = 0.3
    dilation: Any = 0


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
    plain: np.ndarray  # the same regeneration without attention suppression
    note: str


def run_erase(
    models: Models,
    editor: Any,
    seed: Any,
    steps: Any,
    *,
    controls: EraseControls = EraseControls(),
    progress: Progress = no_progress,
) -> EraseOutput:
    """Erase tab: remove what the brush painted over, with Attentive Eraser (``diffattn.editing.erase``), and the
    same regeneration without its attention suppression beside it."""
    import diffattn
    from diffattn.editing import erase

    seed, steps = check_seed(seed), check_steps(steps)
    strength = check_number(controls.strength, "the strength", 0.05, 1.0)
    guidance = check_number(controls.guidance, "the removal guidance", 1.0, LIMITS.max_cfg)
    ss_scale = check_number(controls.ss_scale, "the similarity suppression scale", 0.01, 1.0)
    dilation = check_whole(controls.dilation, "the mask dilation", 0, LIMITS.max_dilation)
    start = time.perf_counter()
    with models.image(progress) as pipe:
        image, mask, note = mask_from_editor(editor, image_size(pipe))
        mask = dilate(mask, dilation)
        outputs = []
        for i, suppress in enumerate((True, False)):
            progress(0.1 + 0.45 * i, f"{i + 1} of 2: " + ("erasing" if suppress else "without suppression"))
            try:
                erased = erase(
                    pipe,
                    image,
                    mask,
                    num_inference_steps=steps,
                    seed=seed,
                    strength=strength,
                    guidance=guidance,
                    method=diffattn.AttentiveEraser(ss_scale=ss_scale),
                    suppress=suppress,
                )
            except (ValueError, TypeError, AttributeError) as error:
                raise DemoInputError(f"erase cannot run on this model ({type(pipe).__name__}): {error}") from None
            outputs.append(to_uint8(erased))
    factor = display_factor(image.shape[:2])
    shown = np.where(mask[..., None], (0.5 * image + 0.5 * np.array([255, 0, 255])).astype(np.uint8), image)
    seconds = time.perf_counter() - start
    told = (
        f"{int(mask.sum())} of {mask.size} pixels masked (dilated by {dilation} px), seed {seed}, {steps} steps, "
        f"strength {strength:g}, removal guidance {guidance:g}, suppression scale {ss_scale:g}; {seconds:.1f} s for "
        "both images."
    )
    return EraseOutput(
        enlarge(image, factor),
        enlarge(shown, factor),
        enlarge(outputs[0], factor),
        enlarge(outputs[1], factor),
        " ".join(filter(None, [note, told])),
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
            r_prompt, r_generate, r_editor, r_seed, r_steps, r_run, r_controls = _input_column(models)
            r_source, r_mask, r_erased, r_plain, r_note = _output_column()
        r_editor.upload(_on_upload, [r_editor], [r_editor], api_visibility="private")
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
            [r_editor, r_seed, r_steps, *r_controls],
            [r_source, r_mask, r_erased, r_plain, r_note],
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
        gr.HTML("", elem_id=MESSAGE_ID)  # the browser's refusal of an oversize file (upload_check.py)
        with gr.Row():
            r_seed = seed_box("erase-seed")
            r_steps = steps_box("erase-steps", 10)
            r_run = gr.Button("Remove", variant="primary", elem_id="erase-run")
        with gr.Accordion("Attentive Eraser controls", open=False, elem_id="erase-controls"):
            with gr.Row():
                r_strength = number_box("Strength: share of steps re-run", 0.8, 0.05, 1.0, "erase-strength", 0.05)
                r_guidance = number_box("Removal guidance", 9.0, 1.0, LIMITS.max_cfg, "erase-guidance", 0.5)
            with gr.Row():
                r_ss = number_box("Suppression scale", 0.3, 0.01, 1.0, "erase-ss-scale", 0.05)
                r_dilation = number_box("Mask dilation, px", 0, 0, LIMITS.max_dilation, "erase-dilation")
        examples = models.image_info.prompts.erase_examples
        if examples:
            gr.Examples(
                [[e] for e in examples],
                [r_prompt],
                label="Examples (click one, then Generate and paint over an object)",
                elem_id="erase-examples",
            )
    return r_prompt, r_generate, r_editor, r_seed, r_steps, r_run, (r_strength, r_guidance, r_ss, r_dilation)


def _output_column() -> tuple[Any, ...]:
    """The image, the mask over it, the erased image and the note."""
    import gradio as gr

    with gr.Column():
        with gr.Row():
            r_source = gr.Image(label="Image", elem_id="erase-out-source", **IMAGE_OUT)
            r_mask = gr.Image(label="Mask", elem_id="erase-out-mask", **IMAGE_OUT)
            r_erased = gr.Image(label="Erased", elem_id="erase-out-erased", **IMAGE_OUT)
            r_plain = gr.Image(label="Without suppression", elem_id="erase-out-plain", **IMAGE_OUT)
        r_note = gr.Markdown(elem_id="erase-note")
    return r_source, r_mask, r_erased, r_plain, r_note


def _on_generate(models: Models) -> Callable[..., tuple]:
    """The Generate button's handler: :func:`generate_image` as the canvas's background."""

    def on_generate(prompt: str, seed: Any, steps: Any) -> tuple:
        with user_errors():
            image, note = generate_image(models, prompt, seed, steps)
        return {"background": image, "layers": [], "composite": image}, note

    return on_generate


def _on_upload(editor: Any) -> Any:
    """The canvas's upload event: an image the tab would refuse is refused now, and the canvas emptied."""
    import gradio as gr

    try:
        if isinstance(editor, dict) and editor.get("background") is not None:
            check_canvas_image(editor["background"])
    except DemoInputError as error:
        gr.Warning(str(error), title="Please check the input")
        return None
    return gr.skip()


def _on_erase(models: Models) -> Callable[..., tuple]:
    """The Remove button's handler: :func:`run_erase` on the canvas."""
    import gradio as gr

    def on_erase(
        editor: Any,
        seed: Any,
        steps: Any,
        strength: Any = 0.8,
        guidance: Any = 9.0,
        ss_scale: Any = 0.3,
        dilation: Any = 0,
        progress: Any = gr.Progress(track_tqdm=True),
    ) -> tuple:
        controls = EraseControls(strength, guidance, ss_scale, dilation)
        with user_errors():
            out = run_erase(models, editor, seed, steps, controls=controls, progress=gradio_progress(progress))
        return out.source, out.mask, out.erased, out.plain, out.note

    return on_erase
