"""UNets (``UNet2DConditionModel``: Stable Diffusion 1.5, SDXL): self- and cross-attention, a grid that halves per
resolution level."""

from __future__ import annotations

import torch

from .base import _SELF_CROSS, FamilyAdapter, ModelInputs, _require


def _unet_grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
    """(height, width) of the latent ``sample``, halved per resolution level"""
    sample = _require(inputs, "sample", "UNet2DConditionModel")
    return (int(sample.shape[-2]), int(sample.shape[-1]))


ADAPTER = FamilyAdapter("unet", "UNet2DConditionModel", _SELF_CROSS, _unet_grid, multiscale=True)
