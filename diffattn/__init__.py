"""diffattn: attention methods for diffusers models, delivered as hooks on their attention modules.

handle = diffattn.apply(pipe, diffattn.Dense(), layers=["transformer_blocks.1"], steps=0.25)
...
handle.remove()

The names below are imported when first used (PEP 562), so ``import diffattn`` alone (the ``diffattn`` command
before it parses its arguments, the demo before it serves its page) loads neither torch nor diffusers.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__version__ = "0.1.0"

# The exported names: each of these (name -> the submodule that defines it; "" for a submodule exported under its own
# name) and every name of diffattn.methods.__all__ (Dense, SlidingTileAttention, ...); __all__ is the two together,
# made on first use (it imports the methods).
_EXPORTS: dict[str, str] = {
    "apply": "api",
    "remove": "api",
    "Handle": "api",
    "attention_modules": "api",
    "tune": "tuning",
    "TunedProfile": "tuning",
    "calibrate_cache": "tuning",
    "CacheCalibration": "tuning",
    "processors": "attention_processors",
    "DiffattnProcessor": "attention_processors",
    "inspect": "inspection",
    "AttentionContext": "context",
    "guidance": "",
    "editing": "",
    "PAG": "methods.pag",
    "SoftPAG": "methods.pag",
    "SEG": "methods.seg",
    "TokenLayout": "layout",
    "StepSchedule": "schedule",
    "denoising_step": "runtime",
    "FamilyAdapter": "adapters",
    "RoleRule": "adapters",
    "register_adapter": "adapters",
    "supported_models": "adapters",
    **dict.fromkeys(
        (
            "DiffattnError",
            "ContextParallelError",
            "InterceptionError",
            "LayerSelectionError",
            "LayoutError",
            "MethodConfigError",
            "NonFiniteInputError",
            "StepSelectionError",
            "UnsupportedModelError",
        ),
        "errors",
    ),
}


def __getattr__(name: str) -> Any:
    if name == "__all__":
        value: Any = [*_EXPORTS, *importlib.import_module(".methods", __name__).__all__]
    elif name in _EXPORTS:
        module = _EXPORTS[name]
        value = importlib.import_module(f".{module or name}", __name__)
        value = getattr(value, name) if module else value
    elif name.startswith("_"):
        raise AttributeError(f"module 'diffattn' has no attribute {name!r}")
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)  # a submodule, as an eager package would have it
    else:
        methods = importlib.import_module(".methods", __name__)
        if name not in methods.__all__:
            raise AttributeError(f"module 'diffattn' has no attribute {name!r}")
        value = getattr(methods, name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__getattr__("__all__")})
