"""Flux (``FluxTransformer2DModel``): joint text + image attention, text first; the grid from ``img_ids``."""

from __future__ import annotations

import torch

from ..errors import LayoutError
from .base import FamilyAdapter, ModelInputs, RoleRule, _require


def _flux_grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
    """(height, width) from the image rows of ``img_ids``"""
    ids = _require(inputs, "img_ids", "FluxTransformer2DModel")
    ids = ids[0] if ids.ndim == 3 else ids
    tokens = _require(inputs, "hidden_states", "FluxTransformer2DModel").shape[1]
    own = ids[ids[:, 0] == 0] if ids.shape[-1] == 3 else ids
    h, w = int(own[:, 1].max()) + 1, int(own[:, 2].max()) + 1
    if h * w != tokens:
        raise LayoutError(
            f"FluxTransformer2DModel: img_ids describe a {h}x{w} grid but hidden_states has {tokens} tokens; "
            "reference-image conditioning (Kontext-style) is not supported by this adapter yet."
        )
    return (h, w)


ADAPTER = FamilyAdapter(
    "flux",
    "FluxTransformer2DModel",
    (RoleRule(r"(single_)?transformer_blocks\.\d+\.attn", "joint", text_first=True),),
    _flux_grid,
    cfg_in_batch=False,
    timestep_scale=1000.0,
)
