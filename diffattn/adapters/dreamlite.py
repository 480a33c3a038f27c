"""DreamLite (``DreamLiteUNetModel``, a ``UNet2DConditionModel`` subclass with GQA attention): self- and
cross-attention, a grid that halves per resolution level.

``BasicTransformerBlockDreamLite`` (diffusers ``models/transformers/transformer_2d_dreamlite.py``) has ``attn1``
(self over the level's ``H * W`` tokens; absent in the ``...NoSelfAttn...`` blocks) and ``attn2`` (visual queries,
text keys); both run ``DreamLiteAttnProcessor2_0`` (``dispatch_attention_fn``). Text and image tokens never share a
sequence. The grid is the ``sample`` input's ``(H, W)``: the pipeline (``pipelines/dreamlite/pipeline_dreamlite.py``,
``model_input = torch.cat([latents_in, cond_img_in], dim=3)``, line 533/538) puts the target latents and the
condition image latents side by side along the width, so the grid is the whole diptych ``(H, 2 * W_image)``, in
raster order over both halves. The forward is ``UNet2DConditionModel``'s (odd sizes upsample to the skip's size).
"""

from __future__ import annotations

from .base import _SELF_CROSS, FamilyAdapter
from .unet2d import _sample_grid

ADAPTERS = (FamilyAdapter("dreamlite", "DreamLiteUNetModel", _SELF_CROSS, _sample_grid, multiscale=True),)
