"""JoyImage Edit transformers: the visual tokens on a (3, 3, 5) grid (frames or stacked items x 3 x 5) with 7 text
tokens."""

from __future__ import annotations

import diffusers
import torch

from . import ZooCase, seeded

_F, _H, _W, _TEXT = 3, 3, 5, 7

_CONFIG = dict(
    patch_size=[1, 2, 2],
    in_channels=4,
    hidden_size=32,
    num_attention_heads=2,
    text_dim=24,
    mlp_width_ratio=2.0,
    num_layers=2,
    rope_dim_list=[4, 6, 6],
)


def _edit() -> torch.nn.Module:
    return diffusers.JoyImageEditTransformer3DModel(**_CONFIG)


def _edit_inputs(items: int) -> dict:
    g = torch.Generator().manual_seed(1)
    if items:  # (B, N, C, T, H, W): N single-frame items, stacked on the frame axis by the model
        latents = torch.randn(1, items, 4, 1, 2 * _H, 2 * _W, generator=g)
    else:  # (B, C, T, H, W), 1x2x2 patches
        latents = torch.randn(1, 4, _F, 2 * _H, 2 * _W, generator=g)
    return {
        "hidden_states": latents,
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, _TEXT, 24, generator=g),
        "return_dict": False,
    }


def _edit_plus() -> torch.nn.Module:
    return diffusers.JoyImageEditPlusTransformer3DModel(**_CONFIG)


def _edit_plus_inputs() -> dict:
    # a 1-frame target and two 1-frame references of the same size: three components of 3x5 patches
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, _F * _H * _W, 4, 1, 2, 2, generator=g),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, _TEXT, 24, generator=g),
        "encoder_hidden_states_mask": torch.ones(1, _TEXT),
        "shape_list": [[(1, _H, _W)] * _F],
        "return_dict": False,
    }


CASES = (
    ZooCase(
        "JoyImageEditTransformer3DModel",
        seeded(_edit),
        lambda: _edit_inputs(0),
        (_F, _H, _W),
        text_len=_TEXT,
        name="JoyImageEditTransformer3DModel[frames]",
    ),
    ZooCase(
        "JoyImageEditTransformer3DModel",
        seeded(_edit),
        lambda: _edit_inputs(_F),
        (_F, _H, _W),
        text_len=_TEXT,
        name="JoyImageEditTransformer3DModel[items]",
    ),
    ZooCase("JoyImageEditPlusTransformer3DModel", seeded(_edit_plus), _edit_plus_inputs, (_F, _H, _W), text_len=_TEXT),
)
