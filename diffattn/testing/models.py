"""Tiny denoisers of each family, built from small configs with seeded random weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .families import (
    _HUNYUAN_POOLED_DIM,
    _LTX_CHANNELS,
    _SDXL_POOLED_DIM,
    _SDXL_TIME_EMBED_DIM,
    _TEXT_DIM,
    COGVIDEOX_TEXT_LEN,
    SD3_POS_EMBED_MAX,
    WAN_ROPE_MAX,
    _check_family,
)

if TYPE_CHECKING:
    pass


def _build_model(family: str) -> torch.nn.Module:
    import diffusers

    if family == "unet_sd15":
        # SD1.5 layout shrunk to two levels: attention at full resolution and in the mid block.
        return diffusers.UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=2,
            norm_num_groups=8,
            cross_attention_dim=_TEXT_DIM,
            attention_head_dim=(2, 4),  # SD1.5 meaning: number of heads -> head dim 16
        )
    if family == "unet_sdxl":
        # SDXL layout shrunk to two levels: plain first level, linear-projection transformers below.
        return diffusers.UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2),
            norm_num_groups=8,
            cross_attention_dim=_TEXT_DIM,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=_SDXL_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=6 * _SDXL_TIME_EMBED_DIM + _SDXL_POOLED_DIM,
        )
    if family == "sd3":
        return diffusers.SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=_TEXT_DIM,
            caption_projection_dim=32,  # must equal heads * head_dim
            pooled_projection_dim=_TEXT_DIM,
            pos_embed_max_size=SD3_POS_EMBED_MAX,
            dual_attention_layers=(0,),  # SD3.5 style: block 0 has an extra self-attention `attn2`
            qk_norm="rms_norm",
        )
    if family == "flux":
        return diffusers.FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels packed 2x2
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=_TEXT_DIM,
            pooled_projection_dim=_TEXT_DIM,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        )
    if family == "wan":
        return diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,  # RoPE split t/h/w = 4/4/4
            in_channels=16,
            out_channels=16,
            text_dim=_TEXT_DIM,
            freq_dim=32,
            ffn_dim=48,
            num_layers=2,
            rope_max_seq_len=WAN_ROPE_MAX,
        )
    if family == "cogvideox":
        return diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=4,
            time_embed_dim=32,
            text_embed_dim=_TEXT_DIM,
            num_layers=2,
            sample_width=16,
            sample_height=16,
            sample_frames=9,  # 3 latent frames; other sizes recompute the sin-cos table
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=COGVIDEOX_TEXT_LEN,
            use_rotary_positional_embeddings=False,
            use_learned_positional_embeddings=False,
        )
    if family == "hunyuan_video":
        return diffusers.HunyuanVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=1,
            num_single_layers=1,
            num_refiner_layers=1,
            mlp_ratio=2.0,
            patch_size=2,
            patch_size_t=1,
            guidance_embeds=True,
            text_embed_dim=_TEXT_DIM,
            pooled_projection_dim=_HUNYUAN_POOLED_DIM,
            rope_axes_dim=(4, 6, 6),  # sums to attention_head_dim
        )
    if family == "ltx_video":
        return diffusers.LTXVideoTransformer3DModel(
            in_channels=_LTX_CHANNELS,
            out_channels=_LTX_CHANNELS,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=2,
            attention_head_dim=16,
            cross_attention_dim=32,  # must equal heads * head_dim
            num_layers=2,
            caption_channels=_TEXT_DIM,
        )
    raise AssertionError(family)  # unreachable: _check_family ran first


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """Random-weight tiny model of that family, eval mode, fp32, CPU, deterministic for a seed.

    The global torch RNG state is left untouched.
    """
    _check_family(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build_model(family)
    if any(p.dtype != torch.float32 for p in model.parameters()):  # only if the default dtype was changed
        model = model.float()
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
