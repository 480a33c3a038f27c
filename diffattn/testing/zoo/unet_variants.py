"""UNets beyond ``UNet2DConditionModel``: unconditional ``UNet2DModel``, DreamLite, Kandinsky 3; and the UNets
diffattn refuses (video UNets with per-frame and temporal attention, Stable Cascade)."""

from __future__ import annotations

import torch

from . import ZooCase, seeded

_TEXT_LEN = 7


def _unet2d(levels: int) -> torch.nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16)[:levels],
        layers_per_block=1,
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D")[:levels],
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D")[:levels],
        attention_head_dim=4,
        norm_num_groups=4,
    )


def _unet2d_inputs(h: int, w: int) -> dict:
    torch.manual_seed(1)
    return {"sample": torch.randn(1, 3, h, w), "timestep": torch.tensor([10])}


def _dreamlite() -> torch.nn.Module:
    from diffusers import DreamLiteUNetModel

    return DreamLiteUNetModel(
        in_channels=4,
        out_channels=4,
        down_block_types=("DreamLiteCrossAttnDownBlock2D", "DreamLiteCrossAttnNoSelfAttnDownBlock2D"),
        mid_block_type="DreamLiteUNetMidBlock2DCrossAttn",
        up_block_types=("DreamLiteCrossAttnNoSelfAttnUpBlock2D", "DreamLiteCrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=12,
        attention_head_dim=8,
        num_kv_heads=1,
        ff_mult=2,
    )


def _dreamlite_inputs() -> dict:
    torch.manual_seed(1)
    return {
        "sample": torch.randn(1, 4, 5, 7),
        "timestep": torch.tensor([10]),
        "encoder_hidden_states": torch.randn(1, _TEXT_LEN, 12),
    }


def _kandinsky3() -> torch.nn.Module:
    from diffusers import Kandinsky3UNet

    return Kandinsky3UNet(
        in_channels=4,
        time_embedding_dim=4,
        groups=2,
        attention_head_dim=4,
        layers_per_block=2,
        block_out_channels=(16, 32),
        cross_attention_dim=8,
        encoder_hid_dim=12,
    )


def _kandinsky3_inputs() -> dict:
    torch.manual_seed(1)
    return {
        "sample": torch.randn(1, 4, 6, 10),
        "timestep": torch.tensor([10]),
        "encoder_hidden_states": torch.randn(1, _TEXT_LEN, 12),
        "encoder_attention_mask": torch.ones(1, _TEXT_LEN),
    }


CASES = (
    # one level: every attention sees the input's 3 x 5 grid
    ZooCase("UNet2DModel", seeded(lambda: _unet2d(1)), lambda: _unet2d_inputs(3, 5), (3, 5), name="UNet2DModel[1lvl]"),
    # two levels (UNet2DModel needs sizes divisible by 2): 6 x 10, then 3 x 5
    ZooCase(
        "UNet2DModel", seeded(lambda: _unet2d(2)), lambda: _unet2d_inputs(6, 10), (6, 10), name="UNet2DModel[2lvl]"
    ),
    ZooCase("DreamLiteUNetModel", seeded(_dreamlite), _dreamlite_inputs, (5, 7), text_len=_TEXT_LEN),
    # Kandinsky 3's first level has no attention; the second sees 3 x 5
    ZooCase("Kandinsky3UNet", seeded(_kandinsky3), _kandinsky3_inputs, (6, 10), text_len=_TEXT_LEN),
)
