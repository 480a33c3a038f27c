"""Sana, Sana-Video and SANA-WM, tiny: cross-attention only (their self-attention is linear / recurrent, left
alone), on 3x5 image tokens or 3 latent frames of 3x5 tokens; SANA-WM's LTX-2 refiner, refused."""

from __future__ import annotations

import diffusers
import torch

from . import Refusal, ZooCase, seeded

_TEXT_LEN = 7
_TEXT_DIM = 16


def _sana() -> torch.nn.Module:
    return diffusers.SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=_TEXT_DIM,
        sample_size=8,
        patch_size=2,
    )


def _sana_inputs() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 4, 6, 10, generator=gen),  # patch 2 -> 3 x 5 tokens
        "encoder_hidden_states": torch.randn(1, _TEXT_LEN, _TEXT_DIM, generator=gen),
        "timestep": torch.tensor([500]),
        "return_dict": False,
    }


def _sana_video() -> torch.nn.Module:
    return diffusers.SanaVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=_TEXT_DIM,
        sample_size=8,
        patch_size=(1, 2, 2),
    )


def _video_inputs() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 4, 3, 6, 10, generator=gen),  # (B, C, F, H, W), patch (1, 2, 2): 3 x 3 x 5
        "encoder_hidden_states": torch.randn(1, _TEXT_LEN, _TEXT_DIM, generator=gen),
        "timestep": torch.tensor([500]),
        "return_dict": False,
    }


def _sana_wm() -> torch.nn.Module:
    return diffusers.SanaWMTransformer3DModel(
        in_channels=4,
        num_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        patch_size=(1, 2, 2),
        softmax_every_n=2,  # block 0: gated delta net, block 1: softmax
        linear_head_dim=16,
        chunk_plucker_channels=6,
        chunk_plucker_post_attn_blocks=2,
        caption_channels=_TEXT_DIM,
        image_size=16,
    )


def _sana_wm_inputs() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 4, 3, 6, 10, generator=gen),  # (B, C, T, H, W), patch (1, 2, 2): 3 x 3 x 5
        "timestep": torch.full((1, 1, 3), 500.0),  # per frame
        "encoder_hidden_states": torch.randn(1, 1, _TEXT_LEN, _TEXT_DIM, generator=gen),
        "encoder_attention_mask": torch.ones(1, _TEXT_LEN),
        "return_dict": False,
    }


def _refiner() -> torch.nn.Module:
    return diffusers.SanaWMLTX2RefinerTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        audio_in_channels=4,
        audio_out_channels=4,
        audio_num_attention_heads=2,
        audio_attention_head_dim=4,
        audio_cross_attention_dim=8,
        num_layers=1,
        caption_channels=_TEXT_DIM,
    )


CASES = (
    ZooCase("SanaTransformer2DModel", seeded(_sana), _sana_inputs, (3, 5), text_len=_TEXT_LEN),
    ZooCase("SanaVideoTransformer3DModel", seeded(_sana_video), _video_inputs, (3, 3, 5), text_len=_TEXT_LEN),
    ZooCase("SanaWMTransformer3DModel", seeded(_sana_wm), _sana_wm_inputs, (3, 3, 5), text_len=_TEXT_LEN),
)

REFUSALS = (Refusal("SanaWMLTX2RefinerTransformer3DModel", seeded(_refiner), "K/V cache"),)
