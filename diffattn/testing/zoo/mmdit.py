"""MMDiT-style joint text + image models: AuraFlow."""

from __future__ import annotations

import torch

from . import ZooCase, seeded


def _randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _auraflow() -> torch.nn.Module:
    from diffusers import AuraFlowTransformer2DModel

    return AuraFlowTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        caption_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=64,
    )


def _auraflow_inputs() -> dict:
    # 6x10 latents, patch 2 -> 3x5 tokens; 7 caption tokens (+ the model's 8 registers: 15 text tokens)
    return dict(
        hidden_states=_randn(1, 4, 6, 10), encoder_hidden_states=_randn(1, 7, 12, seed=2), timestep=torch.tensor([0.5])
    )


CASES = (ZooCase("AuraFlowTransformer2DModel", seeded(_auraflow), _auraflow_inputs, (3, 5), text_len=15),)
