"""AuraFlow (``AuraFlowTransformer2DModel``): joint text + image attention, text first, in both its MMDiT blocks
(``AuraFlowAttnProcessor2_0`` concatenates ``[context, image]`` for q, k and v, ``attention_processor.py``
``query = torch.cat([encoder_hidden_states_query_proj, query], dim=1)``) and its single DiT blocks
(``auraflow_transformer_2d.py`` line 467: ``torch.cat([encoder_hidden_states, hidden_states], dim=1)``).

The context is ``[8 learned register tokens, caption]`` (line 442): the registers sit at a fixed place, the start of
the text run, which diffattn's layouts count as text. Methods that treat the text run as a whole (sparse patterns,
guidance) are exact; a method that indexes prompt tokens inside the text run sees them shifted by the 8 registers.
Grid ``H/p x W/p``; the pipeline passes ``t / 1000`` and batches [uncond, cond].
"""

from __future__ import annotations

from .base import FamilyAdapter, RoleRule, _image_grid

ADAPTER = FamilyAdapter(
    "auraflow",
    "AuraFlowTransformer2DModel",
    (RoleRule(r"(joint|single)_transformer_blocks\.\d+\.attn", "joint", text_first=True),),
    _image_grid(lambda m: m.config.patch_size),
    timestep_scale=1000.0,
)
