"""Models built on the Wan 2.1 backbone (:mod:`diffattn.adapters.wan_variants`), tiny, on a 3 x 3 x 5 token grid
(3 latent frames, 6 x 10 latents, patch (1, 2, 2)), with 7 text tokens."""

from __future__ import annotations

from typing import Any

import diffusers
import torch

from . import Refusal, ZooCase, seeded

GRID = (3, 3, 5)
TEXT_LEN = 7
TEXT_DIM = 16
_WAN = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,  # RoPE split t/h/w = 4/4/4
    text_dim=TEXT_DIM,
    freq_dim=32,
    ffn_dim=48,
    num_layers=2,
    rope_max_seq_len=32,
)


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _wan_inputs(channels: int = 16, **extra: Any) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    f, h, w = GRID
    return {
        "hidden_states": _randn(gen, 1, channels, f, 2 * h, 2 * w),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": _randn(gen, 1, TEXT_LEN, TEXT_DIM),
        "return_dict": False,
        **extra,
    }


def _vace() -> torch.nn.Module:
    return diffusers.WanVACETransformer3DModel(
        **_WAN, in_channels=16, out_channels=16, vace_layers=[0], vace_in_channels=8
    )


def _vace_inputs() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    f, h, w = GRID
    return _wan_inputs(control_hidden_states=_randn(gen, 1, 8, f, 2 * h, 2 * w))


def _skyreels() -> torch.nn.Module:
    return diffusers.SkyReelsV2Transformer3DModel(**_WAN, in_channels=16, out_channels=16)


def _chronoedit() -> torch.nn.Module:
    return diffusers.ChronoEditTransformer3DModel(**_WAN, in_channels=16, out_channels=16)


def _anyflow() -> torch.nn.Module:
    return diffusers.AnyFlowTransformer3DModel(**_WAN, in_channels=16, out_channels=16)


def _anyflow_inputs() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    f, h, w = GRID
    return {
        "hidden_states": _randn(gen, 1, f, 16, 2 * h, 2 * w),  # (B, F, C, H, W)
        "timestep": torch.full((1, f), 500.0),  # per latent frame
        "r_timestep": torch.full((1, f), 250.0),
        "encoder_hidden_states": _randn(gen, 1, TEXT_LEN, TEXT_DIM),
        "return_dict": False,
    }


def _wan_animate() -> torch.nn.Module:
    return diffusers.WanAnimateTransformer3DModel(
        **_WAN,
        in_channels=12,  # 2 * latent_channels + 4
        latent_channels=4,
        out_channels=4,
        image_dim=None,
        motion_encoder_channel_sizes={"4": 8, "8": 8, "16": 8},
        motion_encoder_size=16,
        motion_style_dim=8,
        motion_dim=4,
        motion_encoder_dim=16,
        face_encoder_hidden_dim=8,
        face_encoder_num_heads=2,
        inject_face_latents_blocks=2,
    )


def _wan_animate_inputs() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    f, h, w = GRID
    # 5 face frames -> 2 motion frames after the face encoder's two stride-2 convs, + 1 padding frame = 3, which
    # divides the 45 video tokens (the face adapter attends per chunk of 15 tokens)
    return _wan_inputs(
        channels=12,
        pose_hidden_states=_randn(gen, 1, 4, f - 1, 2 * h, 2 * w),
        face_pixel_values=_randn(gen, 1, 3, 5, 16, 16),
    )


def _anyflow_far() -> torch.nn.Module:
    return diffusers.AnyFlowFARTransformer3DModel(**_WAN, in_channels=16, out_channels=16)


def _wan_animate_2() -> torch.nn.Module:
    return diffusers.WanAnimate2Transformer3DModel(
        text_len=TEXT_LEN,
        in_dim=12,
        dim=24,
        ffn_dim=48,
        freq_dim=32,
        text_dim=TEXT_DIM,
        out_dim=4,
        num_heads=2,
        num_layers=2,
        use_img_emb=False,
    )


def _helios() -> torch.nn.Module:
    return diffusers.HeliosTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=TEXT_DIM,
        freq_dim=32,
        ffn_dim=48,
        num_layers=1,
        rope_dim=(4, 4, 4),
    )


def _case(model_class: str, build: Any, inputs: Any) -> ZooCase:
    return ZooCase(model_class, seeded(build), inputs, GRID, text_len=TEXT_LEN)


CASES = (
    _case("WanVACETransformer3DModel", _vace, _vace_inputs),
    _case("SkyReelsV2Transformer3DModel", _skyreels, _wan_inputs),
    _case("ChronoEditTransformer3DModel", _chronoedit, _wan_inputs),
    _case("AnyFlowTransformer3DModel", _anyflow, _anyflow_inputs),
    _case("WanAnimateTransformer3DModel", _wan_animate, _wan_animate_inputs),
)

REFUSALS = (
    Refusal("AnyFlowFARTransformer3DModel", seeded(_anyflow_far), "frame-autoregressive"),
    Refusal("WanAnimate2Transformer3DModel", seeded(_wan_animate_2), "flex backend with a BlockMask"),
    Refusal("HeliosTransformer3DModel", seeded(_helios), "history latents"),
)
