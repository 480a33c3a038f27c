"""ConsisID (``ConsisIDTransformer3DModel``): CogVideoX's joint text + video attention, text first, over
``(B, F, C, H, W)`` latents.

Where the text goes (diffusers 0.42.1): each block's ``attn1`` runs ``CogVideoXAttnProcessor2_0``, which concatenates
``torch.cat([encoder_hidden_states, hidden_states], dim=1)`` (models/attention_processor.py, line 2297) before one
``F.scaled_dot_product_attention``. The identity path (``local_facial_extractor``, ``perceiver_cross_attention``,
``is_train_face=True``) computes its attention by hand in modules without processors, so diffattn leaves it alone.
"""

from __future__ import annotations

from .base import FamilyAdapter, RoleRule, _video_grid

ADAPTER = FamilyAdapter(
    "consisid",
    "ConsisIDTransformer3DModel",
    (RoleRule(r"transformer_blocks\.\d+\.attn1", "joint", text_first=True),),
    _video_grid(channels_first=False),
)
