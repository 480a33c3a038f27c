"""The Edit tab: the source prompt's image and the target prompt's edit of it, from the same noise, with
prompt-to-prompt (word swap and re-weight) or MasaCtrl; an uploaded image is DDIM-inverted first, and the user is
told how well the model reproduces it (a warning when below the model's in-domain threshold)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..images import DIFFERENCE_STOPS, difference_levels, difference_map, display_factor, enlarge, to_uint8
from ..inputs import (
    LIMITS,
    DemoInputError,
    check_number,
    check_seed,
    check_steps,
    fit_prompt,
    load_upload,
    vocabulary_warning,
)
from ..models import CFG, Models, image_size
from .common import (
    IMAGE_MODEL,
    IMAGE_OUT,
    Progress,
    about,
    gradio_progress,
    no_progress,
    number_box,
    seed_box,
    steps_box,
    upload_image,
    user_errors,
    words_panel,
)

__all__ = ["EDIT_METHODS", "EditOutput", "run_edit", "difference_legend", "build"]

ABOUT = (
    "Prompt-to-prompt re-uses the source's cross-attention maps while a word is swapped or re-weighted; MasaCtrl "
    "lets the target's self-attention read the source's keys and values, so the look stays; an upload is "
    "DDIM-inverted first."
)

EDIT_METHODS = ("prompt-to-prompt", "MasaCtrl")


@dataclass(frozen=True)
class EditOutput:
    source: np.ndarray  # uint8, enlarged
    target: np.ndarray
    difference: np.ndarray
    note: str
    seconds: float


def _swap(source: str, word: str, replacement: str) -> str:
    pattern = rf"(?<![\w]){re.escape(word)}(?![\w])"
    if not re.search(pattern, source):
        raise DemoInputError(f"the word {word!r} to swap is not in the source prompt {source!r}")
    return re.sub(pattern, replacement, source)


def run_edit(
    models: Models,
    source: str,
    target: str,
    method: str,
    seed: Any,
    steps: Any,
    *,
    swap_word: str = "",
    swap_to: str = "",
    reweight_word: str = "",
    reweight: float = 1.0,
    upload: Any = None,
    upload_folder: Path | None = None,
    progress: Progress = no_progress,
) -> EditOutput:
    """Edit tab: the source prompt's image and the target prompt's edit of it, from the same noise, with
    prompt-to-prompt (word swap and re-weight) or MasaCtrl; with an uploaded image, its DDIM inversion replaces the
    noise. An empty target prompt means the source prompt (with the swap applied, if one is given)."""
    from diffattn.editing import edit

    seed, steps = check_seed(seed), check_steps(steps)
    if method not in EDIT_METHODS:
        raise DemoInputError(f"method must be one of {', '.join(EDIT_METHODS)}, got {method!r}")
    reweight = check_number(reweight, "the re-weight factor", 0.0, LIMITS.max_weight)
    start = time.perf_counter()
    with models.image() as pipe:
        source, target, notes = _edit_prompts(pipe, source, target, swap_word, swap_to)
        warning = vocabulary_warning([source, target], models.image_info.vocabulary)
        method_obj = _edit_method(pipe, method, source, target, steps, reweight_word, reweight)
        size = image_size(pipe)
        latents = None
        if upload is not None:
            latents, upload_notes = _invert_upload(
                pipe, upload, upload_folder, size, source, steps, progress, models.inversion_threshold()
            )
            notes = upload_notes + notes
        progress(0.5 if latents is not None else 0.1, "editing")
        result = edit(
            pipe, source, target, method_obj, seed=seed, latents=latents, num_inference_steps=steps, guidance_scale=CFG
        )
    a, b = to_uint8(result.source), to_uint8(result.target)
    factor = display_factor(a.shape[:2])
    seconds = time.perf_counter() - start
    notes.append(
        f'{method}: "{source}" -> "{target}", seed {seed}, {steps} steps'
        f"{' from the inverted upload' if latents is not None else ''}, {seconds:.1f} s; largest difference "
        f"{int(difference_levels(a, b).max())} levels of 255."
    )
    if warning:
        notes.insert(0, warning)
    return EditOutput(
        enlarge(a, factor), enlarge(b, factor), enlarge(difference_map(a, b), factor), " ".join(notes), seconds
    )


def _edit_prompts(pipe: Any, source: str, target: str, swap_word: str, swap_to: str) -> tuple[str, str, list[str]]:
    """``(source, target, notes)``: both prompts fitted to the tokenizer, the target being the source when empty, with
    the word swap applied; the notes say which prompt was cut."""
    source, note_source = fit_prompt(pipe, source, "source prompt")
    target_text = target if isinstance(target, str) and target.strip() else source
    if swap_word and swap_word.strip():
        if not swap_to or not swap_to.strip():
            raise DemoInputError(f"enter the word that replaces {swap_word.strip()!r}")
        target_text = _swap(target_text, swap_word.strip(), swap_to.strip())
    target, note_target = fit_prompt(pipe, target_text, "target prompt")
    notes = [n for n in (note_source, note_target) if n]
    return source, target, notes


def _edit_method(
    pipe: Any, method: str, source: str, target: str, steps: int, reweight_word: str, reweight: float
) -> Any:
    """The diffattn method of the edit: prompt-to-prompt (prompts of equal token count, the re-weighted word found in
    the target) or MasaCtrl."""
    import diffattn
    from diffattn.editing import token_indices

    if method == "prompt-to-prompt":
        n_source, n_target = len(pipe.tokenizer(source).input_ids), len(pipe.tokenizer(target).input_ids)
        if n_source != n_target:
            raise DemoInputError(
                f"prompt-to-prompt needs prompts of equal token count (source {n_source}, target {n_target}): "
                "swap one word for one word, or use MasaCtrl"
            )
        reweights: tuple[tuple[int, float], ...] = ()
        if reweight_word and reweight_word.strip() and float(reweight) != 1.0:
            try:
                indices = token_indices(pipe, target, reweight_word.strip())
            except ValueError:
                raise DemoInputError(
                    f"the word {reweight_word.strip()!r} to re-weight is not in the target prompt {target!r}"
                ) from None
            reweights = tuple((i, float(reweight)) for i in indices)
        return diffattn.PromptToPrompt(reweight=reweights)
    return diffattn.MutualSelfAttention(start_step=min(4, max(steps // 5, 0)))


def _invert_upload(
    pipe: Any,
    upload: Any,
    upload_folder: Path | None,
    size: tuple[int, int],
    source: str,
    steps: int,
    progress: Progress,
    threshold: float | None,
) -> tuple[Any, list[str]]:
    """``(latents, notes)``: the uploaded image read at the model's ``size`` and DDIM-inverted with the source
    prompt; the notes: how well the model regenerates it from the inversion (PSNR; a warning first when below
    ``threshold``, the model's in-domain limit, ``None`` when unknown) and its resizing."""
    from diffattn.editing import check_reconstruction, invert

    if upload_folder is None:
        raise DemoInputError("uploads are not enabled in this call")
    image, note = load_upload(upload, upload_folder, size)
    progress(0.1, "inverting the uploaded image")
    latents = invert(pipe, image, source, steps)
    progress(0.3, "checking how well the model reproduces the upload")
    check = check_reconstruction(pipe, image, source, latents, steps, threshold=threshold or 0.0)
    if threshold is None:
        told = f"The model regenerates the upload at {check.psnr:.1f} dB PSNR (no in-domain limit is known for it)."
    elif check.out_of_domain:
        told = f"**{check.message}**"
    else:
        told = f"The model regenerates the upload at {check.psnr:.1f} dB PSNR (in domain: >= {threshold:g} dB)."
    return latents, [told] + ([note] if note else [])


# ----------------------------------------------------------------------------------------------------------------
# Gradio
# ----------------------------------------------------------------------------------------------------------------
def build(models: Models, temp: Path) -> None:
    """The Edit tab's components and its button, inside the app's ``gr.Blocks``; uploads are read from ``temp``."""
    import gradio as gr

    with gr.Tab("Edit", id="edit"):
        about("edit-about", ABOUT)
        with gr.Row():
            inputs, run = _input_column(models)
            outputs = _output_column()
        run.click(
            _on_edit(models, temp),
            inputs,
            outputs,
            api_name="edit",
            concurrency_limit=1,
            concurrency_id=IMAGE_MODEL,
        )


def _input_column(models: Models) -> tuple[list[Any], Any]:
    """The inputs, in the order of :func:`_on_edit`'s parameters, and the Edit button; under the prompts, the
    image model's words and a warning naming unknown ones."""
    import gradio as gr

    with gr.Column():
        prompts = models.image_info.prompts
        e_source = gr.Textbox(prompts.edit_source, label="Source prompt", elem_id="edit-source")
        e_target = gr.Textbox(prompts.edit_target, label="Target prompt (empty: the source)", elem_id="edit-target")
        with gr.Row():
            e_swap = gr.Textbox("", label="Swap word (in the target)", elem_id="edit-swap")
            e_swap_to = gr.Textbox("", label="... for", elem_id="edit-swap-to")
        words_panel("edit-words", models.image_info, [e_source, e_target, e_swap_to])
        with gr.Row():
            e_word = gr.Textbox("", label="Re-weight word (prompt-to-prompt)", elem_id="edit-word")
            e_weight = number_box("Weight", 1.0, 0.0, LIMITS.max_weight, "edit-weight", step=0.1)
        e_method = gr.Radio(list(EDIT_METHODS), value="prompt-to-prompt", label="Method", elem_id="edit-method")
        with gr.Row():
            e_seed = seed_box("edit-seed")
            e_steps = steps_box("edit-steps", 20)
        e_upload = upload_image(
            type="filepath",
            sources=["upload"],
            format="png",
            label=("Optional: an image to invert and edit (PNG / JPEG / WebP, <= 10 MB, <= 2048 px)"),
            elem_id="edit-upload",
            elem_classes=["pixelated"],
        )
        e_run = gr.Button("Edit", variant="primary", elem_id="edit-run")
    return [e_source, e_target, e_swap, e_swap_to, e_word, e_weight, e_method, e_seed, e_steps, e_upload], e_run


def difference_legend() -> str:
    """The Difference image's legend (HTML): the fixed colour scale of :data:`~diffattn_demo.images.DIFFERENCE_STOPS`
    as a bar from 0 to 255 levels, each stop labelled under its place."""
    stops = ", ".join(f"rgb{colour} {100 * level / 255:.2f}%" for level, colour in DIFFERENCE_STOPS)
    ticks = "".join(
        f'<span style="position:absolute;left:{100 * level / 255:.2f}%;transform:translateX(-{100 * level / 255:.0f}%)'
        f'">{level}</span>'
        for level, _ in DIFFERENCE_STOPS
    )
    return (
        '<div class="diff-legend">'
        "<div>Difference: |source &minus; edited| per pixel, the largest of R, G, B, in levels of 255, on one fixed "
        "scale for every image (black: identical).</div>"
        '<div class="diff-legend-bar" style="height:14px;margin-top:4px;'
        f'background:linear-gradient(to right, {stops})"></div>'
        f'<div class="diff-legend-ticks" style="position:relative;height:1.4em">{ticks}</div>'
        "</div>"
    )


def _output_column() -> list[Any]:
    """The source, edited and difference images, the difference's legend and the note."""
    import gradio as gr

    with gr.Column():
        with gr.Row():
            e_out_source = gr.Image(label="Source", elem_id="edit-out-source", **IMAGE_OUT)
            e_out_target = gr.Image(label="Edited", elem_id="edit-out-target", **IMAGE_OUT)
            e_out_diff = gr.Image(label="Difference", elem_id="edit-out-diff", **IMAGE_OUT)
        gr.HTML(difference_legend(), elem_id="edit-diff-legend")
        e_note = gr.Markdown(elem_id="edit-note")
    return [e_out_source, e_out_target, e_out_diff, e_note]


def _on_edit(models: Models, temp: Path) -> Callable[..., tuple]:
    """The Edit button's handler: :func:`run_edit` on the page's values."""
    import gradio as gr

    def on_edit(
        source: str,
        target: str,
        swap: str,
        swap_to: str,
        word: str,
        weight: float,
        method: str,
        seed: Any,
        steps: Any,
        upload: Any,
        progress: Any = gr.Progress(track_tqdm=True),
    ) -> tuple:
        with user_errors():
            out = run_edit(
                models,
                source,
                target,
                method,
                seed,
                steps,
                swap_word=swap,
                swap_to=swap_to,
                reweight_word=word,
                reweight=weight,
                upload=upload,
                upload_folder=temp,
                progress=gradio_progress(progress),
            )
        return out.source, out.target, out.difference, out.note

    return on_edit
