"""The pipeline-call arguments an editing function sets itself: its step-end callback runs chained with the user's
(never in its place), and the arguments it owns are refused with the one to use instead."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["StepEnd", "chain_step_end", "refuse_owned"]

#: diffusers' ``callback_on_step_end(pipe, step_index, timestep, callback_kwargs) -> callback_kwargs``.
StepEnd = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]


def refuse_owned(call_kwargs: Mapping[str, Any], owned: Mapping[str, str], owner: str) -> None:
    """Raise when ``call_kwargs`` holds an argument that ``owner`` sets itself (``owned``: name -> what to do)."""
    for name, instead in owned.items():
        if name in call_kwargs:
            raise ValueError(f"{owner} sets the pipeline's {name} itself; {instead}")


def chain_step_end(call_kwargs: dict[str, Any], own: StepEnd) -> dict[str, Any]:
    """The pipeline-call arguments that run ``own`` after every step and then the user's ``callback_on_step_end``
    (taken out of ``call_kwargs``: a function, a ``PipelineCallback`` or ``MultiPipelineCallbacks``), which gets the
    outputs ``own`` returned and whose return value the pipeline takes, as diffusers passes it. The tensor inputs
    are ``latents`` and those the user asked for."""
    user = call_kwargs.pop("callback_on_step_end", None)
    requested = call_kwargs.pop("callback_on_step_end_tensor_inputs", None)
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    if isinstance(user, (PipelineCallback, MultiPipelineCallbacks)):
        requested = user.tensor_inputs  # what the pipeline itself would take for such a callback
    if user is not None and not callable(user):
        raise TypeError(f"callback_on_step_end must be callable, got {type(user).__name__}")
    inputs = list(dict.fromkeys(["latents", *(requested or ())]))
    if user is None:
        return {"callback_on_step_end": own, "callback_on_step_end_tensor_inputs": inputs}

    def chained(pipe: Any, step: int, timestep: Any, outputs: dict[str, Any]) -> dict[str, Any]:
        return user(pipe, step, timestep, own(pipe, step, timestep, outputs))

    return {"callback_on_step_end": chained, "callback_on_step_end_tensor_inputs": inputs}
