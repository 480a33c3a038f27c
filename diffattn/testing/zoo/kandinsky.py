"""Kandinsky 5 and 6 (:mod:`diffattn.adapters.kandinsky`), tiny, on a 3 x 3 x 5 token grid: ``(B, T, H, W, C)``
latents of 3 frames, 6 x 10, patch (1, 2, 2), with 7 text tokens."""

from __future__ import annotations

from typing import Any

import diffusers
import torch

from . import Refusal, ZooCase, seeded

GRID = (3, 3, 5)
TEXT_LEN = 7
TEXT_DIM = 16
POOLED_DIM = 8
CHANNELS = 4


def _inputs(**extra: Any) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    f, h, w = GRID
    return {
        "hidden_states": torch.randn(1, f, 2 * h, 2 * w, CHANNELS, generator=gen),
        "encoder_hidden_states": torch.randn(1, TEXT_LEN, TEXT_DIM, generator=gen),
        "pooled_projections": torch.randn(1, POOLED_DIM, generator=gen),
        "timestep": torch.tensor([500.0]),
        "return_dict": False,
        **extra,
    }


def _kandinsky5() -> torch.nn.Module:
    model = diffusers.Kandinsky5Transformer3DModel(
        in_visual_dim=CHANNELS,
        in_text_dim=TEXT_DIM,
        in_text_dim2=POOLED_DIM,
        time_dim=16,
        out_visual_dim=CHANNELS,
        patch_size=(1, 2, 2),
        model_dim=24,  # 2 heads of sum(axes_dims) = 12
        ff_dim=48,
        num_text_blocks=1,
        num_visual_blocks=2,
        axes_dims=(4, 4, 4),
    )
    # the AdaLN modulations are zero-initialised (every attention output gated to 0): give them weights
    for name, param in model.named_parameters():
        if "modulation" in name:
            torch.nn.init.normal_(param, std=0.2)
    return model


def _kandinsky5_inputs() -> dict[str, Any]:
    f, h, w = GRID
    return _inputs(
        visual_rope_pos=[torch.arange(f), torch.arange(h), torch.arange(w)],
        text_rope_pos=torch.arange(TEXT_LEN),
    )


def _kandinsky6() -> torch.nn.Module:
    return diffusers.Kandinsky6Transformer3DModel(
        in_visual_dim=CHANNELS,
        out_visual_dim=CHANNELS,
        in_text_dim=TEXT_DIM,
        in_text_dim2=POOLED_DIM,
        time_dim=16,
        patch_size=(1, 2, 2),
        model_dim=24,
        ff_dim=48,
        num_text_blocks=1,
        num_visual_blocks=2,
        axes_dims=(4, 4, 4),
        visual_cond=False,
        in_audio_dim=4,
        out_audio_dim=4,
    )


def _kandinsky6_sr() -> torch.nn.Module:
    return diffusers.Kandinsky6SRTransformer3DModel(
        in_visual_dim=CHANNELS,
        out_visual_dim=CHANNELS,
        time_dim=16,
        model_dim=24,
        ff_dim=48,
        num_visual_blocks=1,
        axes_dims=(4, 4, 4),
    )


CASES = (
    ZooCase("Kandinsky5Transformer3DModel", seeded(_kandinsky5), _kandinsky5_inputs, GRID, text_len=TEXT_LEN),
    ZooCase("Kandinsky6Transformer3DModel", seeded(_kandinsky6), _inputs, GRID, text_len=TEXT_LEN),
)

REFUSALS = (Refusal("Kandinsky6SRTransformer3DModel", seeded(_kandinsky6_sr), "NABLA sparse attention"),)
