"""aMUSEd (``UVit2DModel``): self- and cross-attention over the grid of masked image tokens.

The model embeds ``input_ids`` ``(B, H, W)`` (VQ token ids, no patching) with a 1x1 conv, optionally halves the grid
(``UVitBlock.downsample``: kernel 2, stride 2, no padding: ``floor(n / 2)``), and runs ``SkipFFTransformerBlock`` (in
``down_block`` / ``up_block``: ``attention_blocks.N.attn1`` / ``attn2``) and ``BasicTransformerBlock``
(``transformer_layers.N.attn1`` / ``attn2``) on the ``H * W`` tokens in raster order (diffusers
``models/unets/uvit_2d.py``, ``UVit2DModel.forward``: ``permute(0, 2, 3, 1).reshape(batch_size, height * width,
channels)``). ``attn1`` is self-attention, ``attn2`` attends the projected text (``encoder_hidden_states``); text and
image never share a sequence. The grid is ``input_ids``' ``(H, W)``; with ``downsample=True`` every layer sees the
halved grid (``multiscale``). The model's batch comes in ``input_ids``, which the runtime does not read, so batch
roles (CFG) are unknown for it.
"""

from __future__ import annotations

import torch

from .base import FamilyAdapter, ModelInputs, RoleRule, _require


def _token_grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
    """(height, width) of the ``input_ids`` token latents, halved per level when downsampling"""
    ids = _require(inputs, "input_ids", type(model).__name__)
    return (int(ids.shape[-2]), int(ids.shape[-1]))


ADAPTERS = (
    FamilyAdapter(
        "uvit",
        "UVit2DModel",
        (
            RoleRule(r"transformer_layers\.\d+\.attn1", "self"),
            RoleRule(r"transformer_layers\.\d+\.attn2", "cross"),
            RoleRule(r"(down_block|up_block)\.attention_blocks\.\d+\.attn[12]", "cross"),
        ),
        _token_grid,
        multiscale=True,
    ),
)
