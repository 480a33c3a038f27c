"""CogVideoX (``CogVideoXTransformer3DModel``): joint text + video attention, text first, over ``(B, F, C, H, W)``
latents."""

from __future__ import annotations

from .base import FamilyAdapter, RoleRule, _video_grid

ADAPTER = FamilyAdapter(
    "cogvideox",
    "CogVideoXTransformer3DModel",
    (RoleRule(r"transformer_blocks\.\d+\.attn1", "joint", text_first=True),),
    _video_grid(channels_first=False),
)
