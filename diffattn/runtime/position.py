"""Where the denoising loop is: the step index and the number of steps that will actually run, per model call.

Sources, first that answers wins:

1. :func:`denoising_step` — a custom loop says it (``with diffattn.denoising_step(i, len(timesteps)): model(...)``);
2. the cache context a pipeline opens around the call (``model.cache_context("cond", step_index=i,
   num_inference_steps=n)``, as Wan's pipeline does);
3. the loop of the diffusers pipeline whose ``__call__`` is running this model: its loop index ``i`` and the
   ``timesteps`` it iterates (already cut by img2img ``strength``), read from that frame of the call stack, and used
   only when it agrees with the call: the timestep the model receives must be the loop's ``timesteps[i]`` (the
   nearest of the loop's timesteps). A custom loop whose index is not ``i``, or a stale ``i`` left by an earlier
   loop, fails that check and leaves the step unknown. Nothing is patched; the step is the loop's own index, so
   repeated timesteps (DPM++ with Karras sigmas), img2img and Wan 2.2's two transformers (one loop, one global
   step) are all exact;
4. otherwise the step is unknown, and a method or ``steps=`` selection that needs it raises
   :class:`~diffattn.errors.StepSelectionError` saying how to declare it.

The pipeline found in (3) is also where per-call facts such as ``do_classifier_free_guidance`` are read, so a
denoiser shared by two pipelines takes them from the one that is running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["LoopPosition", "denoising_step", "loop_position", "prompt_branches", "declared_branches"]

_LOCAL = threading.local()


@dataclass(frozen=True)
class LoopPosition:
    """``step`` (0-based) of ``num_steps`` that will run; ``timestep``: the scheduler's timestep at this step (its own
    scale, 0..1000 for diffusers' schedulers) when known; ``timesteps``: the whole loop's, when known;
    ``pipeline``: the running pipeline, when found."""

    step: int | None
    num_steps: int | None
    timestep: float | None = None
    timesteps: tuple[float, ...] | None = None
    pipeline: Any = None
    source: str = "unknown"
    batch_roles: tuple[str, ...] | None = None  # declared by denoising_step(batch_roles=...)
    why_unknown: str | None = None  # when the step is unknown although a pipeline loop was found: why it was refused
    # entries one model call holds per CFG branch, from the running pipeline's locals (batch_size x images per prompt)
    prompt_batch: int | None = None
    # the running pipeline call's own facts from its locals: do_classifier_free_guidance when it is a local (PixArt),
    # and the ids of its prompt_embeds / negative_prompt_embeds tensors (a separate call passes one of them as is)
    frame_guides: bool | None = None
    embeds: tuple[tuple[int, str], ...] = ()


@contextlib.contextmanager
def denoising_step(
    step: int | None = None,
    num_steps: int | None = None,
    *,
    timestep: float | None = None,
    batch_roles: tuple[str, ...] | None = None,
) -> Iterator[None]:
    """Declare, for model calls made inside, the loop position (``step`` of ``num_steps``, the scheduler
    ``timestep``) and what each batch entry is (``batch_roles``, e.g. ``("uncond", "cond")``): for loops that are not
    a diffusers pipeline's, and models without ``cache_context`` (UNets, SD3) called directly."""
    if step is not None and (num_steps is None or not 0 <= step < num_steps):
        raise ValueError(f"denoising_step: step {step} needs num_steps > step (got num_steps={num_steps})")
    if batch_roles is not None and not set(batch_roles) <= {"uncond", "cond"}:
        raise ValueError(f"denoising_step: batch_roles are 'uncond' or 'cond', got {batch_roles}")
    previous = getattr(_LOCAL, "position", None)
    _LOCAL.position = LoopPosition(
        step,
        num_steps,
        timestep,
        source="denoising_step",
        batch_roles=None if batch_roles is None else tuple(batch_roles),
    )
    try:
        yield
    finally:
        _LOCAL.position = previous


@contextlib.contextmanager
def prompt_branches(branches: tuple[str, ...]) -> Iterator[None]:
    """Declare, for model calls made inside, the branch of each prompt of the pipeline call (e.g. ``("source",
    "target")`` for ``pipe([source_prompt, target_prompt])``); methods read it per batch entry as ``ctx.branches``
    (CFG halves and ``num_images_per_prompt`` copies included). Used by :mod:`diffattn.editing`."""
    if not branches or not all(isinstance(b, str) for b in branches):
        raise ValueError(f"prompt_branches takes a non-empty tuple of names, got {branches!r}")
    previous = getattr(_LOCAL, "branches", None)
    _LOCAL.branches = tuple(branches)
    try:
        yield
    finally:
        _LOCAL.branches = previous


def declared_branches() -> tuple[str, ...] | None:
    return getattr(_LOCAL, "branches", None)


def _as_float(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().reshape(-1)[0]) if value.numel() else None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _owns(pipeline: Any, model: torch.nn.Module) -> bool:
    components = getattr(pipeline, "components", None) or {}
    return any(
        component is model or getattr(component, "_orig_mod", None) is model for component in components.values()
    )


