"""Refused: models whose image queries attend image + text keys (PRX, Nucleus-MoE Image)."""

from __future__ import annotations

import torch

from . import Refusal, seeded


def _prx() -> torch.nn.Module:
    from diffusers import PRXTransformer2DModel

    return PRXTransformer2DModel(
        in_channels=4,
        patch_size=2,
        context_in_dim=12,
        hidden_size=16,
        mlp_ratio=2.0,
        num_heads=2,
        depth=1,
        axes_dim=[4, 4],
    )


def _nucleus() -> torch.nn.Module:
    from diffusers import NucleusMoEImageTransformer2DModel

    return NucleusMoEImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        axes_dims_rope=(2, 2, 4),
        moe_enabled=False,
        num_experts=2,
        moe_intermediate_dim=8,
    )


REFUSALS = (
    Refusal("PRXTransformer2DModel", seeded(_prx), r"image queries over \[text, image\] keys"),
    Refusal("NucleusMoEImageTransformer2DModel", seeded(_nucleus), r"image queries over \[image, text\] keys"),
)
