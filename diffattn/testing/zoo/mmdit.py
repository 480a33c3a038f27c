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


def _ideogram4() -> torch.nn.Module:
    from diffusers import Ideogram4Transformer2DModel

    return Ideogram4Transformer2DModel(
        in_channels=8,
        num_layers=2,
        attention_head_dim=12,
        num_attention_heads=2,
        intermediate_size=32,
        adaln_dim=16,
        llm_features_dim=20,
        mrope_section=(2, 2, 2),
    )


def _ideogram4_inputs() -> dict:
    # the pipeline's packed row: 2 left-pad + 5 text tokens (a 7-token text run), then a 3x5 image (15 tokens)
    from diffusers.models.transformers.transformer_ideogram4 import (
        IMAGE_POSITION_OFFSET,
        LLM_TOKEN_INDICATOR,
        OUTPUT_IMAGE_INDICATOR,
        SEQUENCE_PADDING_INDICATOR,
    )

    pad, text, h, w = 2, 5, 3, 5
    length = pad + text + h * w
    positions = torch.zeros(1, length, 3, dtype=torch.long)
    positions[0, pad : pad + text] = torch.arange(text)[:, None]
    rows, cols = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    positions[0, pad + text :] = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1) + IMAGE_POSITION_OFFSET
    indicator = torch.zeros(1, length, dtype=torch.long)
    indicator[0, pad : pad + text] = LLM_TOKEN_INDICATOR
    indicator[0, pad + text :] = OUTPUT_IMAGE_INDICATOR
    segments = torch.full((1, length), SEQUENCE_PADDING_INDICATOR, dtype=torch.long)
    segments[0, pad:] = 1
    return dict(
        hidden_states=_randn(1, length, 8),
        timestep=torch.tensor([0.5]),
        encoder_hidden_states=_randn(1, length, 20, seed=2),
        position_ids=positions,
        segment_ids=segments,
        indicator=indicator,
    )


CASES = (*CASES, ZooCase("Ideogram4Transformer2DModel", seeded(_ideogram4), _ideogram4_inputs, (3, 5), text_len=7))


def _omnigen() -> torch.nn.Module:
    from diffusers import OmniGenTransformer2DModel

    return OmniGenTransformer2DModel(
        in_channels=4,
        patch_size=2,
        hidden_size=16,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=32,
        num_layers=2,
        pad_token_id=0,
        vocab_size=50,
        rope_scaling={"short_factor": [1.0] * 4, "long_factor": [1.0] * 4},
        pos_embed_max_size=16,
        time_step_dim=8,
    )


def _omnigen_inputs() -> dict:
    # 6 prompt tokens + the time token (a 7-token text run), then 6x10 latents, patch 2 -> 3x5 image tokens; the
    # processor's mask: causal over the text run (which does not see the image), the image sees everything
    text, image = 7, 15
    length = text + image
    mask = torch.zeros(1, length, length)
    mask[0, :text, :text] = torch.tril(torch.ones(text, text))
    mask[0, text:] = 1
    return dict(
        hidden_states=_randn(1, 4, 6, 10),
        timestep=torch.tensor([500.0]),
        input_ids=torch.arange(1, 7)[None],
        input_img_latents=[],
        input_image_sizes={},
        attention_mask=mask,
        position_ids=torch.arange(length)[None],
    )


CASES = (*CASES, ZooCase("OmniGenTransformer2DModel", seeded(_omnigen), _omnigen_inputs, (3, 5), text_len=7))


def _hidream() -> torch.nn.Module:
    from diffusers import HiDreamImageTransformer2DModel

    return HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=[12, 10],
        text_emb_dim=6,
        num_routed_experts=2,
        num_activated_experts=1,
        axes_dims_rope=(4, 2, 2),
        max_resolution=(6, 10),  # max_seq 15: the non-square 3x5 grid below fills it, so the model adds no padding
        llama_layers=(0, 1),
        force_inference_output=True,
    )


def _hidream_inputs() -> dict:
    # 6x10 latents, patch 2 -> 3x5 tokens; text: 3 T5 + 2 x 2 Llama tokens = 7
    return dict(
        hidden_states=_randn(1, 4, 6, 10),
        timesteps=torch.tensor([500]),
        encoder_hidden_states_t5=_randn(1, 3, 12, seed=2),
        encoder_hidden_states_llama3=_randn(2, 1, 2, 10, seed=3),
        pooled_embeds=_randn(1, 6, seed=4),
    )


CASES = (*CASES, ZooCase("HiDreamImageTransformer2DModel", seeded(_hidream), _hidream_inputs, (3, 5), text_len=7))
