"""PixArt-like video DiTs: Allegro (full 3-D attention) and Latte (refused: factorised spatial/temporal attention)."""

from __future__ import annotations

import torch

from . import Refusal, ZooCase, seeded


def _randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _allegro() -> torch.nn.Module:
    from diffusers import AllegroTransformer3DModel

    return AllegroTransformer3DModel(
        patch_size=2,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        cross_attention_dim=24,
        sample_height=8,
        sample_width=8,
        sample_frames=8,
        caption_channels=12,
    )


def _allegro_inputs() -> dict:
    # (B, C, F, H, W) = (1, 4, 3, 6, 10), patch 2 (1 in time) -> 3x3x5 tokens; 7 caption tokens
    return dict(
        hidden_states=_randn(1, 4, 3, 6, 10),
        encoder_hidden_states=_randn(1, 7, 12, seed=2),
        timestep=torch.tensor([500]),
    )


def _latte() -> torch.nn.Module:
    from diffusers import LatteTransformer3DModel

    return LatteTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        cross_attention_dim=16,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=12,
        video_length=3,
    )


CASES = (ZooCase("AllegroTransformer3DModel", seeded(_allegro), _allegro_inputs, (3, 3, 5), text_len=7),)

REFUSALS = (Refusal("LatteTransformer3DModel", seeded(_latte), r"Latte factorises attention.*batch B\*H\*W"),)
