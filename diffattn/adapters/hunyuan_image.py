"""HunyuanImage 2.1 (``HunyuanImageTransformer2DModel``): dual-stream then single-stream blocks, joint attention
with the image tokens first and the text after: ``transformer_hunyuanimage.py:122`` ``torch.cat([query,
encoder_query])`` (dual blocks) and ``:65`` / ``:503`` ``torch.cat([hidden_states, encoder_hidden_states])`` (single
blocks). The grid from the ``(B, C, H, W)`` (or ``(B, C, F, H, W)``) latents and the config's ``patch_size`` tuple.
The text token refiner (``context_embedder.*``) is left alone.
"""

from __future__ import annotations

import torch

from .base import FamilyAdapter, ModelInputs, RoleRule, _require


def _grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
    """(height, width) (or frames too) of the latents / the patch sizes"""
    x = _require(inputs, "hidden_states", type(model).__name__)
    patch = tuple(model.config.patch_size)
    return tuple(d // p for d, p in zip(x.shape[2:], patch))


ADAPTER = FamilyAdapter(
    "hunyuan_image",
    "HunyuanImageTransformer2DModel",
    (RoleRule(r"(single_)?transformer_blocks\.\d+\.attn", "joint", text_first=False),),
    _grid,
    cfg_in_batch=False,  # HunyuanImagePipeline runs each guider branch as its own forward, timestep on 0..1000
)
