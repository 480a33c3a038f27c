"""CogView3-Plus (``CogView3PlusTransformer2DModel``) and CogView4 (``CogView4Transformer2DModel``): joint text +
image attention, text first, over ``(B, C, H, W)`` latents patched by ``config.patch_size``.

Where the text goes (diffusers 0.42.1):

- CogView3-Plus: ``attn1`` runs ``CogVideoXAttnProcessor2_0``, which concatenates
  ``torch.cat([encoder_hidden_states, hidden_states], dim=1)`` (models/attention_processor.py, line 2297), then one
  ``F.scaled_dot_product_attention``.
- CogView4: ``attn1`` runs ``CogView4AttnProcessor``: ``torch.cat([encoder_hidden_states, hidden_states], dim=1)``
  (models/transformers/transformer_cogview4.py, line 139), then one ``F.scaled_dot_product_attention``
  (``CogView4TrainingAttnProcessor`` keeps the same order, line 338).
"""

from __future__ import annotations

from .base import FamilyAdapter, RoleRule, _image_grid

_JOINT = (RoleRule(r"transformer_blocks\.\d+\.attn1", "joint", text_first=True),)

ADAPTERS = (
    FamilyAdapter("cogview3plus", "CogView3PlusTransformer2DModel", _JOINT, _image_grid(lambda m: m.config.patch_size)),
    FamilyAdapter("cogview4", "CogView4Transformer2DModel", _JOINT, _image_grid(lambda m: m.config.patch_size)),
)
