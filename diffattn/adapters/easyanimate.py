"""EasyAnimate (``EasyAnimateTransformer3DModel``, ``transformer_easyanimate.py`` in diffusers 0.42.1): joint text +
video attention with the text FIRST, over ``(B, C, F, H, W)`` latents patched per frame (no temporal patch).

``transformer_blocks.N.attn1``: the MMDiT blocks join ``torch.cat([encoder_query, query], dim=2)`` (line 165), the
others ``torch.cat([encoder_hidden_states, hidden_states], dim=1)`` (line 133). The text is the Qwen / Bert
embeddings, followed by the T5 ones when given (line 526).
"""

from __future__ import annotations

from .base import FamilyAdapter, RoleRule, _video_grid

ADAPTER = FamilyAdapter(
    "easyanimate",
    "EasyAnimateTransformer3DModel",
    (RoleRule(r"transformer_blocks\.\d+\.attn1", "joint", text_first=True),),
    _video_grid(channels_first=True),
)
