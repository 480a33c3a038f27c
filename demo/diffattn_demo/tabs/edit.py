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
    check_cfg,
    check_number,
    check_seed,
    check_steps,
    check_whole,
    check_words,
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
    step_label,
    steps_box,
    upload_image,
    user_errors,
    words_panel,
)

__all__ = ["EDIT_METHODS", "P2P_MODES", "EditControls", "EditOutput", "run_edit", "difference_legend", "build"]

ABOUT = (
    "**Prompt-to-prompt** (Hertz et al., 2022) re-uses the source's cross-attention maps while a word is swapped, "
    "added or re-weighted; **MasaCtrl** (Cao et al., 2023) lets the target's self-attention read the source's keys "
    "and values, so the look stays. *Target without control* is the target prompt from the same noise with no edit: "
    "what the method adds. An upload is DDIM-inverted first."
)

EDIT_METHODS = ("prompt-to-prompt", "MasaCtrl")
P2P_MODES = ("replace", "refine")
DECODER = "the decoder"  # MasaCtrl's start layer choice meaning diffattn's default: the UNet's up blocks


@dataclass(frozen=True)
class EditControls:
    """The authors' controls of the Edit tab: the CFG scale; prompt-to-prompt's ``mode`` (replace: a word swapped
    for one; refine: words added), the fractions of the steps whose cross- and self-attention come from the source,
    and the words whose region alone may change (LocalBlend; empty: everywhere); MasaCtrl's first controlled step
    (``None``: a fifth of the steps, at most 4) and first controlled layer (``None``: the decoder)."""

    cfg: Any = CFG
    mode: str = "replace"
    cross_replace: Any = 0.8
    self_replace: Any = 0.4
    blend_words: Any = ""
    start_step: Any = None
    start_layer: Any = None


