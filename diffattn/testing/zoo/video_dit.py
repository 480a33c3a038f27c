"""Motif-Video, EasyAnimate and Cosmos (:mod:`diffattn.adapters.motif_video`, ``easyanimate``, ``cosmos``), tiny, on a
3 x 3 x 5 token grid (``(B, C, F, H, W)`` latents of 3 frames, 6 x 10, spatial patch 2), with 7 text tokens; and the
packed multimodal models diffattn refuses (Cosmos 3 Omni, MiniMax-H3)."""

from __future__ import annotations

from typing import Any

import diffusers
import torch

from . import Refusal, ZooCase, seeded

GRID = (3, 3, 5)
TEXT_LEN = 7
TEXT_DIM = 16
CHANNELS = 4


def _inputs(**extra: Any) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    f, h, w = GRID
    return {
        "hidden_states": torch.randn(1, CHANNELS, f, 2 * h, 2 * w, generator=gen),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, TEXT_LEN, TEXT_DIM, generator=gen),
        "return_dict": False,
        **extra,
    }


def _motif() -> torch.nn.Module:
    return diffusers.MotifVideoTransformer3DModel(
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        num_attention_heads=2,
        attention_head_dim=12,
        num_layers=1,
        num_single_layers=1,
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=TEXT_DIM,
        rope_axes_dim=(4, 4, 4),
        enable_text_cross_attention_dual=True,  # exercises the cross role too
        enable_text_cross_attention_single=True,
    )


def _easyanimate() -> torch.nn.Module:
    return diffusers.EasyAnimateTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        patch_size=2,
        num_layers=2,
        mmdit_layers=1,  # one MMDiT block (added q/k/v for the text) and one shared-projection block
        text_embed_dim=TEXT_DIM,
        time_embed_dim=8,
    )


def _cosmos() -> torch.nn.Module:
    return diffusers.CosmosTransformer3DModel(
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        num_attention_heads=2,
        attention_head_dim=12,
        num_layers=2,
        mlp_ratio=2,
        text_embed_dim=TEXT_DIM,
        adaln_lora_dim=4,
        max_size=(4, 32, 32),
        patch_size=(1, 2, 2),
        concat_padding_mask=False,  # resizing the padding mask needs torchvision
    )


def _cosmos_inputs() -> dict[str, Any]:
    return _inputs(fps=30)


def _cosmos3_omni() -> torch.nn.Module:
    return diffusers.Cosmos3OmniTransformer(
        head_dim=6,
        hidden_act="relu2",
        hidden_size=12,
        intermediate_size=24,
        latent_channel=2,
        latent_patch_size=1,
        num_attention_heads=2,
        num_hidden_layers=1,
        num_key_value_heads=1,
        patch_latent_dim=2,
        qk_norm_for_text=False,
        rope_axes_dim=[1, 1, 1],
        vocab_size=32,
    )


def _minimax_h3() -> torch.nn.Module:
    return diffusers.MiniMaxH3Transformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        hidden_size=24,
        num_layers=1,
        num_refiner_layers=1,
        ffn_dim=32,
        in_channels=CHANNELS,
        audio_in_channels=6,
        text_dim=8,
        freq_dim=8,
        time_embed_hidden_dim=24,
        time_embed_dim=16,
        rope_freq_dim=2,
    )


CASES = (
    ZooCase("MotifVideoTransformer3DModel", seeded(_motif), _inputs, GRID, text_len=TEXT_LEN),
    ZooCase("EasyAnimateTransformer3DModel", seeded(_easyanimate), _inputs, GRID, text_len=TEXT_LEN),
    ZooCase("CosmosTransformer3DModel", seeded(_cosmos), _cosmos_inputs, GRID, text_len=TEXT_LEN),
)

REFUSALS = (
    Refusal("Cosmos3OmniTransformer", seeded(_cosmos3_omni), "mixture-of-transformers"),
    Refusal("MiniMaxH3Transformer3DModel", seeded(_minimax_h3), "packed sequence"),
)
