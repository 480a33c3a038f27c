"""The registered adapters, keyed by model class name: :func:`register_adapter`, :func:`supported_models` and
:func:`adapter_for`, which finds a model's adapter."""

from __future__ import annotations

import torch

from ..errors import UnsupportedModelError
from .base import FamilyAdapter

__all__ = ["register_adapter", "supported_models", "adapter_for", "refuse_model", "refused_models"]


_ADAPTERS: dict[str, FamilyAdapter] = {}
_REFUSED: dict[str, str] = {}


def register_adapter(adapter: FamilyAdapter) -> None:
    """Register (or replace) the adapter of a model class, keyed by the class name."""
    _ADAPTERS[adapter.model_class] = adapter


def supported_models() -> list[str]:
    return sorted(_ADAPTERS)


def refuse_model(model_class: str, reason: str) -> None:
    """Record why diffattn cannot act on ``model_class`` (e.g. linear attention: no SDPA call to replace)."""
    _REFUSED[model_class] = reason


def refused_models() -> dict[str, str]:
    """Model class name -> why diffattn refuses it."""
    return dict(sorted(_REFUSED.items()))


def adapter_for(model: torch.nn.Module) -> FamilyAdapter:
    """The adapter of ``model``'s class (or of its nearest registered base class)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile(model)
    for cls in type(model).__mro__:
        if cls.__name__ in _ADAPTERS:
            return _ADAPTERS[cls.__name__]
        if cls.__name__ in _REFUSED:
            raise UnsupportedModelError(f"diffattn cannot act on {type(model).__name__}: {_REFUSED[cls.__name__]}")
    raise UnsupportedModelError(
        f"diffattn has no adapter for {type(model).__name__}. Supported models: {', '.join(supported_models())}. "
        "If the model uses diffusers attention modules, describe it with diffattn.adapters.register_adapter("
        "FamilyAdapter(...)): the role of each attention module and how to read the token grid from its inputs."
    )
