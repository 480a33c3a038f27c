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

# name -> the submodule that defines it ("" for a submodule exported under its own name)
_EXPORTS: dict[str, str] = {
    "apply": "api",
    "remove": "api",
    "Handle": "api",
    "attention_modules": "api",
    "tune": "tuning",
    "TunedProfile": "tuning",
    "processors": "attention_processors",
    "DiffattnProcessor": "attention_processors",
    "inspect": "inspection",
    "AttentionContext": "context",
    "guidance": "",
    "editing": "",
    "PAG": "methods.pag",
    "SoftPAG": "methods.pag",
    "SEG": "methods.seg",
    **dict.fromkeys(
        (
            "AttentionMethod",
            "Dense",
            "Masked",
            "MutualSelfAttention",
            "PromptToPrompt",
            "AttentiveEraser",
            "BoundedAttention",
            "LocalBlend",
            "SparseAttention",
            "SlidingTileAttention",
            "SlidingWindowAttention",
            "ShiftedWindowAttention",
            "RadialAttention",
            "HIDIFFUSION_LAYERS",
            "DynamicSparseAttention",
            "SemanticPermutation",
            "PyramidSparseAttention",
            "Rettention",
            "TokenDownsampling",
            "EntropyScaling",
        ),
        "methods",
    ),
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

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:  # a submodule (diffattn.methods, diffattn.testing, ...), as an eager package would have it
        if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module 'diffattn' has no attribute {name!r}")
        return importlib.import_module(f".{name}", __name__)
    value = importlib.import_module(f".{module or name}", __name__)
    if module:
        value = getattr(value, name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
