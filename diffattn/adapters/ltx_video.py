"""LTX-Video (``LTXVideoTransformer3DModel``): self- and cross-attention; the grid from the ``num_frames``,
``height`` and ``width`` inputs."""

from __future__ import annotations

import torch

from .base import _SELF_CROSS, FamilyAdapter, ModelInputs, _require


def _ltx_grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
    """the ``num_frames``, ``height``, ``width`` inputs / the patch sizes"""
    cfg = model.config
    pt, p = cfg.patch_size_t, cfg.patch_size
    f, h, w = (int(_require(inputs, k, "LTXVideoTransformer3DModel")) for k in ("num_frames", "height", "width"))
    return (f // pt, h // p, w // p)


ADAPTER = FamilyAdapter("ltx_video", "LTXVideoTransformer3DModel", _SELF_CROSS, _ltx_grid)
