"""CogView3-Plus and CogView4, tiny: joint text-first attention over a 3x5 patched grid (latents 6x10, patch 2)."""

from __future__ import annotations

import diffusers
import torch

from . import ZooCase, seeded

_TEXT_LEN = 7
_TEXT_DIM = 24


def _cogview_inputs(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, 4, 6, 10, generator=gen),  # patch 2 -> 3 x 5 tokens
        "encoder_hidden_states": torch.randn(1, _TEXT_LEN, _TEXT_DIM, generator=gen),
        "timestep": torch.tensor([500]),
        "original_size": torch.tensor([[48.0, 80.0]]),
        "target_size": torch.tensor([[48.0, 80.0]]),
        "crop_coords": torch.tensor([[0.0, 0.0]]),
        "return_dict": False,
    }


def _cogview3plus() -> torch.nn.Module:
    return diffusers.CogView3PlusTransformer2DModel(
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        out_channels=4,
        text_embed_dim=_TEXT_DIM,
        time_embed_dim=16,
        condition_dim=4,
        pos_embed_max_size=8,
        sample_size=8,
    )


def _cogview4() -> torch.nn.Module:
    return diffusers.CogView4Transformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        text_embed_dim=_TEXT_DIM,
        time_embed_dim=16,
        condition_dim=4,
        pos_embed_max_size=8,
        sample_size=8,
        rope_axes_dim=(4, 4),
    )


CASES = (
    ZooCase("CogView3PlusTransformer2DModel", seeded(_cogview3plus), _cogview_inputs, (3, 5), text_len=_TEXT_LEN),
    ZooCase("CogView4Transformer2DModel", seeded(_cogview4), _cogview_inputs, (3, 5), text_len=_TEXT_LEN),
)
