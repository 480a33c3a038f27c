"""``diffattn.processors``: diffattn as attention processors, for ``model.set_attn_processor(...)``.

``model.set_attn_processor(diffattn.processors(model, method, layers=..., steps=...))`` installs, on each selected
attention module, a :class:`DiffattnProcessor` that wraps the module's current processor: the module then runs the
same stack as ``diffattn.apply`` (same hooks, same step / roles / grid, stacking with guidance and other
applications). Setting any other processor on a module (e.g. ``model.set_default_attn_processor()``) removes the
method there, as setting a processor replaces the one before it.
"""

from __future__ import annotations

from typing import Any

import torch

from .api import Handle, _unwrap, attach, attention_modules
from .errors import DiffattnError
from .methods.base import AttentionMethod
from .schedule import LayerSpec, StepSpec

__all__ = ["processors", "DiffattnProcessor"]


class DiffattnProcessor:
    """A module's processor with a diffattn method on it: calls run the wrapped processor ``diffattn_inner``, whose
    attention core the method replaces (through the hooks ``processors`` attached). ``handle``: the application
    (``handle.acted()``, ``handle.calls``)."""

    def __init__(self, inner: Any, method: AttentionMethod) -> None:
        self.diffattn_inner = inner
        self.method = method
        self.handle: Handle | None = None

    def __call__(self, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.diffattn_inner(attn, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # attributes diffusers reads on processors (_attention_backend, ...)
        if name == "diffattn_inner":
            raise AttributeError(name)
        return getattr(self.diffattn_inner, name)

    def __repr__(self) -> str:
        return f"DiffattnProcessor({self.method.name} over {type(self.diffattn_inner).__name__})"


def processors(
    model: torch.nn.Module, method: AttentionMethod, *, layers: LayerSpec = None, steps: StepSpec = None
) -> dict[str, Any]:
    """Processors for ``model.set_attn_processor``: a :class:`DiffattnProcessor` (wrapping the current processor) on
    each module ``diffattn.apply(model, method, layers=layers, steps=steps)`` would act on, the current processor on
    every other one. Guidance methods go through ``diffattn.guidance.enable``."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"diffattn.processors takes the denoiser (pipe.unet / pipe.transformer), got {type(model).__name__}; "
            "for a whole pipeline use diffattn.apply(pipe, method)"
        )
    if not isinstance(method, AttentionMethod):
        raise TypeError(f"method must be a diffattn method (e.g. diffattn.Dense()), got {type(method).__name__}")
    if method.expands_batch:
        raise DiffattnError(
            f"{method.name} is guidance: use diffattn.guidance.enable(pipe, {method.name}(...)); guidance stacks with "
            "processors set by diffattn.processors"
        )
    model = _unwrap(model)
    made: dict[int, DiffattnProcessor] = {}

    def gate(module: torch.nn.Module) -> DiffattnProcessor:
        made[id(module)] = DiffattnProcessor(module.processor, method)
        return made[id(module)]

    handle = attach(model, method, layers=layers, steps=steps, gate=gate)
    out: dict[str, Any] = {}
    for name, module in attention_modules(model):
        processor = made.get(id(module))
        if processor is not None:
            processor.handle = handle
        out[f"{name}.processor"] = processor if processor is not None else module.processor
    return out
