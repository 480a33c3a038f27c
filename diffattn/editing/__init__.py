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
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..adapters import adapter_for
from ..api import Handle, _denoisers, apply, attention_modules
from ..errors import LayoutError
from ..methods.base import AttentionMethod
from ..methods.edit_maps import BLEND_STORE, CROSS_MAPS, BlendStore, CrossMapRecorder
from ..methods.local_blend import LocalBlend
from ..methods.prompt_to_prompt import PromptToPrompt
from ..methods.token_align import REFINE_MAP, align_tokens
from ..runtime import prompt_branches
from ..schedule import LayerSpec, StepSpec
from .callbacks import chain_step_end, refuse_owned
from .erase import erase
from .inversion import (
    Inversion,
    ReconstructionCheck,
    _scheduler,
    check_reconstruction,
    ddim_scheduler,
    invert,
    replay,
)
from .layout import attach_modifiers, layout, layout_method
from .null_text import NullTextConfig, null_text_hook, null_text_invert
from .tokens import check_prompt_to_prompt, find_tokens, refine_map, text_tokenizer, token_indices

__all__ = [
    "LocalBlend",
    "EditResult",
    "edit",
    "default_layers",
    "masactrl_layers",
    "invert",
    "Inversion",
    "null_text_invert",
    "NullTextConfig",
    "replay",
    "check_reconstruction",
    "ReconstructionCheck",
    "ddim_scheduler",
    "token_indices",
    "align_tokens",
    "refine_map",
    "erase",
    "layout",
    "attach_modifiers",
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


#: The order a denoiser runs its top-level blocks in (a UNet's mid block between its down and up blocks, Flux's
#: double-stream blocks before its single-stream ones); module registration order puts ``mid_block`` last.
_RUN_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2, "transformer_blocks": 0, "single_transformer_blocks": 1}


