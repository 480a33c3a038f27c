"""Wan (``WanTransformer3DModel``): self- and cross-attention over ``(B, C, F, H, W)`` video latents."""

from __future__ import annotations

from .base import _SELF_CROSS, FamilyAdapter, _video_grid, image_call_first

ADAPTER = FamilyAdapter(
    "wan",
    "WanTransformer3DModel",
    _SELF_CROSS,
    _video_grid(channels_first=True),
    cfg_in_batch=False,
    text_call=image_call_first,
)
