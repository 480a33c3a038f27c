"""Mochi, tiny: refused (MochiAttention has no set_processor; its processor attends per batch entry)."""

from __future__ import annotations

import diffusers
import torch

from . import Refusal, seeded


def _mochi() -> torch.nn.Module:
    return diffusers.MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=4,
        text_embed_dim=16,
        time_embed_dim=4,
    )


REFUSALS = (Refusal("MochiTransformer3DModel", seeded(_mochi), "no set_processor"),)
