"""Editing with attention: a source and a target prompt in one pipeline call, the method making the target borrow
from the source inside attention.

    result = diffattn.editing.edit(pipe, source="a red circle on the left", target="a red circle on the right",
                                   method=diffattn.MutualSelfAttention(start_step=4), seed=0)
    result.source, result.target        # numpy images (or video frames)

Both prompts start from the same noise (one generator per prompt, same seed) and run as one batch of the standard
pipeline; each batch entry's branch reaches methods as ``ctx.branches`` (``"source"`` / ``"target"``), CFG halves
and ``num_images_per_prompt`` copies included. ``method=None`` runs the plain pair (the baseline).
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..adapters import adapter_for
from ..api import _denoisers, apply, attention_modules
from ..methods.base import AttentionMethod
from ..methods.edit_maps import BLEND_STORE, CROSS_MAPS, BlendStore, CrossMapRecorder
from ..methods.local_blend import LocalBlend
from ..runtime import prompt_branches
from ..schedule import LayerSpec, StepSpec
from .erase import erase
from .inversion import _scheduler, ddim_scheduler, invert
from .layout import layout, layout_method

__all__ = [
    "LocalBlend",
    "EditResult",
    "edit",
    "default_layers",
    "invert",
    "ddim_scheduler",
    "token_indices",
    "erase",
    "layout",
    "layout_method",
]


@dataclass(frozen=True)
class EditResult:
    """The source and target outputs of one edit, as numpy arrays (images ``(H, W, 3)``, videos ``(F, H, W, 3)``;
    with ``num_images_per_prompt=n > 1`` a leading axis of n)."""

    source: np.ndarray
    target: np.ndarray


def default_layers(model: torch.nn.Module, method: AttentionMethod) -> tuple[str, ...]:
    """Where editing acts by default: a UNet's decoder (``up_blocks``, MasaCtrl's choice); for transformers the later
    half of the blocks whose attention has a role the method acts on."""
    model = getattr(model, "_orig_mod", model)
    adapter = adapter_for(model)
    if adapter.family == "unet":
        return ("up_blocks",)
    names = [
        n for n, _ in attention_modules(model) if (r := adapter.rule_for(n)) is not None and r.role in method.roles
    ]
    blocks = sorted(
        {m.group(0) for n in names if (m := re.match(r"(?:single_)?(?:transformer_)?blocks\.\d+", n))},
        key=lambda b: (b.startswith("single_"), int(b.rsplit(".", 1)[1])),
    )
    later = blocks[len(blocks) // 2 :] or blocks
    return tuple(re.escape(b) for b in later)  # whole name parts: transformer_blocks.1 is not single_…blocks.1


def token_indices(pipe: Any, prompt: str, word: str) -> tuple[int, ...]:
    """The indices (BOS = 0) of the tokens of ``word`` in ``prompt`` as the pipeline's (first) tokenizer splits it,
    for :class:`~diffattn.PromptToPrompt`'s ``reweight``."""
    tokenizer = pipe.tokenizer
    ids = tokenizer(prompt).input_ids
    word_ids = tokenizer(word, add_special_tokens=False).input_ids
    for start in range(len(ids) - len(word_ids) + 1):
        if ids[start : start + len(word_ids)] == word_ids:
            return tuple(range(start, start + len(word_ids)))
    raise ValueError(f"{word!r} is not a run of tokens of {prompt!r} for this tokenizer (tokens: {ids})")


def _images(output: Any) -> np.ndarray:
    frames = getattr(output, "frames", None)
    return np.asarray(frames if frames is not None else output.images)


