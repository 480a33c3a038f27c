"""OmniGen (``OmniGenTransformer2DModel``): one LLM-style sequence ``[condition tokens, time token, image]``
(``transformer_omnigen.py`` line 460: ``torch.cat([condition_tokens, time_token, hidden_states], dim=1)``) attended
by every ``layers.N.self_attn`` (``OmniGenAttnProcessor2_0``, SDPA): joint, text first, the output image's
``H/p x W/p`` tokens at the tail.

The text run is everything before the image: the processor's left padding, the prompt tokens (reference images, when
given, are embedded in place of their placeholder tokens, so prompt-token positions are kept) and the time token.
The processor's mask makes the text run causal and keeps the image bidirectional; it reaches methods as the stock
``attn_mask`` (methods that accept only key-padding masks refuse it at the call). The pipeline batches [cond,
uncond(, image-cond)]: ``cfg_in_batch=False``.
"""

from __future__ import annotations

from .base import FamilyAdapter, RoleRule, _image_grid

ADAPTER = FamilyAdapter(
    "omnigen",
    "OmniGenTransformer2DModel",
    (RoleRule(r"layers\.\d+\.self_attn", "joint", text_first=True),),
    _image_grid(lambda m: m.config.patch_size),
    cfg_in_batch=False,
)
