"""JoyImage Edit (``JoyImageEditTransformer3DModel``, ``JoyImageEditPlusTransformer3DModel``): double-stream blocks
whose ``attn`` is joint attention over ``[image | text]``, image first: ``transformer_joyimage.py:147``
``torch.cat([img_query, txt_query], dim=1)`` and ``transformer_joyimage_edit_plus.py:118`` (same).

The visual tokens are a ``(frames, h, w)`` grid after the ``(pt, ph, pw)`` patch; the images being edited count as
further frames of that grid, as the models lay them out (and place their RoPE):

- Edit: ``(B, C, T, H, W)`` latents, or ``(B, N, C, T, H, W)`` for N items (target and references), which the model
  stacks on the frame axis (``transformer_joyimage.py:555-560``): grid ``(N * T / pt, H / ph, W / pw)``.
- Edit Plus: pre-patchified ``(B, tokens, C, pt, ph, pw)`` with ``shape_list`` (per sample, the ``(t, h, w)`` of
  the target then each reference; RoPE offsets each component on the frame axis, ``:484-490``): grid
  ``(sum t, h, w)`` when every component has the same ``h, w`` and nothing is padded; otherwise ``LayoutError``.
"""

from __future__ import annotations

import torch

from ..errors import LayoutError
from .base import FamilyAdapter, ModelInputs, RoleRule, _require

_JOINT = (RoleRule(r"double_blocks\.\d+\.attn", "joint", text_first=False),)


def _edit_grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
    """(frames, height, width) of the latents / the patch sizes, items stacked as frames"""
    x = _require(inputs, "hidden_states", type(model).__name__)
    pt, ph, pw = model.config.patch_size
    if x.ndim == 6:  # (B, N, C, T, H, W): the items stacked on the frame axis
        frames = x.shape[1] * x.shape[3]
    else:
        frames = x.shape[2]
    return (frames // pt, x.shape[-2] // ph, x.shape[-1] // pw)


def _edit_plus_grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
    """(frames, height, width) from ``shape_list``"""
    name = type(model).__name__
    x = _require(inputs, "hidden_states", name)
    shape_lists = _require(inputs, "shape_list", name)
    components = [tuple(int(n) for n in thw) for thw in shape_lists[0]]
    sizes = {(h, w) for _, h, w in components}
    frames = sum(t for t, _, _ in components)
    same = all([tuple(int(n) for n in thw) for thw in s] == components for s in shape_lists)
    if len(sizes) != 1 or not same or frames * components[0][1] * components[0][2] != x.shape[1]:
        raise LayoutError(
            f"{name}: shape_list {list(shape_lists)} does not describe one frames x h x w grid of all "
            f"{x.shape[1]} image tokens (references of another size, padding, or samples of different layouts); "
            "diffattn's layout has one visual grid"
        )
    (h, w) = sizes.pop()
    return (frames, h, w)


ADAPTERS = (
    # JoyImageEditPipeline: the negative prompt as a second forward, timestep on 0..1000
    FamilyAdapter("joyimage_edit", "JoyImageEditTransformer3DModel", _JOINT, _edit_grid, cfg_in_batch=False),
    # JoyImageEditPlusPipeline stacks [uncond, cond] (pipeline_joyimage_edit_plus.py:683)
    FamilyAdapter("joyimage_edit_plus", "JoyImageEditPlusTransformer3DModel", _JOINT, _edit_plus_grid),
)
