"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): joint text + video attention, video tokens first, over
``(B, C, F, H, W)`` latents."""

from __future__ import annotations

from .base import FamilyAdapter, RoleRule, _video_grid

ADAPTER = FamilyAdapter(
    "hunyuan_video",
    "HunyuanVideoTransformer3DModel",
    (RoleRule(r"(single_)?transformer_blocks\.\d+\.attn", "joint", text_first=False),),
    _video_grid(channels_first=True),
)
