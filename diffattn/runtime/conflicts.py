"""Other hooks that catch the same SDPA call: diffusers' layer-skip hooks (its skip-layer and PAG guiders) replace or
intercept the attention core of the modules they sit on, and with diffattn on the same module whichever was
registered first would win and the other would be lost without a word. Both orders are refused."""

from __future__ import annotations

import torch
from diffusers.hooks.layer_skip import AttentionProcessorSkipHook

from ..errors import InterceptionError

__all__ = ["layer_skip_hooks", "refuse_layer_skip"]


def layer_skip_hooks(module: torch.nn.Module) -> list[str]:
    """Names of diffusers' attention layer-skip hooks registered on ``module``."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return []
    return [name for name, hook in registry.hooks.items() if isinstance(hook, AttentionProcessorSkipHook)]


def refuse_layer_skip(module: torch.nn.Module, layer: str, methods: list[str]) -> None:
    """Raise when diffusers' layer-skip hooks sit on the attention module ``layer`` that ``methods`` act on."""
    names = layer_skip_hooks(module)
    if names:
        raise InterceptionError(
            f"{layer}: diffusers' layer-skip hook {names} and diffattn ({', '.join(methods)}) both replace this "
            "module's attention core, and one of them would be silently lost. Leave this layer out of diffattn's "
            "layers=..., or remove the layer-skip guidance from it (the guider's skip layers / PAG layers)"
        )
