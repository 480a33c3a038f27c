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
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..adapters import adapter_for
from ..api import _denoisers, apply, attention_modules
from ..methods.base import AttentionMethod
from ..schedule import LayerSpec, StepSpec
from ..steps import prompt_branches
from .erase import erase
from .inversion import _scheduler, ddim_scheduler, invert

__all__ = ["EditResult", "edit", "default_layers", "invert", "ddim_scheduler", "token_indices", "erase"]


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
    names = [n for n, _ in attention_modules(model) if (r := adapter.rule_for(n)) is not None and r.role in method.roles]
    blocks = sorted({m.group(0) for n in names if (m := re.match(r"(?:single_)?(?:transformer_)?blocks\.\d+", n))},
                    key=lambda b: (b.startswith("single_"), int(b.rsplit(".", 1)[1])))
    later = blocks[len(blocks) // 2:] or blocks
    return tuple(re.escape(b) for b in later)  # whole name parts: transformer_blocks.1 is not single_…blocks.1


def token_indices(pipe: Any, prompt: str, word: str) -> tuple[int, ...]:
    """The indices (BOS = 0) of the tokens of ``word`` in ``prompt`` as the pipeline's (first) tokenizer splits it,
    for :class:`~diffattn.PromptToPrompt`'s ``reweight``."""
    tokenizer = pipe.tokenizer
    ids = tokenizer(prompt).input_ids
    word_ids = tokenizer(word, add_special_tokens=False).input_ids
    for start in range(len(ids) - len(word_ids) + 1):
        if ids[start:start + len(word_ids)] == word_ids:
            return tuple(range(start, start + len(word_ids)))
    raise ValueError(f"{word!r} is not a run of tokens of {prompt!r} for this tokenizer (tokens: {ids})")


def _images(output: Any) -> np.ndarray:
    frames = getattr(output, "frames", None)
    return np.asarray(frames if frames is not None else output.images)


def edit(pipe: Any, source: str, target: str, method: AttentionMethod | None, *, seed: int = 0,
         layers: LayerSpec = None, steps: StepSpec = None, latents: torch.Tensor | None = None,
         **call_kwargs: Any) -> EditResult:
    """Run ``source`` and ``target`` in one call of ``pipe`` with ``method`` applied (``None``: the plain pair).

    ``layers=None``: :func:`default_layers` for methods that act on later layers only (MasaCtrl), else every layer
    whose role the method acts on; ``steps`` as in :func:`diffattn.apply`; ``latents``: the starting
    noise of both branches, e.g. from :func:`invert` to edit an existing image (the call then runs with
    :func:`ddim_scheduler`, the exact reverse of the inversion); other keyword arguments go to the pipeline call
    (``num_inference_steps``, ``guidance_scale``, ``height``, ``width``, ...).
    """
    handle = None
    if method is not None:
        if layers is None and getattr(method, "later_layers_only", False):
            models, _ = _denoisers(pipe)
            layers = default_layers(models[0], method)
        handle = apply(pipe, method, layers=layers, steps=steps)
    try:
        copies = int(call_kwargs.get("num_images_per_prompt", 1))
        # the same noise for both prompts (copy c of each prompt: seed + c)
        generators = [torch.Generator().manual_seed(seed + c) for _ in range(2) for c in range(copies)]
        replay = contextlib.nullcontext()
        if latents is not None:
            call_kwargs["latents"] = latents.expand(2 * copies, *latents.shape[1:]).clone()
            replay = _scheduler(pipe, ddim_scheduler(pipe))
        with prompt_branches(("source", "target")), replay:
            output = pipe(prompt=[source, target], generator=generators, output_type="np", **call_kwargs)
    finally:
        if handle is not None:
            handle.remove()
    images = _images(output)
    if copies == 1:
        return EditResult(source=images[0], target=images[1])
    return EditResult(source=images[:copies], target=images[copies:])
