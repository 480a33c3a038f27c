"""The ``TorchFunctionMode`` that catches the ``scaled_dot_product_attention`` calls made inside one attention-module
call (directly, or through diffusers' ``dispatch_attention_fn`` on the native backend) and hands them to a chain."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["SDPA", "CoreInterceptor"]

SDPA = F.scaled_dot_product_attention
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _passthrough(func: Any) -> Any:
    """The function to run for a torch call the interceptor leaves alone. Under torch.compile a Tensor method written
    in Python (``Tensor.unflatten``, ``Tensor.split``) calls ``super()``, which dynamo cannot trace inside a mode:
    use the ``torch.<name>`` function of the same meaning."""
    if torch.compiler.is_compiling() and getattr(func, "__module__", None) == "torch._tensor":
        return getattr(torch, func.__name__, func)
    return func


class CoreInterceptor(TorchFunctionMode):
    """Replaces the SDPA calls made inside one attention-module call by ``chain(sdpa, call)``: the chain of acting
    methods, or (compiled) the custom op that runs it. ``calls`` counts the SDPA calls caught."""

    def __init__(self, chain: Callable[[Any, dict[str, Any]], Tensor]) -> None:
        super().__init__()
        self.chain = chain
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not SDPA:
            return _passthrough(func)(*args, **kwargs)
        self.calls += 1
        call = dict(_SDPA_DEFAULTS)
        call.update(zip(_SDPA_ARGS, args))
        call.update(kwargs)
        return self.chain(func, call)
