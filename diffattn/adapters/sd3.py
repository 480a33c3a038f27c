"""Stable Diffusion 3 (``SD3Transformer2DModel``): joint text + image attention, image tokens first; ``attn2`` (the
extra attention of SD3.5's dual-attention blocks) is self-attention."""

from __future__ import annotations

from .base import FamilyAdapter, RoleRule, _image_grid

ADAPTER = FamilyAdapter(
    "sd3",
    "SD3Transformer2DModel",
    (RoleRule(r"transformer_blocks\.\d+\.attn", "joint", text_first=False), RoleRule(r".*\.attn2", "self")),
    _image_grid(lambda m: m.config.patch_size),
)