def edit(
    pipe: Any,
    source: str,
    target: str,
    method: AttentionMethod | None,
    *,
    seed: int = 0,
    layers: LayerSpec = None,
    steps: StepSpec = None,
    latents: torch.Tensor | None = None,
    **call_kwargs: Any,
) -> EditResult:
    """Run ``source`` and ``target`` in one call of ``pipe`` with ``method`` applied (``None``: the plain pair).

    ``layers=None``: :func:`default_layers` for methods that act on later layers only (MasaCtrl), else every layer
    whose role the method acts on; ``steps`` as in :func:`diffattn.apply`; ``latents``: the starting
    noise of both branches, e.g. from :func:`invert` to edit an existing image (the call then runs with
    :func:`ddim_scheduler`, the exact reverse of the inversion); other keyword arguments go to the pipeline call
    (``num_inference_steps``, ``guidance_scale``, ``height``, ``width``, ...).
    """
    handle = recorder = None
    maps = None
    if method is not None:
        if layers is None and getattr(method, "later_layers_only", False):
            models, _ = _denoisers(pipe)
            layers = default_layers(models[0], method)
        handle = apply(pipe, method, layers=layers, steps=steps)
        words = getattr(method, "mask_words", ())
        if words:  # MasaCtrl's automatic masks: record the words' cross-attention maps on every layer
            maps = _blend_store(
                pipe, source, target, LocalBlend(words=words, threshold=method.mask_threshold), call_kwargs
            )
            recorder = apply(pipe, CrossMapRecorder())
    maps_token = CROSS_MAPS.set(maps)
    try:
        copies = int(call_kwargs.get("num_images_per_prompt", 1))
        # the same noise for both prompts (copy c of each prompt: seed + c)
        generators = [torch.Generator().manual_seed(seed + c) for _ in range(2) for c in range(copies)]
        replay = contextlib.nullcontext()
        if latents is not None:
            call_kwargs["latents"] = latents.expand(2 * copies, *latents.shape[1:]).clone()
            replay = _scheduler(pipe, ddim_scheduler(pipe))
        blend = getattr(method, "local_blend", None)
        store = None
        if blend is not None:
            store = _blend_store(pipe, source, target, blend, call_kwargs)
            call_kwargs["callback_on_step_end"] = _blend_step(
                store, copies, int(call_kwargs.get("num_inference_steps", 50))
            )
            call_kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
        token = BLEND_STORE.set(store)
        try:
            with prompt_branches(("source", "target")), replay:
                output = pipe(prompt=[source, target], generator=generators, output_type="np", **call_kwargs)
        finally:
            BLEND_STORE.reset(token)
    finally:
        CROSS_MAPS.reset(maps_token)
        for h in (recorder, handle):
            if h is not None:
                h.remove()
    images = _images(output)
    if copies == 1:
        return EditResult(source=images[0], target=images[1])
    return EditResult(source=images[:copies], target=images[copies:])


def _words_tokens(pipe: Any, prompt: str, words: tuple[str, ...]) -> tuple[int, ...]:
    found: list[int] = []
    for word in words:
        with contextlib.suppress(ValueError):
            found.extend(token_indices(pipe, prompt, word))
    return tuple(found)


def _latent_grid(pipe: Any, call_kwargs: dict[str, Any]) -> tuple[int, int]:
    """The (rows, columns) of the latents the pipeline's loop updates (Flux: its packed 2 x 2 patches)."""
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    default = getattr(pipe, "default_sample_size", None)
    if default is None:
        default = pipe.unet.config.sample_size
    height = int(call_kwargs.get("height") or default * factor)
    width = int(call_kwargs.get("width") or default * factor)
    packed = 2 if type(pipe).__name__.startswith("Flux") else 1
    return height // (factor * packed), width // (factor * packed)


def _blend_store(pipe: Any, source: str, target: str, blend: LocalBlend, call_kwargs: dict[str, Any]) -> BlendStore:
    source_words, target_words = blend.split()
    tokens = {"source": _words_tokens(pipe, source, source_words), "target": _words_tokens(pipe, target, target_words)}
    if not tokens["source"] and not tokens["target"]:
        raise ValueError(
            f"none of the words {blend.words} is in {source!r} or {target!r}; name words of the "
            "prompts (the object: LocalBlend's region that may change, MasaCtrl's mask_words)"
        )
    return BlendStore(tokens, _latent_grid(pipe, call_kwargs), blend)


def _blend_step(store: BlendStore, copies: int, steps: int):
    """The step-end callback of LocalBlend: target latents <- source + mask * (target - source) from the start step
    on (the latents are ``[source copies..., target copies...]``; Flux's are packed ``(batch, tokens, channels)``)."""
    start = math.ceil(store.blend.start * steps - 1e-9)

    def step_end(_pipe: Any, i: int, _t: Any, outputs: dict[str, Any]) -> dict[str, Any]:
        if i + 1 < start:
            return outputs
        latents = outputs["latents"]
        for c in range(copies):
            mask = store.mask(c)
            if mask is None:
                continue
            m = mask.to(latents.device)
            m = m.flatten()[:, None] if latents.ndim == 3 else m[None]
            latents[copies + c] = torch.where(m, latents[copies + c], latents[c])  # = src + m (tgt - src), exact
        outputs["latents"] = latents
        return outputs

    return step_end