@dataclass(frozen=True)
class EditOutput:
    source: np.ndarray  # uint8, enlarged
    target: np.ndarray
    plain: np.ndarray  # the target prompt from the same noise without the edit
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
    controls: EditControls = EditControls(),
    progress: Progress = no_progress,
) -> EditOutput:
    """Edit tab: the source prompt's image and the target prompt's edit of it, from the same noise, with
    prompt-to-prompt (word swap, refinement, re-weight, local blend) or MasaCtrl, and the target prompt from that noise
    without the edit; with an uploaded image, its DDIM inversion replaces the noise. An empty target prompt means the
    source prompt (with the swap applied, if one is given)."""
    from diffattn.editing import edit

    seed, steps = check_seed(seed), check_steps(steps)
    if method not in EDIT_METHODS:
        raise DemoInputError(f"method must be one of {', '.join(EDIT_METHODS)}, got {method!r}")
    reweight = check_number(reweight, "the re-weight factor", 0.0, LIMITS.max_weight)
    cfg = check_cfg(controls.cfg)
    start = time.perf_counter()
    with models.image(progress) as pipe:
        source, target, notes = _edit_prompts(pipe, source, target, swap_word, swap_to)
        warning = vocabulary_warning([source, target], models.image_info.vocabulary)
        method_obj, told = _edit_method(pipe, method, source, target, steps, reweight_word, reweight, controls)
        size = image_size(pipe)
        latents = None
        if upload is not None:
            latents, upload_notes = _invert_upload(
                pipe, upload, upload_folder, size, source, steps, progress, models.inversion_threshold()
            )
            notes = upload_notes + notes
        progress(0.5 if latents is not None else 0.1, f"1 of 2: {method}")
        try:
            with step_label(pipe, f"1 of 2: {method}"):
                result = edit(
                    pipe,
                    source,
                    target,
                    method_obj,
                    seed=seed,
                    latents=latents,
                    num_inference_steps=steps,
                    guidance_scale=cfg,
                )
        except ValueError as error:  # a word the edit needs is not in the prompts, a layer out of range: it says
            raise DemoInputError(str(error)) from None
        progress(0.75 if latents is not None else 0.55, "2 of 2: the target prompt without the edit")
        plain = edit(
            pipe, source, target, None, seed=seed, latents=latents, num_inference_steps=steps, guidance_scale=cfg
        )
    a, b, c = to_uint8(result.source), to_uint8(result.target), to_uint8(plain.target)
    factor = display_factor(a.shape[:2])
    seconds = time.perf_counter() - start
    notes.append(
        f'{method} ({told}): "{source}" -> "{target}", seed {seed}, {steps} steps, CFG {cfg:g}'
        f"{' from the inverted upload' if latents is not None else ''}, {seconds:.1f} s for the edit and the target "
        f"without it; largest difference to the source {int(difference_levels(a, b).max())} levels of 255 "
        f"(without the edit: {int(difference_levels(a, c).max())})."
    )
    if warning:
        notes.insert(0, warning)
    return EditOutput(
        enlarge(a, factor),
        enlarge(b, factor),
        enlarge(c, factor),
        enlarge(difference_map(a, b), factor),
        " ".join(notes),
        seconds,
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
    pipe: Any,
    method: str,
    source: str,
    target: str,
    steps: int,
    reweight_word: str,
    reweight: float,
    controls: EditControls,
) -> tuple[Any, str]:
    """``(method, told)``: the diffattn method of the edit with the tab's controls, and the controls in words for
    the note. Prompt-to-prompt: prompts of equal token count when replacing, the re-weighted word found in the target;
    MasaCtrl: its start step and layer."""
    import diffattn
    from diffattn.editing import masactrl_layers, token_indices

    if method == "prompt-to-prompt":
        if controls.mode not in P2P_MODES:
            raise DemoInputError(
                f"the prompt-to-prompt mode must be one of {', '.join(P2P_MODES)}, got {controls.mode!r}"
            )
        cross = check_number(controls.cross_replace, "the cross-attention replace fraction", 0.0, 1.0)
        self_ = check_number(controls.self_replace, "the self-attention replace fraction", 0.0, 1.0)
        blend = check_words(controls.blend_words, "the words to blend")
        n_source, n_target = len(pipe.tokenizer(source).input_ids), len(pipe.tokenizer(target).input_ids)
        if controls.mode == "replace" and n_source != n_target:
            raise DemoInputError(
                f"prompt-to-prompt's replace mode needs prompts of equal token count (source {n_source}, target "
                f"{n_target}): swap one word for one word, choose the refine mode to add words, or use MasaCtrl"
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
        local = diffattn.LocalBlend(words=blend) if blend else None
        told = f"{controls.mode}, cross-attention from the source for {cross:g} of the steps, self-attention {self_:g}"
        told += f", only the region of {', '.join(blend)} may change" if blend else ""
        obj = diffattn.PromptToPrompt(
            cross_replace=cross, self_replace=self_, reweight=reweights, local_blend=local, mode=controls.mode
        )
        return obj, told
    start_step = min(4, max(steps // 5, 0)) if controls.start_step in (None, "") else controls.start_step
    start_step = check_whole(start_step, "MasaCtrl's start step", 0, steps - 1)
    start_layer = None
    if controls.start_layer not in (None, "", DECODER):
        count = len(masactrl_layers(pipe, diffattn.MutualSelfAttention(), start_layer=0))
        start_layer = check_whole(controls.start_layer, "MasaCtrl's start layer", 0, count - 1)
    told = f"from step {start_step}, " + ("the decoder's layers" if start_layer is None else f"layers {start_layer} on")
    return diffattn.MutualSelfAttention(start_step=start_step, start_layer=start_layer), told


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
        _examples(models, inputs)
        run.click(
            _on_edit(models, temp),
            inputs,
            outputs,
            api_name="edit",
            concurrency_limit=1,
            concurrency_id=IMAGE_MODEL,
        )


def _input_column(models: Models) -> tuple[list[Any], Any]:
    """The inputs, in the order of :func:`_on_edit`'s parameters, and the Edit button (right under the prompts);
    the image model's words and a warning naming unknown ones; the authors' controls in two folds; an Examples
    gallery that fills the inputs."""
    import gradio as gr

    layers = models.structure().self_attention_layers
    with gr.Column():
        prompts = models.image_info.prompts
        e_source = gr.Textbox(prompts.edit_source, label="Source prompt", elem_id="edit-source")
        e_target = gr.Textbox(prompts.edit_target, label="Target prompt (empty: the source)", elem_id="edit-target")
        with gr.Row():
            e_method = gr.Radio(list(EDIT_METHODS), value="prompt-to-prompt", label="Method", elem_id="edit-method")
            e_run = gr.Button("Edit", variant="primary", elem_id="edit-run")
        words_panel("edit-words", models.image_info, [e_source, e_target])
        with gr.Row():
            e_seed = seed_box("edit-seed")
            e_steps = steps_box("edit-steps", 20)
            e_cfg = number_box("CFG scale", CFG, 1.0, LIMITS.max_cfg, "edit-cfg", step=0.5)
        with gr.Accordion("Prompt-to-prompt controls", open=False, elem_id="edit-p2p-controls"):
            e_mode = gr.Radio(
                list(P2P_MODES),
                value="replace",
                label="Mode: replace swaps a word for one; refine adds words ('a circle' -> 'a striped circle')",
                elem_id="edit-mode",
            )
            with gr.Row():
                e_cross = number_box("Cross-attention from the source, fraction of steps", 0.8, 0, 1, "edit-cross", 0.1)
                e_self = number_box("Self-attention from the source, fraction of steps", 0.4, 0, 1, "edit-self", 0.1)
            e_blend = gr.Textbox(
                "", label="Local blend: only these words' region may change (empty: everywhere)", elem_id="edit-blend"
            )
            with gr.Row():
                e_swap = gr.Textbox("", label="Swap word (in the target)", elem_id="edit-swap")
                e_swap_to = gr.Textbox("", label="... for", elem_id="edit-swap-to")
            with gr.Row():
                e_word = gr.Textbox("", label="Re-weight word", elem_id="edit-word")
                e_weight = number_box("Weight", 1.0, 0.0, LIMITS.max_weight, "edit-weight", step=0.1)
        with gr.Accordion("MasaCtrl controls", open=False, elem_id="edit-masactrl-controls"):
            with gr.Row():
                e_start_step = number_box("Start step (MasaCtrl: 4)", 4, 0, LIMITS.max_steps - 1, "edit-start-step")
                e_start_layer = gr.Dropdown(
                    [DECODER, *(str(i) for i in range(layers))],
                    value=DECODER,
                    label=f"Start layer (of {layers}, in the order they run)",
                    elem_id="edit-start-layer",
                )
        e_upload = upload_image(
            type="filepath",
            sources=["upload"],
            format="png",
            label=("Optional: an image to invert and edit (PNG / JPEG / WebP, <= 10 MB, <= 2048 px)"),
            elem_id="edit-upload",
            elem_classes=["pixelated"],
        )
    inputs = [
        e_source,
        e_target,
        e_swap,
        e_swap_to,
        e_word,
        e_weight,
        e_method,
        e_seed,
        e_steps,
        e_upload,
        e_cfg,
        e_mode,
        e_cross,
        e_self,
        e_blend,
        e_start_step,
        e_start_layer,
    ]
    return inputs, e_run


def _examples(models: Models, inputs: list[Any]) -> None:
    """The Examples gallery under the tab, full width: clicking one fills the prompts, the method and its main
    control (``inputs`` in the order of :func:`_on_edit`'s parameters)."""
    import gradio as gr

    examples = models.image_info.prompts.edit_examples
    if not examples:
        return
    source, target, _swap, _swap_to, word, weight, method, _seed, _steps, _upload, _cfg, mode, _x, _s, blend, *_ = (
        inputs
    )
    gr.Examples(
        [[e.source, e.target, e.method, e.mode, e.reweight_word, e.reweight, e.blend_words] for e in examples],
        [source, target, method, mode, word, weight, blend],
        label="Examples (click one to fill the inputs, then Edit)",
        elem_id="edit-examples",
    )


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
    """The source, edited, plain target and difference images, the difference's legend and the note."""
    import gradio as gr

    with gr.Column():
        with gr.Row():
            e_out_source = gr.Image(label="Source", elem_id="edit-out-source", **IMAGE_OUT)
            e_out_target = gr.Image(label="Edited", elem_id="edit-out-target", **IMAGE_OUT)
        with gr.Row():
            e_out_plain = gr.Image(label="Target without control", elem_id="edit-out-plain", **IMAGE_OUT)
            e_out_diff = gr.Image(label="Difference: source vs edited", elem_id="edit-out-diff", **IMAGE_OUT)
        gr.HTML(difference_legend(), elem_id="edit-diff-legend")
        e_note = gr.Markdown(elem_id="edit-note")
    return [e_out_source, e_out_target, e_out_plain, e_out_diff, e_note]


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
        cfg: Any = CFG,
        mode: str = "replace",
        cross_replace: Any = 0.8,
        self_replace: Any = 0.4,
        blend_words: str = "",
        start_step: Any = None,
        start_layer: Any = None,
        progress: Any = gr.Progress(track_tqdm=True),
    ) -> tuple:
        controls = EditControls(cfg, mode, cross_replace, self_replace, blend_words, start_step, start_layer)
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
                controls=controls,
                progress=gradio_progress(progress),
            )
        return out.source, out.target, out.plain, out.difference, out.note

    return on_edit
