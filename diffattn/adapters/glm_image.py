"""GLM-Image (``GlmImageTransformer2DModel``): every block's ``attn1`` is joint attention over ``[text | image]``,
text first: ``transformer_glm_image.py:280`` ``torch.cat([encoder_hidden_states, hidden_states], dim=1)`` in
``GlmImageAttnProcessor``. The grid from the ``(B, C, H, W)`` latents and ``patch_size``.

Image-to-image: the pipeline first runs each condition image through the model with no text and ``kv_caches`` in
``"write"`` mode (a plain joint call: 0 text tokens and the condition image's grid), then denoises with the caches in
``"read"`` mode, which prepends the condition images' keys to every call: the grid reader raises ``LayoutError``
for those.
"""

from __future__ import annotations

import torch

from ..errors import LayoutError
from .base import FamilyAdapter, ModelInputs, RoleRule, _image_grid

_LATENT_GRID = _image_grid(lambda m: m.config.patch_size)


def _grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
    """(height, width) of the latents / the patch size"""
    caches = inputs.get("kv_caches")
    if caches is not None and any(c.mode == "read" and c.k_caches for c in caches.caches):
        raise LayoutError(
            f"{type(model).__name__}: kv_caches in 'read' mode add the condition images' keys to every attention "
            "call; diffattn's layout has text and one visual grid only (image-to-image is not supported)"
        )
    return _LATENT_GRID(model, inputs)


ADAPTER = FamilyAdapter(
    "glm_image",
    "GlmImageTransformer2DModel",
    (RoleRule(r"transformer_blocks\.\d+\.attn1", "joint", text_first=True),),
    _grid,
    cfg_in_batch=False,  # GlmImagePipeline runs the unconditional branch as a second forward, timestep on 0..1000
)
