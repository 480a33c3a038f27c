"""The error a kernel backend raises when it cannot run a call, and the backward check shared by the backends."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["GRAD_ALTERNATIVE", "KernelUnsupportedError", "needs_grad", "refuse_grad"]

GRAD_ALTERNATIVE = (
    "for gradients use backend='torch' (block-sparse with backward, any device) or backend='auto', "
    "or run under torch.no_grad() if no gradient is needed"
)


class KernelUnsupportedError(ValueError):
    """A kernel backend cannot run this call (device, dtype, size, mask or backward); the message names one that can."""


def needs_grad(*tensors: Tensor) -> bool:
    """Whether autograd will want gradients of any of ``tensors`` from this call."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def refuse_grad(backend: str, *tensors: Tensor) -> None:
    """Raise if a forward-only backend is asked for gradients (its output would be silently detached)."""
    if needs_grad(*tensors):
        raise KernelUnsupportedError(
            f"the {backend} kernel has no backward (q, k or v requires grad); " + GRAD_ALTERNATIVE
        )
