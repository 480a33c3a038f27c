"""``BasicTransformerBlock`` DiTs: DiT (class labels), PixArt and ``Transformer2DModel`` (continuous and patched)."""

from __future__ import annotations

import torch

from . import ZooCase, seeded


def _randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _dit() -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        num_layers=2,
        norm_num_groups=1,
        sample_size=6,
        patch_size=2,
    )


def _dit_inputs() -> dict:
    # DiT's unpatchify assumes a square grid: 6x6 latents, patch 2 -> 3x3 tokens (odd, but square)
    return dict(hidden_states=_randn(1, 4, 6, 6), timestep=torch.tensor([500]), class_labels=torch.tensor([3]))


def _pixart() -> torch.nn.Module:
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=16,
        caption_channels=12,
        sample_size=8,
        patch_size=2,
        use_additional_conditions=False,
    )


def _pixart_inputs() -> dict:
    # 6x10 latents, patch 2 -> 3x5 tokens; 7 caption tokens
    return dict(
        hidden_states=_randn(1, 4, 6, 10),
        encoder_hidden_states=_randn(1, 7, 12, seed=2),
        timestep=torch.tensor([500]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


def _t2d_continuous() -> torch.nn.Module:
    from diffusers import Transformer2DModel

    return Transformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=8,
        norm_num_groups=4,
        num_layers=2,
        cross_attention_dim=12,
    )


def _t2d_continuous_inputs() -> dict:
    # no patching: 3x5 latents -> 3x5 tokens; 7 text tokens
    return dict(hidden_states=_randn(1, 8, 3, 5), encoder_hidden_states=_randn(1, 7, 12, seed=2))


def _t2d_patched() -> torch.nn.Module:
    from diffusers import Transformer2DModel

    return Transformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        cross_attention_dim=16,
        caption_channels=12,
        sample_size=8,
        patch_size=2,
        norm_type="ada_norm_single",
        num_embeds_ada_norm=1000,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )


def _t2d_patched_inputs() -> dict:
    # 6x10 latents, patch 2 -> 3x5 tokens; 7 caption tokens
    return dict(
        hidden_states=_randn(1, 4, 6, 10),
        encoder_hidden_states=_randn(1, 7, 12, seed=2),
        timestep=torch.tensor([500]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


CASES = (
    ZooCase("DiTTransformer2DModel", seeded(_dit), _dit_inputs, (3, 3)),
    ZooCase("PixArtTransformer2DModel", seeded(_pixart), _pixart_inputs, (3, 5), text_len=7),
    ZooCase(
        "Transformer2DModel",
        seeded(_t2d_continuous),
        _t2d_continuous_inputs,
        (3, 5),
        text_len=7,
        name="Transformer2DModel[continuous]",
    ),
    ZooCase(
        "Transformer2DModel",
        seeded(_t2d_patched),
        _t2d_patched_inputs,
        (3, 5),
        text_len=7,
        name="Transformer2DModel[patched]",
    ),
)


def _hunyuan_dit() -> torch.nn.Module:
    from diffusers import HunyuanDiT2DModel

    return HunyuanDiT2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        patch_size=2,
        sample_size=8,
        hidden_size=16,
        num_layers=4,  # the long skips need an even count
        cross_attention_dim=12,
        cross_attention_dim_t5=32,
        pooled_projection_dim=10,
        text_len=4,
        text_len_t5=3,
        use_style_cond_and_image_meta_size=False,
    )


def _hunyuan_dit_inputs() -> dict:
    # 6x10 latents, patch 2 -> 3x5 tokens; 4 CLIP + 3 T5 text tokens (one 7-token cross-attention sequence)
    return dict(
        hidden_states=_randn(1, 4, 6, 10),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=_randn(1, 4, 12, seed=2),
        text_embedding_mask=torch.ones(1, 4, dtype=torch.long),
        encoder_hidden_states_t5=_randn(1, 3, 32, seed=3),
        text_embedding_mask_t5=torch.ones(1, 3, dtype=torch.long),
    )


CASES = (*CASES, ZooCase("HunyuanDiT2DModel", seeded(_hunyuan_dit), _hunyuan_dit_inputs, (3, 5), text_len=7))


def _dreamlite() -> torch.nn.Module:
    from diffusers import DreamLiteTransformer2DModel

    return DreamLiteTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=8,
        norm_num_groups=4,
        num_layers=2,
        cross_attention_dim=12,
        qk_norm="rms_norm",
    )


CASES = (
    *CASES,
    ZooCase("DreamLiteTransformer2DModel", seeded(_dreamlite), _t2d_continuous_inputs, (3, 5), text_len=7),
)
