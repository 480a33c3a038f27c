"""LTX-2, tiny: video self- and cross-attention over 3 latent frames of 3x5 tokens (patch 1, packed latents);
the audio stream and the audio <-> video attention are left alone."""

from __future__ import annotations

import diffusers
import torch

from . import ZooCase, seeded

_TEXT_LEN = 7


def _ltx2(**overrides) -> torch.nn.Module:
    """The tiny LTX-2 transformer (``overrides``: config values a pipeline needs otherwise)."""
    config = dict(
        in_channels=4,
        out_channels=4,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        audio_in_channels=4,
        audio_out_channels=4,
        audio_num_attention_heads=2,
        audio_attention_head_dim=4,
        audio_cross_attention_dim=8,
        num_layers=2,
        qk_norm="rms_norm_across_heads",
        caption_channels=16,
        rope_double_precision=False,
    )
    return diffusers.LTX2VideoTransformer3DModel(**{**config, **overrides})


def _inputs() -> dict:
    gen = torch.Generator().manual_seed(0)
    f, h, w = 3, 3, 5
    return {
        "hidden_states": torch.randn(1, f * h * w, 4, generator=gen),  # packed, patch 1: 3 x 3 x 5 tokens
        "audio_hidden_states": torch.randn(1, 9, 4, generator=gen),
        "encoder_hidden_states": torch.randn(1, _TEXT_LEN, 16, generator=gen),
        "audio_encoder_hidden_states": torch.randn(1, _TEXT_LEN, 16, generator=gen),
        "timestep": torch.tensor([500.0]),
        "encoder_attention_mask": torch.ones(1, _TEXT_LEN).bool(),
        "num_frames": f,
        "height": h,
        "width": w,
        "audio_num_frames": 9,
        "fps": 25.0,
        "return_dict": False,
    }


CASES = (ZooCase("LTX2VideoTransformer3DModel", seeded(_ltx2), _inputs, (3, 3, 5), text_len=_TEXT_LEN),)
