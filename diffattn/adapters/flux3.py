"""Flux 3 (``Flux3Transformer2DModel``): per-mode blocks (text, image and reference images each attend within
themselves), then joint single blocks over ``[text | image]``; packed latents with ``(t, h, w, l)`` position ids.

- ``mode_blocks.image.N.attn``: self-attention over the image tokens.
- ``single_transformer_blocks.N.attn``: joint, text first: ``transformer_flux3.py:280``
  ``torch.cat([norm_encoder_hidden_states, norm_hidden_states], dim=1)`` (the content is ``hidden_states``, ``:627``).
- Left alone: ``txt_mode_blocks`` (text only) and ``mode_blocks.image_cond`` (reference images only).

Reference images (``image_cond_hidden_states``) are appended after the image tokens in the joint blocks (``:620``):
the grid reader raises ``LayoutError`` for them.
"""

from __future__ import annotations

import torch

from ..errors import LayoutError
from .base import FamilyAdapter, ModelInputs, RoleRule, ids_grid

_IDS_GRID = ids_grid()


def _grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
    """(height, width) from the image rows of ``img_ids``"""
    if inputs.get("image_cond_hidden_states") is not None:
        raise LayoutError(
            f"{type(model).__name__}: image_cond_hidden_states (reference images) join the text and image tokens in "
            "the joint blocks; diffattn's layout has text and one visual grid only"
        )
    return _IDS_GRID(model, inputs)


ADAPTER = FamilyAdapter(
    "flux3",
    "Flux3Transformer2DModel",
    (
        RoleRule(r"mode_blocks\.image\.\d+\.attn", "self"),
        RoleRule(r"single_transformer_blocks\.\d+\.attn", "joint", text_first=True),
    ),
    _grid,
    cfg_in_batch=False,  # the modular Flux3 denoiser runs each guider branch as its own forward
    timestep_scale=1000.0,  # it passes t / 1000 (modular_pipelines/flux3/denoise.py:120)
)
