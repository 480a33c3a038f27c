"""ERNIE-Image (``ErnieImageTransformer2DModel``): one stream of ``[image | text]`` tokens through every block's
``self_attention``, image first: ``transformer_ernie_image.py:391`` ``torch.cat([img_sbh, text_sbh], dim=0)`` (the
stream is sequence-first; each block turns it batch-first before attention). The grid from the ``(B, C, H, W)``
latents and ``patch_size``.
"""

from __future__ import annotations

from .base import FamilyAdapter, RoleRule, _image_grid

ADAPTER = FamilyAdapter(
    "ernie_image",
    "ErnieImageTransformer2DModel",
    (RoleRule(r"layers\.\d+\.self_attention", "joint", text_first=False),),
    _image_grid(lambda m: m.config.patch_size),
    # ErnieImagePipeline stacks [uncond, cond] (pipeline_ernie_image.py:339), timestep on 0..1000
)