def _pipeline_frame(model: torch.nn.Module) -> tuple[Any, dict[str, Any]] | None:
    """The innermost running ``DiffusionPipeline.__call__`` (or other method) frame whose pipeline owns ``model``."""
    from diffusers import DiffusionPipeline

    frame = sys._getframe(2)
    while frame is not None:
        candidate = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        if isinstance(candidate, DiffusionPipeline) and _owns(candidate, model):
            return candidate, frame.f_locals
        frame = frame.f_back
    return None


def loop_position(
    model: torch.nn.Module, cache_context: Any = None, model_timestep: float | None = None
) -> LoopPosition:
    """Where the denoising loop that calls ``model`` is (see the module docstring for the sources, in order).
    ``model_timestep``: the timestep the model receives, on the scheduler's scale, to check the pipeline loop with."""
    explicit = getattr(_LOCAL, "position", None)
    found = _pipeline_frame(model)
    pipeline, local = found if found is not None else (None, {})
    prompt_batch = _prompt_batch(local)
    frame = dict(prompt_batch=prompt_batch, frame_guides=_frame_guides(local), embeds=_embeds(local))
    if explicit is not None and explicit.step is not None:
        return LoopPosition(
            explicit.step,
            explicit.num_steps,
            explicit.timestep,
            pipeline=pipeline,
            source=explicit.source,
            batch_roles=explicit.batch_roles,
            **frame,
        )
    roles = None if explicit is None else explicit.batch_roles
    if cache_context is not None and getattr(cache_context, "step_index", None) is not None:
        return LoopPosition(
            int(cache_context.step_index),
            cache_context.num_inference_steps,
            _as_float(getattr(cache_context, "timestep", None)),
            pipeline=pipeline,
            source="cache_context",
            batch_roles=roles,
            **frame,
        )
    position = dataclasses.replace(_pipeline_loop(pipeline, local, model_timestep, roles), **frame)
    if explicit is not None and explicit.timestep is not None and position.step is None:
        position = dataclasses.replace(position, timestep=explicit.timestep, source=explicit.source)  # declared alone
    return position


def _frame_guides(local: dict[str, Any]) -> bool | None:
    value = local.get("do_classifier_free_guidance")
    return value if isinstance(value, bool) else None


def _embeds(local: dict[str, Any]) -> tuple[tuple[int, str], ...]:
    """(id, role) of the pipeline call's prompt embeddings: ``prompt_embeds`` is the conditional one,
    ``negative_prompt_embeds`` the unconditional one (ids of live locals, compared while the call runs)."""
    found = []
    for name, role in (("prompt_embeds", "cond"), ("negative_prompt_embeds", "uncond")):
        value = local.get(name)
        if isinstance(value, (torch.Tensor, list)):  # Z-Image: a list of per-prompt tensors
            found.append((id(value), role))
    return tuple(found)


def _prompt_batch(local: dict[str, Any]) -> int | None:
    """Entries per CFG branch of the running pipeline call: its ``batch_size`` (prompts) times its images (or videos)
    per prompt, when its ``__call__`` has both as integers."""
    batch, per_prompt = local.get("batch_size"), local.get("num_images_per_prompt", local.get("num_videos_per_prompt"))
    if isinstance(batch, int) and isinstance(per_prompt, int) and batch > 0 and per_prompt > 0:
        return batch * per_prompt
    return None


def _pipeline_loop(
    pipeline: Any, local: dict[str, Any], model_timestep: float | None, roles: tuple[str, ...] | None
) -> LoopPosition:
    """The position read from the running pipeline's loop variables, when they agree with the model's timestep."""
    timesteps, step = local.get("timesteps"), local.get("i")
    if pipeline is None or not isinstance(step, int) or timesteps is None or not len(timesteps):
        return LoopPosition(None, None, pipeline=pipeline, batch_roles=roles)
    values = tuple(float(t) for t in (timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps))
    why = _disagreement(values, step, model_timestep)
    if why is not None:
        return LoopPosition(None, None, pipeline=pipeline, batch_roles=roles, why_unknown=why)
    return LoopPosition(step, len(values), values[step], values, pipeline, source="pipeline loop", batch_roles=roles)


def _disagreement(values: tuple[float, ...], step: int, model_timestep: float | None) -> str | None:
    """Why the loop's ``i`` over ``values`` is not the step of a model call that received ``model_timestep``
    (``None``: it is)."""
    if not 0 <= step < len(values):
        return f"the pipeline's loop variable i={step} is outside its {len(values)} timesteps"
    if model_timestep is None:
        return "the model received no timestep to check the pipeline's loop variable i against"
    gap = abs(values[step] - model_timestep)
    if any(abs(v - model_timestep) < gap - 1e-6 * max(1.0, abs(v)) for v in values):
        return (
            f"the pipeline's loop variable i={step} points at timestep {values[step]:g}, but the model received "
            f"{model_timestep:g}: the loop's index is not named i (or i is left over from an earlier loop)"
        )
    return None
