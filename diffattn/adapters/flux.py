"""Flux (``FluxTransformer2DModel``): joint text + image attention, text first; the grid from ``img_ids``."""

from __future__ import annotations

from .base import FamilyAdapter, RoleRule, ids_grid

ADAPTER = FamilyAdapter(
    "flux",
    "FluxTransformer2DModel",
    (RoleRule(r"(single_)?transformer_blocks\.\d+\.attn", "joint", text_first=True),),
    ids_grid(),
    cfg_in_batch=False,
    timestep_scale=1000.0,
)
