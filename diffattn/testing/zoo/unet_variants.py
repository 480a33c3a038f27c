"""UNets beyond ``UNet2DConditionModel``: unconditional ``UNet2DModel``, DreamLite, Kandinsky 3; and the UNets
diffattn refuses (video UNets with per-frame and temporal attention, Stable Cascade)."""

from __future__ import annotations

import torch

from . import Refusal, ZooCase, seeded

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


_SMALL_3D = dict(
    block_out_channels=(16, 32),
    norm_num_groups=8,
    layers_per_block=1,
    cross_attention_dim=12,
    in_channels=4,
    out_channels=4,
)


def _unet3d() -> torch.nn.Module:
    from diffusers import UNet3DConditionModel

    return UNet3DConditionModel(
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        attention_head_dim=8,
        **_SMALL_3D,
    )


def _unet_motion() -> torch.nn.Module:
    # AnimateDiff: a UNet2DConditionModel with a MotionAdapter's motion modules
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    unet = UNet2DConditionModel(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        **_SMALL_3D,
    )
    adapter = MotionAdapter(
        block_out_channels=(16, 32),
        motion_layers_per_block=1,
        motion_norm_num_groups=8,
        motion_num_attention_heads=2,
        motion_max_seq_length=8,
    )
    return UNetMotionModel.from_unet2d(unet, adapter)


def _unet_svd() -> torch.nn.Module:
    from diffusers import UNetSpatioTemporalConditionModel

    return UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=12,
        num_attention_heads=(2, 4),
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=12,
        in_channels=8,
        out_channels=4,
    )


def _i2vgen_xl() -> torch.nn.Module:
    from diffusers import I2VGenXLUNet

    return I2VGenXLUNet(
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        attention_head_dim=4,
        num_attention_heads=None,
        **_SMALL_3D,
    )


def _transformer_temporal() -> torch.nn.Module:
    from diffusers import TransformerTemporalModel

    return TransformerTemporalModel(num_attention_heads=2, attention_head_dim=4, in_channels=8, norm_num_groups=4)


def _stable_cascade() -> torch.nn.Module:
    from diffusers import StableCascadeUNet

    return StableCascadeUNet(
        in_channels=4,
        out_channels=4,
        conditioning_dim=32,
        block_out_channels=[16, 32],
        num_attention_heads=[-1, 2],
        down_num_layers_per_block=[1, 1],
        up_num_layers_per_block=[1, 1],
        down_blocks_repeat_mappers=[1, 1],
        up_blocks_repeat_mappers=[1, 1],
        block_types_per_layer=[
            ["SDCascadeResBlock", "SDCascadeTimestepBlock"],
            ["SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"],
        ],
        switch_level=None,
        clip_text_pooled_in_channels=8,
        dropout=[0.0, 0.0],
    )


REFUSALS = (
    Refusal("UNetSpatioTemporalConditionModel", seeded(_unet_svd), "spatial attention runs per frame"),
    Refusal("I2VGenXLUNet", seeded(_i2vgen_xl), "spatial attention runs per frame"),
    Refusal("TransformerTemporalModel", seeded(_transformer_temporal), "temporal attention only"),
    Refusal("StableCascadeUNet", seeded(_stable_cascade), "image queries over image \\+ conditioning keys"),
)


def _video_unet_inputs(frames: int, h: int, w: int, text_per_frame: bool) -> dict:
    """``text_per_frame``: the text embeddings come repeated per frame (AnimateDiff's pipeline repeats them; the
    UNet3D repeats them itself)."""
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, 7, 12, generator=g)
    return dict(
        sample=torch.randn(1, 4, frames, h, w, generator=g),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=text.repeat_interleave(frames, 0) if text_per_frame else text,
        return_dict=False,
    )


# video UNets: spatial attention per frame over (h, w) at each level, temporal attention over the 3 frames
CASES = CASES + (
    ZooCase("UNetMotionModel", seeded(_unet_motion), lambda: _video_unet_inputs(3, 5, 7, True), (3, 5, 7), text_len=7),
    ZooCase("UNet3DConditionModel", seeded(_unet3d), lambda: _video_unet_inputs(3, 5, 7, False), (3, 5, 7), text_len=7),
)