def _run_order_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key of an attention module name in the order the model runs it (numbers compared as numbers)."""
    parts = name.split(".")
    head = (_RUN_ORDER.get(parts[0], 3), 0)
    return (head,) + tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def masactrl_layers(model: Any, method: AttentionMethod, start_layer: int | None = None) -> tuple[str, ...]:
    """The layers MasaCtrl acts on from ``start_layer`` on (default: ``method.start_layer``), counted as its authors
    count them: the attention layers with a role the method acts on (self-attention; joint for SD3 / Flux), in the
    order the denoiser runs them, numbered from 0 (SD1.5: 16, one per transformer block; ``start_layer=10`` is
    ``up_blocks.2`` and ``up_blocks.3``). ``model``: a pipeline or its denoiser."""
    if start_layer is None:
        start_layer = getattr(method, "start_layer", None)
    if isinstance(start_layer, bool) or not isinstance(start_layer, int) or start_layer < 0:
        raise ValueError(f"masactrl_layers: start_layer must be an int >= 0 (MasaCtrl: 10), got {start_layer!r}")
    if not isinstance(model, torch.nn.Module):
        models, _ = _denoisers(model)
        model = models[0]
    model = getattr(model, "_orig_mod", model)
    adapter = adapter_for(model)
    names = [
        n for n, _ in attention_modules(model) if (r := adapter.rule_for(n)) is not None and r.role in method.roles
    ]
    ordered = sorted(names, key=_run_order_key)
    if start_layer >= len(ordered):
        raise ValueError(
            f"{method.name}: start_layer={start_layer}, but the model has {len(ordered)} layers it acts on "
            f"(numbered 0-{len(ordered) - 1} in the order they run); lower start_layer"
        )
    return tuple(re.escape(n) for n in ordered[start_layer:])


def _images(output: Any) -> np.ndarray:
    frames = getattr(output, "frames", None)
    return np.asarray(frames if frames is not None else output.images)


#: What edit() sets in the pipeline call itself, and what to pass instead.
_OWNED = {
    "prompt": "give the prompts as source= and target=",
    "generator": "pass seed= (both prompts start from the same noise: one generator per prompt, seed + copy)",
    "output_type": "the result is numpy arrays (EditResult)",
}


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
    inversion: Inversion | None = None,
    **call_kwargs: Any,
) -> EditResult:
    """Run ``source`` and ``target`` in one call of ``pipe`` with ``method`` applied (``None``: the plain pair).

    ``layers=None``: :func:`default_layers` for methods that act on later layers only (MasaCtrl), else every layer
    whose role the method acts on; ``steps`` as in :func:`diffattn.apply`; ``latents``: the starting
    noise of both branches (one entry), e.g. from :func:`invert` to edit an existing image (the call then runs with
    :func:`ddim_scheduler`, the exact reverse of the inversion). ``inversion``: an :class:`Inversion` (from
    ``invert(..., return_intermediates=True)`` or :func:`null_text_invert`) instead of ``latents``, used whole: its
    noise starts both branches; its ``trajectory`` replaces the source branch's latents at the end of every step
    (MasaCtrl's ``ref_intermediate_latents``: the source side is then the encoded image exactly); its
    ``uncond_embeddings`` go into every prompt's unconditional branch step by step (null-text inversion). The
    source prompt must be the inversion's, the step count its (set when not given), and with null-text embeddings
    the guidance scale the one they were optimised for (set when not given); drop a part with
    ``inversion.without_trajectory()`` / ``without_null_text()``. Other keyword arguments go to the pipeline call
    (``num_inference_steps``, ``guidance_scale``, ``height``, ``width``, ...). A ``callback_on_step_end`` of the
    user's runs after the edit's own (LocalBlend's blending) at every step, gets its outputs and returns what the
    pipeline takes. Everything the edit checks is checked before anything is applied, and whatever it applied is
    removed when it returns or raises.
    """
    refuse_owned(call_kwargs, _OWNED, "edit")
    copies = _copies(call_kwargs)
    if inversion is not None:
        _check_inversion(inversion, source, latents, call_kwargs)
        latents = inversion.latents
    # every check that can refuse the edit runs before anything is applied to the pipeline
    maps = store = pairing = None
    if method is not None:
        if getattr(method, "start_layer", None) is not None:
            if layers is not None:
                raise ValueError(
                    f"edit: {method.name} has start_layer={method.start_layer}, which chooses its layers; give "
                    "start_layer or layers=, not both"
                )
            layers = masactrl_layers(pipe, method)
        if layers is None and getattr(method, "later_layers_only", False):
            models, _ = _denoisers(pipe)
            layers = default_layers(models[0], method)
        words = getattr(method, "mask_words", ())
        if words:  # MasaCtrl's automatic masks: record the words' cross-attention maps on every layer
            blend = LocalBlend(words=words, threshold=method.mask_threshold, max_tokens=method.mask_max_tokens)
            rule = "masactrl" if method.faithful else "diffattn"
            _refuse_video(pipe, f"{method.name}(mask_words={words!r})", f"{method.name} without mask_words")
            maps = _blend_store(pipe, source, target, blend, call_kwargs, each_prompt=True, rule=rule)
        if getattr(method, "local_blend", None) is not None:
            _refuse_video(pipe, f"{method.name}(local_blend=...)", f"{method.name} without local_blend")
            store = _blend_store(pipe, source, target, method.local_blend, call_kwargs)
        if isinstance(method, PromptToPrompt):
            check_prompt_to_prompt(pipe, source, target, method)
            if method.mode == "refine":
                pairing = refine_map(pipe, source, target)
    # the same noise for both prompts (copy c of each prompt: seed + c)
    generators = [torch.Generator().manual_seed(seed + c) for _ in range(2) for c in range(copies)]
    replay = contextlib.nullcontext()
    if latents is not None:
        if latents.ndim < 2 or latents.shape[0] != 1:
            raise ValueError(
                f"edit: latents must hold one entry (batch 1, as invert() returns), got shape {tuple(latents.shape)}; "
                "both prompts and every copy start from it"
            )
        call_kwargs["latents"] = latents.expand(2 * copies, *latents.shape[1:]).clone()
        replay = _scheduler(pipe, ddim_scheduler(pipe))
    own_steps = []  # step-end callbacks of the edit, in order: the source's trajectory, then LocalBlend (from it)
    if inversion is not None and inversion.trajectory is not None:
        own_steps.append(_trajectory_step(inversion.trajectory, copies))
    if store is not None:
        own_steps.append(_blend_step(store, copies))
    if own_steps:
        call_kwargs.update(chain_step_end(call_kwargs, _in_order(own_steps)))
    handles: list[Handle | torch.utils.hooks.RemovableHandle] = []
    maps_token, store_token, pairing_token = CROSS_MAPS.set(maps), BLEND_STORE.set(store), REFINE_MAP.set(pairing)
    try:
        if method is not None:
            handles.append(apply(pipe, method, layers=layers, steps=steps))
            if maps is not None:
                handles.append(apply(pipe, CrossMapRecorder()))
        if inversion is not None and inversion.uncond_embeddings is not None:
            handles.append(null_text_hook(pipe, inversion))
        with prompt_branches(("source", "target")), replay:
            output = pipe(prompt=[source, target], generator=generators, output_type="np", **call_kwargs)
    finally:
        REFINE_MAP.reset(pairing_token)
        BLEND_STORE.reset(store_token)
        CROSS_MAPS.reset(maps_token)
        for handle in reversed(handles):
            handle.remove()
    images = _images(output)
    if copies == 1:
        return EditResult(source=images[0], target=images[1])
    return EditResult(source=images[:copies], target=images[copies:])


def _check_inversion(
    inversion: Inversion, source: str, latents: torch.Tensor | None, call_kwargs: dict[str, Any]
) -> None:
    """Refuse an inversion the edit cannot use as it is, and set the step count (and, with null-text embeddings,
    the guidance scale) it fixes when the call does not give them."""
    if not isinstance(inversion, Inversion):
        raise TypeError(
            f"edit: inversion= takes an Inversion (invert(..., return_intermediates=True) or null_text_invert), got "
            f"{type(inversion).__name__}; pass inverted noise alone as latents="
        )
    if latents is not None:
        raise ValueError("edit: give latents= or inversion= (which holds its latents), not both")
    if source != inversion.prompt:
        raise ValueError(
            f"edit: the image was inverted with the prompt {inversion.prompt!r}, but the source prompt is {source!r}; "
            "pass source=inversion.prompt (or invert with the source prompt)"
        )
    steps = call_kwargs.setdefault("num_inference_steps", inversion.num_inference_steps)
    if steps != inversion.num_inference_steps:
        raise ValueError(
            f"edit: the inversion has {inversion.num_inference_steps} steps, the call num_inference_steps={steps}; "
            "run the edit with the inversion's step count"
        )
    if inversion.uncond_embeddings is not None:
        scale = call_kwargs.setdefault("guidance_scale", inversion.guidance_scale)
        if scale != inversion.guidance_scale:
            raise ValueError(
                f"edit: the null-text embeddings were optimised for guidance_scale={inversion.guidance_scale}, the "
                f"call has {scale}; use that scale, or inversion.without_null_text()"
            )
    if call_kwargs.get("timesteps") is not None or call_kwargs.get("sigmas") is not None:
        raise ValueError("edit: an inversion fixes the timesteps (its DDIM schedule); do not pass timesteps= / sigmas=")


def _trajectory_step(trajectory: tuple[torch.Tensor, ...], copies: int) -> Callable[..., dict[str, Any]]:
    """The step-end callback that sets the source copies' latents (the first ``copies`` entries) to the inversion's
    latent of the step."""

    def step_end(_pipe: Any, i: int, _t: Any, outputs: dict[str, Any]) -> dict[str, Any]:
        if not 0 <= i < len(trajectory):
            raise LayoutError(
                f"edit: step {i} of the loop, but the inversion has {len(trajectory)} steps; run the edit with "
                f"num_inference_steps={len(trajectory)} and a scheduler that takes one model call per step (DDIM)"
            )
        latents = outputs["latents"]
        latents[:copies] = trajectory[i].to(latents)
        outputs["latents"] = latents
        return outputs

    return step_end


def _in_order(steps: list[Callable[..., dict[str, Any]]]) -> Callable[..., dict[str, Any]]:
    def step_end(pipe: Any, i: int, t: Any, outputs: dict[str, Any]) -> dict[str, Any]:
        for own in steps:
            outputs = own(pipe, i, t, outputs)
        return outputs

    return step_end


def _copies(call_kwargs: dict[str, Any]) -> int:
    copies = call_kwargs.get("num_images_per_prompt", 1)
    if copies is None:
        return 1
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"edit: num_images_per_prompt must be an int >= 1, got {copies!r}")
    return copies


def _words_tokens(pipe: Any, prompt: str, words: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """Each word's token indices in ``prompt``'s text sequence (empty: not there)."""
    tokenizer = text_tokenizer(pipe)
    ids = list(tokenizer(prompt).input_ids)
    limit = getattr(tokenizer, "model_max_length", None)
    out: dict[str, tuple[int, ...]] = {}
    for word in words:
        found = find_tokens(tokenizer, ids, word) or ()
        out[word] = tuple(t for t in found if not isinstance(limit, int) or t < limit)  # past the cut: not seen
    return out


def _refuse_video(pipe: Any, owner: str, instead: str) -> None:
    """Word masks (LocalBlend, MasaCtrl's automatic masks) are made and applied on one image's 2-D latent grid; a
    pipeline whose call takes ``num_frames`` makes videos, whose latents have a frame axis the masks do not have."""
    if "num_frames" in inspect.signature(type(pipe).__call__).parameters:
        raise ValueError(
            f"edit: {owner} makes its word masks on an image's 2-D latent grid, but {type(pipe).__name__} makes "
            f"videos (its call takes num_frames), and masks over frames are not supported; run {instead}"
        )


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


def _blend_store(
    pipe: Any,
    source: str,
    target: str,
    blend: LocalBlend,
    call_kwargs: dict[str, Any],
    *,
    each_prompt: bool = False,
    rule: str | None = None,
) -> BlendStore:
    """The store of ``blend``'s word maps. Every word must be in its prompt (words of both prompts: in either), and
    with ``each_prompt`` (MasaCtrl's masks of the object in each image) each prompt must hold one of its words."""
    source_words, target_words = blend.split()
    in_source, in_target = _words_tokens(pipe, source, source_words), _words_tokens(pipe, target, target_words)
    tokens = {
        "source": tuple(t for w in source_words for t in in_source[w]),
        "target": tuple(t for w in target_words for t in in_target[w]),
    }
    if not tokens["source"] and not tokens["target"]:
        raise ValueError(
            f"none of the words {blend.words} is in {source!r} or {target!r}; name words of the "
            "prompts (the object: LocalBlend's region that may change, MasaCtrl's mask_words)"
        )
    if source_words == target_words:
        missing = [w for w in source_words if not in_source[w] and not in_target[w]]
    else:
        missing = [w for w in source_words if not in_source[w]] + [w for w in target_words if not in_target[w]]
    if missing:
        raise ValueError(
            f"the words {missing} are not in their prompt ({source!r} -> {target!r}); every word of LocalBlend's "
            f"words / MasaCtrl's mask_words ({blend.words}) must be one of the prompt's (check the spelling)"
        )
    if each_prompt and not (tokens["source"] and tokens["target"]):
        branch, prompt = ("source", source) if not tokens["source"] else ("target", target)
        raise ValueError(
            f"MutualSelfAttention: mask_words {blend.words} must name the object in each prompt (its mask in the "
            f"source and in the target image), but none is in the {branch} {prompt!r}; give (source_words, "
            "target_words)"
        )
    return BlendStore(tokens, _latent_grid(pipe, call_kwargs), blend, rule)


def _blend_step(store: BlendStore, copies: int, steps: int | None = None) -> Callable[..., dict[str, Any]]:
    """The step-end callback of LocalBlend: target latents <- source + mask * (target - source) from the start step
    on (the latents are ``[source copies..., target copies...]``; Flux's are packed ``(batch, tokens, channels)``).
    ``steps``: the number of steps of the loop; None: the running call's, as its attention calls saw it (Heun's
    2n - 1 calls, a pipeline's own default step count)."""

    def step_end(_pipe: Any, i: int, _t: Any, outputs: dict[str, Any]) -> dict[str, Any]:
        total = steps if steps is not None else store.num_steps
        if total is None:
            raise LayoutError(
                f"LocalBlend: step {i} ran no cross-attention call of PromptToPrompt, whose maps it blends by; "
                "apply PromptToPrompt to cross- or joint-attention layers (layers=..., steps=...)"
            )
        if not store.blend.starts_at(i, total):
            return outputs
        latents = outputs["latents"]
        for c in range(copies):
            mask = store.mask(c)
            if mask is None:
                raise store.no_maps_error("LocalBlend")
            m = mask.to(latents.device)
            m = m.flatten()[:, None] if latents.ndim == 3 else m[None]
            latents[copies + c] = torch.where(m, latents[copies + c], latents[c])  # = src + m (tgt - src), exact
        outputs["latents"] = latents
        return outputs

    return step_end
