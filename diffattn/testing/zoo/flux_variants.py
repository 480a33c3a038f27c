"""Flux-built image transformers (packed latents and position ids): Chroma, Bria, LongCat-Image, Ovis-Image, on a
3x5 token grid (patch size 1 over packed latents) with 7 text tokens."""

from __future__ import annotations

import diffusers
import torch

from . import ZooCase, seeded

_H, _W, _TEXT = 3, 5, 7


def _img_ids(h: int, w: int, modality: float = 0.0, start: int = 0) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 0] = modality
    ids[..., 1] = torch.arange(h)[:, None] + start
    ids[..., 2] = torch.arange(w)[None, :] + start
    return ids.reshape(h * w, 3)


def _inputs(channels: int, text_dim: int, timestep: float, **extra) -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, _H * _W, channels, generator=g),
        "encoder_hidden_states": torch.randn(1, _TEXT, text_dim, generator=g),
        "timestep": torch.tensor([timestep]),
        "img_ids": _img_ids(_H, _W),
        "txt_ids": torch.zeros(_TEXT, 3),
        "return_dict": False,
        **extra,
    }


def _chroma() -> torch.nn.Module:
    return diffusers.ChromaTransformer2DModel(
        in_channels=8,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        axes_dims_rope=(4, 6, 6),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )


def _bria() -> torch.nn.Module:
    return diffusers.BriaTransformer2DModel(
        in_channels=8,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        axes_dims_rope=[4, 6, 6],
    )


def _longcat() -> torch.nn.Module:
    return diffusers.LongCatImageTransformer2DModel(
        in_channels=8,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=24,
        axes_dims_rope=[4, 6, 6],
    )


def _longcat_inputs() -> dict:
    # as LongCatImagePipeline builds them: text ids (0, i, i), image ids (1, row + L, col + L) after the L text ids
    inputs = _inputs(8, 24, 0.5)
    inputs["img_ids"] = _img_ids(_H, _W, modality=1.0, start=_TEXT)
    inputs["txt_ids"] = torch.arange(_TEXT, dtype=torch.float32)[:, None].repeat(1, 3) * torch.tensor([0.0, 1, 1])
    return inputs


def _ovis() -> torch.nn.Module:
    return diffusers.OvisImageTransformer2DModel(
        in_channels=8,
        out_channels=8,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        axes_dims_rope=(4, 6, 6),
    )


CASES = (
    ZooCase("ChromaTransformer2DModel", seeded(_chroma), lambda: _inputs(8, 24, 0.5), (_H, _W), text_len=_TEXT),
    ZooCase("BriaTransformer2DModel", seeded(_bria), lambda: _inputs(8, 24, 500.0), (_H, _W), text_len=_TEXT),
    ZooCase("LongCatImageTransformer2DModel", seeded(_longcat), _longcat_inputs, (_H, _W), text_len=_TEXT),
    ZooCase("OvisImageTransformer2DModel", seeded(_ovis), lambda: _inputs(8, 24, 0.5), (_H, _W), text_len=_TEXT),
)


def _bria_fibo() -> torch.nn.Module:
    return diffusers.BriaFiboTransformer2DModel(
        in_channels=8,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        axes_dims_rope=[4, 6, 6],
        text_encoder_dim=12,
    )


def _bria_fibo_inputs() -> dict:
    inputs = _inputs(8, 24, 500.0)
    g = torch.Generator().manual_seed(2)
    inputs["text_encoder_layers"] = [torch.randn(1, _TEXT, 12, generator=g) for _ in range(2)]
    return inputs


def _bria_fibo2() -> torch.nn.Module:
    return diffusers.BriaFibo2Transformer2DModel(
        in_channels=4,
        patch_size=2,
        dim=64,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        cap_feat_dim=24,
        injection_layer_ids=(1,),
        perceiver_num_layers=1,
        min_num_gist_tokens=5,
        max_num_gist_tokens=5,
        gist_step=5,
        gist_min_text_len=4,
        gist_max_text_len=16,
        axes_dims=(8, 12, 12),
        axes_lens=(32, 16, 16),
    )


def _bria_fibo2_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 4, 2 * _H, 2 * _W, generator=g),  # 2x2 patches: a 3x5 grid
        "timestep": torch.tensor([0.5]),
        "encoder_hidden_states": torch.randn(1, 2, _TEXT, 24, generator=g),  # Perceiver bundle + one injection
        "return_dict": False,
    }


CASES += (
    ZooCase("BriaFiboTransformer2DModel", seeded(_bria_fibo), _bria_fibo_inputs, (_H, _W), text_len=_TEXT),
    # the 5 gist tokens play the text
    ZooCase("BriaFibo2Transformer2DModel", seeded(_bria_fibo2), _bria_fibo2_inputs, (_H, _W), text_len=5),
)


def _ids4(h: int, w: int) -> torch.Tensor:
    """(t, h, w, l) ids of a generated image, as Flux2Pipeline._prepare_latent_ids builds them."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1)).float()


def _txt_ids4(n: int) -> torch.Tensor:
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(n)).float()


def _flux2() -> torch.nn.Module:
    return diffusers.Flux2Transformer2DModel(
        in_channels=8,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
    )


def _flux2_inputs() -> dict:
    inputs = _inputs(8, 24, 0.5, guidance=torch.tensor([3.5]))
    inputs["img_ids"] = _ids4(_H, _W)[None]
    inputs["txt_ids"] = _txt_ids4(_TEXT)[None]
    return inputs


def _flux3() -> torch.nn.Module:
    return diffusers.Flux3Transformer2DModel(
        in_channels=8,
        cond_in_channels=8,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        timestep_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
    )


def _flux3_inputs() -> dict:
    inputs = _inputs(8, 24, 0.5)
    inputs["img_ids"] = _ids4(_H, _W)
    inputs["txt_ids"] = _txt_ids4(_TEXT)
    return inputs


CASES += (
    ZooCase("Flux2Transformer2DModel", seeded(_flux2), _flux2_inputs, (_H, _W), text_len=_TEXT),
    ZooCase("Flux3Transformer2DModel", seeded(_flux3), _flux3_inputs, (_H, _W), text_len=_TEXT),
)
