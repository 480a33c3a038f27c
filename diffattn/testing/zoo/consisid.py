"""ConsisID, tiny: joint text-first attention over 3 latent frames of 3x5 patched tokens (latents 6x10, patch 2)."""

from __future__ import annotations

import diffusers
import torch

from . import ZooCase, seeded

_TEXT_LEN = 7
_TEXT_DIM = 24


def _consisid() -> torch.nn.Module:
    return diffusers.ConsisIDTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=16,
        text_embed_dim=_TEXT_DIM,
        num_layers=2,
        sample_width=10,
        sample_height=6,
        sample_frames=9,  # (9 - 1) // 4 + 1 = 3 latent frames
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=_TEXT_LEN,
        use_rotary_positional_embeddings=False,
        use_learned_positional_embeddings=False,
    )


def _consisid_inputs() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 3, 4, 6, 10, generator=gen),  # (B, F, C, H, W): 3 x (6/2) x (10/2)
        "encoder_hidden_states": torch.randn(1, _TEXT_LEN, _TEXT_DIM, generator=gen),
        "timestep": torch.tensor([500]),
        "return_dict": False,
    }


CASES = (ZooCase("ConsisIDTransformer3DModel", seeded(_consisid), _consisid_inputs, (3, 3, 5), text_len=_TEXT_LEN),)
