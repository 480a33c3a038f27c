"""Unconditional UNets (``UNet2DModel``: DDPM, LDM, score-SDE): self-attention only, a grid that halves per level.

Every attention module is an ``Attention`` of the ``Attn*Block2D`` blocks (``down_blocks.N.attentions.M``,
``up_blocks.N.attentions.M``) or of ``UNetMidBlock2D`` (``mid_block.attentions.M``): ``AttnProcessor2_0`` turns the
``(B, C, H, W)`` features of its level into ``H * W`` tokens in raster order and calls SDPA with no
``encoder_hidden_states`` (diffusers ``models/attention_processor.py``, ``AttnProcessor2_0.__call__``). There is no
text. The grid is the ``sample`` input's ``(H, W)`` (no patching); deeper levels have ``ceil(n / 2)`` tokens per axis
(``Downsample2D``: stride 2, padding 1). ``UNet2DModel`` has no ``upsample_size`` logic, so its inputs must divide by
``2 ** (levels - 1)``.
"""

from __future__ import annotations

import torch

from .base import FamilyAdapter, ModelInputs, RoleRule, _require


def _sample_grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
    """(height, width) of the latent ``sample``, halved per resolution level"""
    sample = _require(inputs, "sample", type(model).__name__)
    return (int(sample.shape[-2]), int(sample.shape[-1]))


ADAPTERS = (
    FamilyAdapter(
        "unet2d",
        "UNet2DModel",
        (RoleRule(r"(down_blocks|up_blocks)\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+", "self"),),
        _sample_grid,
        multiscale=True,
        cfg_in_batch=False,  # unconditional: no classifier-free guidance
    ),
)
