"""HunyuanVideo 1.5, tiny: joint video-first attention over 3 latent frames of 3x5 tokens (patch 1); the
conditioning run is 2 image-prompt + 3 ByT5 + 5 MLLM tokens. HunyuanVideo-Framepack, refused."""

from __future__ import annotations

import diffusers
import torch

from . import Refusal, ZooCase, seeded

_IMAGE, _BYT5, _MLLM = 2, 3, 5


def _hunyuan_video15(**overrides) -> torch.nn.Module:
    """The tiny HunyuanVideo 1.5 transformer (``overrides``: config values a pipeline needs otherwise)."""
    config = dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=16,
        text_embed_2_dim=12,
        image_embed_dim=12,
        rope_axes_dim=(2, 2, 4),
        target_size=16,
    )
    return diffusers.HunyuanVideo15Transformer3DModel(**{**config, **overrides})


def _inputs() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 4, 3, 3, 5, generator=gen),  # (B, C, F, H, W), patch 1: 3 x 3 x 5
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, _MLLM, 16, generator=gen),
        "encoder_attention_mask": torch.ones(1, _MLLM),
        "encoder_hidden_states_2": torch.randn(1, _BYT5, 12, generator=gen),
        "encoder_attention_mask_2": torch.ones(1, _BYT5),
        "image_embeds": torch.randn(1, _IMAGE, 12, generator=gen),
        "return_dict": False,
    }


def _framepack() -> torch.nn.Module:
    return diffusers.HunyuanVideoFramepackTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4),
        image_condition_type=None,
        has_image_proj=True,
        image_proj_dim=12,
        has_clean_x_embedder=True,
    )


CASES = (
    ZooCase(
        "HunyuanVideo15Transformer3DModel",
        seeded(_hunyuan_video15),
        _inputs,
        (3, 3, 5),
        text_len=_IMAGE + _BYT5 + _MLLM,
    ),
)

REFUSALS = (Refusal("HunyuanVideoFramepackTransformer3DModel", seeded(_framepack), "history latents"),)
