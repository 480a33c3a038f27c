"""Ideogram 4 (``Ideogram4Transformer2DModel``): one packed sequence per row, ``[left padding][text][image]``, marked
per token by ``indicator`` (``pipeline_ideogram4.py`` ``_prepare_ids``, lines 283-287: text at ``offset : offset +
num_text``, image from ``offset + num_text`` to the end) and attended by every ``layers.N.attention``
(``dispatch_attention_fn``) under a block-diagonal ``segment_ids`` mask. Joint, text first: the image tokens are the
sequence's tail, everything before them (the masked left padding, then the text) is the text run. The
unconditional transformer's calls hold the image tokens alone (a joint call with no text).

The grid is read from the image tokens' ``position_ids`` (``(t, h, w)``, raster order). A layout that is not one
image at the tail of every row in raster order, or that packs several samples in a row, is refused at the call.

The pipeline passes ``1 - t / 1000`` (reversed, 0..1) as the timestep: ``reversed_unit_time`` maps it back. Its two
branches run separately (two transformers): ``cfg_in_batch=False``.
"""

from __future__ import annotations

import torch

from ..errors import LayoutError
from .base import FamilyAdapter, ModelInputs, RoleRule, _require, reversed_unit_time

_NAME = "Ideogram4Transformer2DModel"


def _ideogram4_grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
    """(height, width) from the image tokens' ``position_ids``"""
    from diffusers.models.transformers.transformer_ideogram4 import OUTPUT_IMAGE_INDICATOR, SEQUENCE_PADDING_INDICATOR

    indicator = _require(inputs, "indicator", _NAME)
    positions = _require(inputs, "position_ids", _NAME)
    segments = _require(inputs, "segment_ids", _NAME)
    image = indicator == OUTPUT_IMAGE_INDICATOR
    count = int(image[0].sum())
    length = indicator.shape[1]
    tail = torch.zeros_like(image[0])
    tail[length - count :] = True
    used = segments[segments != SEQUENCE_PADDING_INDICATOR]
    if count == 0 or not bool((image == tail).all()) or used.unique().numel() > 1:
        raise LayoutError(
            f"{_NAME}: diffattn reads one image per row at the tail of the packed sequence (the pipeline's "
            "[padding][text][image] layout); these indicator / segment_ids pack it otherwise"
        )
    hw = positions[:, length - count :, 1:]
    lo = hw[0].min(dim=0).values
    h, w = (int(n) + 1 for n in hw[0].max(dim=0).values - lo)
    rows = torch.arange(h, device=hw.device).repeat_interleave(w)
    cols = torch.arange(w, device=hw.device).repeat(h)
    raster = torch.stack([rows, cols], dim=-1) + lo
    if h * w != count or not bool((hw == raster).all()):
        raise LayoutError(f"{_NAME}: the image tokens' position_ids are not a raster-order {h}x{w} grid")
    return (h, w)


ADAPTER = FamilyAdapter(
    "ideogram4",
    _NAME,
    (RoleRule(r"layers\.\d+\.attention", "joint", text_first=True),),
    _ideogram4_grid,
    timestep_map=reversed_unit_time,
    cfg_in_batch=False,
)
