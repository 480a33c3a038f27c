"""Model-family knowledge, in one place: which attention module plays which role, and the visual token grid.

Each supported diffusers model class has one small :class:`FamilyAdapter` entry, in a module of this package named
after its family (``unet``, ``sd3``, ``flux``, ``wan``, ...): the module's ``ADAPTERS`` (or ``ADAPTER``) are
registered when the package is imported, and its ``REFUSED`` maps model classes diffattn cannot act on to the reason
(:func:`refuse_model`). Everything
diffattn needs from a model beyond its attention modules comes from here: the role of every attention module (self,
cross, joint text + image, and where the text sits in a joint sequence) and the grid of visual tokens (after patching)
read from the model's own forward inputs. Add a family with :func:`register_adapter`.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import FamilyAdapter, GridFn, ModelInputs, RoleRule, model_inputs
from .registry import adapter_for, refuse_model, refused_models, register_adapter, supported_models

__all__ = [
    "RoleRule",
    "FamilyAdapter",
    "adapter_for",
    "register_adapter",
    "supported_models",
    "refuse_model",
    "refused_models",
    "ModelInputs",
    "model_inputs",
    "GridFn",
]

_SHARED = {"base", "registry"}


def _register_families() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name in _SHARED:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        adapters = getattr(module, "ADAPTERS", None) or ((module.ADAPTER,) if getattr(module, "ADAPTER", None) else ())
        for adapter in adapters:
            register_adapter(adapter)
        for model_class, reason in getattr(module, "REFUSED", {}).items():
            refuse_model(model_class, reason)


_register_families()
