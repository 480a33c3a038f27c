"""Object masks given to editing methods (Attentive Eraser, mask-guided MasaCtrl, :func:`diffattn.editing.erase`):
one rule for all of them, :func:`object_mask` — boolean masks as given, numeric masks (soft, uint8 0..255 or floats)
mark the object where the value is at least :data:`MASK_THRESHOLD`."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["MASK_THRESHOLD", "object_mask"]

#: A numeric mask marks the object where its value is >= this (a soft mask's feathered edge below it is background).
MASK_THRESHOLD = 0.5


def object_mask(mask: object, owner: str) -> Tensor:
    """``mask`` (H x W: bool, or numbers with the object at values >= :data:`MASK_THRESHOLD`) as a bool tensor."""
    m = mask if isinstance(mask, Tensor) else torch.as_tensor(np.asarray(mask))
    if m.ndim != 2:
        raise ValueError(f"{owner}: the mask must be 2-D (H x W, True where the object is), got shape {tuple(m.shape)}")
    if m.dtype == torch.bool:
        return m
    if m.is_complex():
        raise ValueError(f"{owner}: the mask must hold bools or real numbers, got {m.dtype}")
    m = m.float()
    if not bool(torch.isfinite(m).all()):
        raise ValueError(f"{owner}: the mask holds NaN or infinite values; values >= {MASK_THRESHOLD} mark the object")
    return m >= MASK_THRESHOLD
