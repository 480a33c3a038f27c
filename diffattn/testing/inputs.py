"""Inputs for the tiny denoisers whose visual token grid is a requested size, and that grid read back."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .families import (
    _HUNYUAN_POOLED_DIM,
    _LTX_CHANNELS,
    _SDXL_POOLED_DIM,
    _TEXT_DIM,
    _TIMESTEP,
    COGVIDEOX_TEXT_LEN,
    SD3_POS_EMBED_MAX,
    VIDEO_FAMILIES,
    WAN_ROPE_MAX,
    _check_family,
)

if TYPE_CHECKING:
    pass


def _check_grid(family: str, grid: tuple[int, ...]) -> tuple[int, ...]:
    grid = tuple(int(g) for g in grid)
    want = 3 if family in VIDEO_FAMILIES else 2
    if len(grid) != want:
        kind = "(f, h, w)" if want == 3 else "(h, w)"
        raise ValueError(f"{family} needs a {kind} grid, got {grid}")
    if min(grid) < 1:
        raise ValueError(f"grid sizes must be >= 1, got {grid}")
    if family == "sd3" and max(grid) > SD3_POS_EMBED_MAX:
        raise ValueError(f"sd3 grid sides must be <= {SD3_POS_EMBED_MAX}, got {grid}")
    if family == "wan" and max(grid) > WAN_ROPE_MAX:
        raise ValueError(f"wan grid sizes must be <= {WAN_ROPE_MAX}, got {grid}")
    return grid


def _flux_img_ids(h: int, w: int) -> torch.Tensor:
    """Flux image position ids, (h*w, 3) rows of (0, row, col) as the Flux pipeline builds them."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def tiny_inputs(
    family: str,
    grid: tuple[int, ...],
    *,
    batch: int = 1,
    text_len: int = 7,
    seed: int = 0,
) -> dict[str, Any]:
    """Keyword arguments for ``tiny_model(family)(**inputs)`` with a visual token grid ``grid``.

    ``grid`` is ``(h, w)`` for image families and ``(f, h, w)`` for video families, counted after
    patching. Latents and text embeddings are seeded random normals; the timestep is 500 on the
    model's own scale (0.5 for Flux, whose transformer multiplies by 1000). ``return_dict=False``
    is included, so the model returns a tuple whose first item is the prediction.
    """
    _check_family(family)
    grid = _check_grid(family, grid)
    if batch < 1 or text_len < 1:
        raise ValueError("batch and text_len must be >= 1")
    if family == "cogvideox" and text_len != COGVIDEOX_TEXT_LEN:
        raise ValueError(f"the tiny cogvideox model needs text_len == {COGVIDEOX_TEXT_LEN}, got {text_len}")

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    b = batch
    timestep = torch.full((b,), _TIMESTEP)
    text = randn(b, text_len, _TEXT_DIM)

    if family == "unet_sd15":
        h, w = grid
        return {
            "sample": randn(b, 4, h, w),
            "timestep": timestep,
            "encoder_hidden_states": text,
            "return_dict": False,
        }
    if family == "unet_sdxl":
        h, w = grid
        size = [8 * h, 8 * w]  # pixel size the latents stand for: original, crop top-left, target
        time_ids = torch.tensor([size + [0, 0] + size], dtype=torch.float32).repeat(b, 1)
        return {
            "sample": randn(b, 4, h, w),
            "timestep": timestep,
            "encoder_hidden_states": text,
            "added_cond_kwargs": {"text_embeds": randn(b, _SDXL_POOLED_DIM), "time_ids": time_ids},
            "return_dict": False,
        }
    if family == "sd3":
        h, w = grid
        return {
            "hidden_states": randn(b, 4, 2 * h, 2 * w),
            "encoder_hidden_states": text,
            "pooled_projections": randn(b, _TEXT_DIM),
            "timestep": timestep,
            "return_dict": False,
        }
    if family == "flux":
        h, w = grid
        return {
            "hidden_states": randn(b, h * w, 16),
            "encoder_hidden_states": text,
            "pooled_projections": randn(b, _TEXT_DIM),
            "timestep": timestep / 1000.0,
            "img_ids": _flux_img_ids(h, w),
            "txt_ids": torch.zeros(text_len, 3),
            "guidance": torch.full((b,), 3.5),
            "return_dict": False,
        }
    if family == "wan":
        f, h, w = grid
        return {
            "hidden_states": randn(b, 16, f, 2 * h, 2 * w),
            "timestep": timestep,
            "encoder_hidden_states": text,
            "return_dict": False,
        }
    if family == "cogvideox":
        f, h, w = grid
        return {
            "hidden_states": randn(b, f, 4, 2 * h, 2 * w),
            "encoder_hidden_states": text,
            "timestep": timestep,
            "return_dict": False,
        }
    if family == "hunyuan_video":
        f, h, w = grid
        return {
            "hidden_states": randn(b, 4, f, 2 * h, 2 * w),
            "timestep": timestep,
            "encoder_hidden_states": text,
            "encoder_attention_mask": torch.ones(b, text_len),
            "pooled_projections": randn(b, _HUNYUAN_POOLED_DIM),
            "guidance": torch.full((b,), 6000.0),  # guidance_scale 6 * 1000, as the pipeline does
            "return_dict": False,
        }
    if family == "ltx_video":
        f, h, w = grid
        return {
            "hidden_states": randn(b, f * h * w, _LTX_CHANNELS),
            "encoder_hidden_states": text,
            "timestep": timestep,
            "encoder_attention_mask": torch.ones(b, text_len),
            "num_frames": f,
            "height": h,
            "width": w,
            # what LTXPipeline passes: (vae temporal ratio / frame rate, vae spatial, vae spatial)
            "rope_interpolation_scale": (8 / 25, 32.0, 32.0),
            "return_dict": False,
        }
    raise AssertionError(family)


def visual_grid_of(family: str, inputs: dict) -> tuple[int, ...]:
    """The visual token grid implied by ``inputs`` (same convention as :func:`tiny_inputs`)."""
    _check_family(family)
    if family in ("unet_sd15", "unet_sdxl"):
        h, w = inputs["sample"].shape[-2:]
        return (int(h), int(w))
    if family == "sd3":
        h, w = inputs["hidden_states"].shape[-2:]
        return (int(h) // 2, int(w) // 2)
    if family == "flux":
        ids = inputs["img_ids"]
        ids = ids[0] if ids.ndim == 3 else ids
        h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        if h * w != inputs["hidden_states"].shape[1]:
            raise ValueError("img_ids do not describe a full row-major grid of the latent tokens")
        return (h, w)
    if family in ("wan", "hunyuan_video"):
        f, h, w = inputs["hidden_states"].shape[-3:]
        return (int(f), int(h) // 2, int(w) // 2)
    if family == "cogvideox":
        _, f, _, h, w = inputs["hidden_states"].shape
        return (int(f), int(h) // 2, int(w) // 2)
    if family == "ltx_video":
        grid = (int(inputs["num_frames"]), int(inputs["height"]), int(inputs["width"]))
        if grid[0] * grid[1] * grid[2] != inputs["hidden_states"].shape[1]:
            raise ValueError("num_frames * height * width does not match the latent token count")
        return grid
    raise AssertionError(family)


# --------------------------------------------------------------------------------------------------
# Tokenizers (built locally; nothing is downloaded)
# --------------------------------------------------------------------------------------------------
