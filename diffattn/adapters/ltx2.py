"""LTX-2 (``LTX2VideoTransformer3DModel``), audio + video: the video stream's self- and cross-attention; the grid
from the ``num_frames``, ``height`` and ``width`` inputs (latent sizes, before the ``patch_size_t`` / ``patch_size``
patching; the video tokens arrive packed as ``(B, F * H * W, C)``).

Each ``transformer_blocks.N`` holds six ``LTX2Attention`` modules (models/transformers/transformer_ltx2.py, lines
466-556), each one ``dispatch_attention_fn`` call (line 206) and none concatenating text into the visual sequence:
``attn1`` video self-attention (queries and keys: the video tokens), ``attn2`` video cross-attention (keys: the text
``encoder_hidden_states``), and ``audio_attn1``, ``audio_attn2``, ``audio_to_video_attn`` (video queries, audio keys),
``video_to_audio_attn`` (audio queries), which no rule names: their keys or queries are not the video grid or text.

With ``perturbed_attn=True`` (``LTX2PerturbedAttnProcessor``), a spatio-temporal-guidance call whose
``perturbation_mask`` is all zero skips SDPA on ``attn1`` (line 275); diffattn reports that layer's call as made
without SDPA.
"""

from __future__ import annotations

import torch

from .base import FamilyAdapter, ModelInputs, RoleRule, _require


def _ltx2_grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
    """the ``num_frames``, ``height``, ``width`` inputs / the patch sizes"""
    cfg = model.config
    pt, p = cfg.patch_size_t, cfg.patch_size
    f, h, w = (int(_require(inputs, k, "LTX2VideoTransformer3DModel")) for k in ("num_frames", "height", "width"))
    return (f // pt, h // p, w // p)


ADAPTER = FamilyAdapter(
    "ltx2",
    "LTX2VideoTransformer3DModel",
    (
        RoleRule(r"transformer_blocks\.\d+\.attn1", "self"),
        RoleRule(r"transformer_blocks\.\d+\.attn2", "cross"),
    ),
    _ltx2_grid,
)
