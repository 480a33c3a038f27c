"""Qwen-Image transformers (packed latents, ``img_shapes``) on a 3x5 token grid with 7 text tokens."""

from __future__ import annotations

import diffusers
import torch

from . import Refusal, ZooCase, seeded

_H, _W, _TEXT = 3, 5, 7


def _qwenimage() -> torch.nn.Module:
    return diffusers.QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        axes_dims_rope=(4, 6, 6),
    )


def _qwenimage_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, _H * _W, 16, generator=g),  # 4 channels packed 2x2
        "encoder_hidden_states": torch.randn(1, _TEXT, 24, generator=g),
        "encoder_hidden_states_mask": torch.ones(1, _TEXT),
        "timestep": torch.tensor([0.5]),
        "img_shapes": [[(1, _H, _W)]],
        "return_dict": False,
    }


CASES = (ZooCase("QwenImageTransformer2DModel", seeded(_qwenimage), _qwenimage_inputs, (_H, _W), text_len=_TEXT),)


def _qwenimage21() -> torch.nn.Module:
    return diffusers.QwenImage21Transformer2DModel(
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        context_in_dim=24,
        axes_dims_rope=(4, 6, 6),
    )


REFUSALS = (Refusal("QwenImage21Transformer2DModel", seeded(_qwenimage21), "block-causal attention"),)
