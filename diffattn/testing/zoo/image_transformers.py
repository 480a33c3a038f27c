"""Image transformers with their own token layout (Krea2, HunyuanImage, ...), on a 3x5 token grid with 7 text
tokens."""

from __future__ import annotations

import diffusers
import torch

from . import ZooCase, seeded

_H, _W, _TEXT = 3, 5, 7


def _krea2() -> torch.nn.Module:
    return diffusers.Krea2Transformer2DModel(
        in_channels=8,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=48,
        timestep_embed_dim=32,
        text_hidden_dim=24,
        num_text_layers=3,
        text_num_attention_heads=2,
        text_num_key_value_heads=2,
        text_intermediate_size=48,
        num_layerwise_text_blocks=1,
        num_refiner_text_blocks=1,
        axes_dims_rope=(4, 6, 6),
    )


def _krea2_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    image_ids = torch.zeros(_H, _W, 3)
    image_ids[..., 1] = torch.arange(_H)[:, None]
    image_ids[..., 2] = torch.arange(_W)[None, :]
    return {
        "hidden_states": torch.randn(1, _H * _W, 8, generator=g),
        "encoder_hidden_states": torch.randn(1, _TEXT, 3, 24, generator=g),
        "timestep": torch.tensor([0.5]),
        "position_ids": torch.cat([torch.zeros(_TEXT, 3), image_ids.reshape(-1, 3)]),
        "return_dict": False,
    }


CASES = (ZooCase("Krea2Transformer2DModel", seeded(_krea2), _krea2_inputs, (_H, _W), text_len=_TEXT),)


def _hunyuan_image() -> torch.nn.Module:
    return diffusers.HunyuanImageTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=(1, 1),
        text_embed_dim=24,
        rope_axes_dim=(8, 8),
    )


def _hunyuan_image_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 4, _H, _W, generator=g),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, _TEXT, 24, generator=g),
        "encoder_attention_mask": torch.ones(1, _TEXT, dtype=torch.bool),
        "return_dict": False,
    }


CASES += (
    ZooCase("HunyuanImageTransformer2DModel", seeded(_hunyuan_image), _hunyuan_image_inputs, (_H, _W), text_len=_TEXT),
)


def _glm_image() -> torch.nn.Module:
    return diffusers.GlmImageTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        text_embed_dim=24,
        time_embed_dim=32,
        condition_dim=16,
        prior_vq_quantizer_codebook_size=32,
    )


def _glm_image_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 4, 2 * _H, 2 * _W, generator=g),  # 2x2 patches: a 3x5 grid
        "encoder_hidden_states": torch.randn(1, _TEXT, 24, generator=g),
        "prior_token_id": torch.randint(0, 32, (1, _H * _W), generator=g),
        "prior_token_drop": torch.zeros(1, _H * _W, dtype=torch.bool),
        "timestep": torch.tensor([500.0]),
        "target_size": torch.tensor([[16.0 * _H, 16.0 * _W]]),
        "crop_coords": torch.zeros(1, 2),
        "return_dict": False,
    }


CASES += (ZooCase("GlmImageTransformer2DModel", seeded(_glm_image), _glm_image_inputs, (_H, _W), text_len=_TEXT),)


def _ernie_image() -> torch.nn.Module:
    model = diffusers.ErnieImageTransformer2DModel(
        hidden_size=32,
        num_attention_heads=2,
        num_layers=2,
        ffn_hidden_size=48,
        in_channels=4,
        out_channels=4,
        patch_size=2,
        text_in_dim=24,
        rope_axes_dim=(4, 6, 6),
    )
    # the model zero-initialises its modulation and output layers (output 0 whatever the attention): randomise them
    for layer in (model.adaLN_modulation[-1], model.final_linear):
        torch.nn.init.normal_(layer.weight, std=0.1)
        torch.nn.init.normal_(layer.bias, std=0.1)
    return model


def _ernie_image_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 4, 2 * _H, 2 * _W, generator=g),  # 2x2 patches: a 3x5 grid
        "timestep": torch.tensor([500.0]),
        "text_bth": torch.randn(1, _TEXT, 24, generator=g),
        "text_lens": torch.tensor([_TEXT]),
        "return_dict": False,
    }


CASES += (ZooCase("ErnieImageTransformer2DModel", seeded(_ernie_image), _ernie_image_inputs, (_H, _W), text_len=_TEXT),)
