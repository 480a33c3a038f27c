"""Lumina-Next, Lumina-Image 2.0 and Z-Image."""

from __future__ import annotations

import functools

import torch

from . import ZooCase, seeded


def _randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _lumina_next() -> torch.nn.Module:
    from diffusers import LuminaNextDiT2DModel

    return LuminaNextDiT2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=16,
        num_layers=2,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=8,
        cross_attention_dim=12,
    )


def _lumina_next_inputs() -> dict:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    # 6x10 latents, patch 2 -> 3x5 tokens; 7 caption tokens
    return dict(
        hidden_states=_randn(1, 4, 6, 10),
        timestep=torch.tensor([0.5]),
        encoder_hidden_states=_randn(1, 7, 12, seed=2),
        encoder_mask=torch.ones(1, 7, dtype=torch.long),
        image_rotary_emb=get_2d_rotary_pos_embed_lumina(8, 16, 16),
        cross_attention_kwargs={},
    )


def _lumina2() -> torch.nn.Module:
    from diffusers import Lumina2Transformer2DModel

    return Lumina2Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=24,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=8,
        axes_dim_rope=(4, 4, 4),
        axes_lens=(32, 32, 32),
        cap_feat_dim=12,
    )


def _lumina2_inputs() -> dict:
    # 6x10 latents, patch 2 -> 3x5 tokens; 7 caption tokens, all unmasked
    return dict(
        hidden_states=_randn(1, 4, 6, 10),
        timestep=torch.tensor([0.5]),
        encoder_hidden_states=_randn(1, 7, 12, seed=2),
        encoder_attention_mask=torch.ones(1, 7, dtype=torch.bool),
    )


CASES = (
    ZooCase("LuminaNextDiT2DModel", seeded(_lumina_next), _lumina_next_inputs, (3, 5), text_len=7),
    ZooCase("Lumina2Transformer2DModel", seeded(_lumina2), _lumina2_inputs, (3, 5), text_len=7),
)


def _z_image() -> torch.nn.Module:
    from diffusers import ZImageTransformer2DModel

    class StackedZImage(ZImageTransformer2DModel):
        """The stock model whose output (a list with one latent per entry) is stacked into one tensor, which the
        zoo's tests compare; its forward signature is the stock one (``functools.wraps``), so the adapter reads the
        same inputs."""

        @functools.wraps(ZImageTransformer2DModel.forward)
        def forward(self, *args, **kwargs):
            kwargs["return_dict"] = False
            return (torch.stack(super().forward(*args, **kwargs)[0]),)

    return StackedZImage(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=12,
        axes_dims=[4, 6, 6],
        axes_lens=[256, 64, 64],
    )


def _z_image_inputs() -> dict:
    # one (C, F, H, W) = (4, 1, 6, 64) latent, patch 2 -> 3x32 tokens (Z-Image pads image tokens to a multiple of 32,
    # so an odd side needs the other to carry the 32); 7 caption tokens (padded by the model to 32, at the end).
    # The pipeline passes lists of per-entry tensors; the model iterates them, so batched tensors work alike (and
    # give the zoo's test a batch size).
    return dict(x=_randn(1, 4, 1, 6, 64), t=torch.tensor([0.5]), cap_feats=_randn(1, 7, 12, seed=2))


CASES = (*CASES, ZooCase("ZImageTransformer2DModel", seeded(_z_image), _z_image_inputs, (3, 32), text_len=7))
