"""HiDream-I1 (``HiDreamImageTransformer2DModel``): joint attention, image first, in both stream kinds
(``HiDreamAttnProcessor``, SDPA): the double-stream blocks concatenate ``[image, text]`` for q, k and v
(``transformer_hidream_image.py`` line 238: ``query = torch.cat([query_i, query_t], dim=1)``) and the single-stream
blocks run on ``torch.cat([hidden_states, initial_encoder_hidden_states], dim=1)`` plus the block's Llama layer
appended (lines 912 and 925). The text run is T5 + two Llama-layer runs.

The grid is ``H/p x W/p`` of ``(B, C, H, W)`` latents, or ``img_sizes`` for pre-patched ``(B, L, C)`` ones. The
model pads the image tokens of a non-square latent to ``max_seq`` (the config's ``max_resolution``) with zero tokens
that sit between the image and the text; a layout cannot place them, so such calls are refused (square latents, and
non-square ones of exactly ``max_seq`` tokens, have none). The pipeline batches [uncond, cond].
"""

from __future__ import annotations

import torch

from ..errors import LayoutError
from .base import FamilyAdapter, ModelInputs, RoleRule, _require

_NAME = "HiDreamImageTransformer2DModel"


def _hidream_grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
    """(height, width) of the latents / the patch size, or ``img_sizes`` for patched input"""
    x = _require(inputs, "hidden_states", _NAME)
    if x.ndim == 4:
        p = model.config.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        tokens = max_seq = model.max_seq if x.shape[-2] != x.shape[-1] else h * w
    else:
        sizes = {tuple(int(n) for n in size) for size in _require(inputs, "img_sizes", _NAME)}
        if len(sizes) != 1:
            raise LayoutError(f"{_NAME}: the batch holds images of different sizes {sorted(sizes)}; one grid per call")
        ((h, w),) = sizes
        tokens, max_seq = x.shape[1], x.shape[1]
    if h * w != tokens:
        raise LayoutError(
            f"{_NAME}: the {h}x{w} image is padded to {max_seq} tokens (non-square latents are padded to the "
            "config's max_resolution), and the padding sits between the image and the text where diffattn's "
            "layouts cannot place it; use a square latent"
        )
    return (h, w)


ADAPTER = FamilyAdapter(
    "hidream",
    _NAME,
    (RoleRule(r"(double|single)_stream_blocks\.\d+\.block\.attn1", "joint", text_first=False),),
    _hidream_grid,
    timestep_input="timesteps",
)
