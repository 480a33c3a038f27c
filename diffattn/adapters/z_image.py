"""Z-Image (``ZImageTransformer2DModel``): ``noise_refiner`` blocks attend the image tokens alone (self),
``context_refiner`` blocks the caption alone (left alone), and the main ``layers`` one sequence per entry built as
``[image, caption]`` (``transformer_z_image.py`` line 866, basic mode: ``torch.cat([x[i][:x_len],
cap[i][:cap_len]])``): joint, image first. All go through ``ZSingleStreamAttnProcessor`` (``dispatch_attention_fn``).

The latents come as a list of ``(C, F, H, W)`` tensors (``x``), patched by the ``patch_size`` / ``f_patch_size``
arguments. The model pads the image tokens to a multiple of 32 (``SEQ_MULTI_OF``) with pad tokens that sit between
the image and the caption; a layout of image + text cannot place them, so a grid whose token count is not a multiple
of 32 is refused at the call (1024x1024, 1024x768, ... images are multiples). Omni mode (nested lists of reference
images + SigLIP tokens) and batches of differently sized images are refused at the call too.

The pipeline passes ``(1000 - t) / 1000`` (reversed, 0..1) as the timestep ``t``: ``reversed_unit_time`` maps it
back. It batches [cond, uncond]: ``cfg_order=("cond", "uncond")``.
"""

from __future__ import annotations

import inspect

import torch

from ..errors import LayoutError
from .base import FamilyAdapter, ModelInputs, RoleRule, _require, reversed_unit_time

_NAME = "ZImageTransformer2DModel"
_SEQ_MULTI_OF = 32  # diffusers.models.transformers.transformer_z_image.SEQ_MULTI_OF


def _default(model: torch.nn.Module, name: str) -> int:
    return inspect.signature(type(model).forward).parameters[name].default


def _z_image_grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
    """(frames, height, width) of each ``x`` latent / ``f_patch_size`` and ``patch_size``"""
    latents = _require(inputs, "x", _NAME)
    if any(isinstance(item, (list, tuple)) for item in latents):
        raise LayoutError(
            f"{_NAME}: omni mode (reference images and SigLIP tokens in the sequence) is not supported by diffattn"
        )
    shapes = {tuple(item.shape[-3:]) for item in latents}
    if len(shapes) != 1:
        raise LayoutError(f"{_NAME}: the batch holds latents of different sizes {sorted(shapes)}; one grid per call")
    ((frames, height, width),) = shapes
    p = inputs.get("patch_size") or _default(model, "patch_size")
    pf = inputs.get("f_patch_size") or _default(model, "f_patch_size")
    grid = (frames // pf, height // p, width // p)
    grid = grid[1:] if grid[0] == 1 else grid
    tokens = 1
    for n in grid:
        tokens *= n
    if tokens % _SEQ_MULTI_OF:
        raise LayoutError(
            f"{_NAME}: the {'x'.join(map(str, grid))} grid has {tokens} image tokens, which the model pads to a "
            f"multiple of {_SEQ_MULTI_OF} with pad tokens between the image and the caption; diffattn's layouts "
            f"cannot place them. Use a size whose token count is a multiple of {_SEQ_MULTI_OF}."
        )
    return grid


ADAPTER = FamilyAdapter(
    "z_image",
    _NAME,
    (
        RoleRule(r"noise_refiner\.\d+\.attention", "self"),
        RoleRule(r"layers\.\d+\.attention", "joint", text_first=False),
    ),
    _z_image_grid,
    timestep_map=reversed_unit_time,
    timestep_input="t",
    cfg_order=("cond", "uncond"),
    listed_inputs=frozenset({"x", "cap_feats"}),
)
