"""Lumina-Next (``LuminaNextDiT2DModel``) and Lumina-Image 2.0 (``Lumina2Transformer2DModel``).

- ``LuminaNextDiT2DModel``: every block has ``attn1`` (self-attention over the patch grid: its keys are the same
  normed image tokens, ``lumina_nextdit2d.py`` line 144) and ``attn2`` (cross-attention to the Gemma caption, line
  155); both go through ``LuminaAttnProcessor2_0`` (SDPA). Grid ``H/p x W/p`` of the ``(B, C, H, W)`` latents.
- ``Lumina2Transformer2DModel``: ``noise_refiner`` blocks attend the image tokens alone (self), ``context_refiner``
  blocks the caption alone (left alone), and the main ``layers`` one joint sequence built per batch entry as
  ``[caption (its unmasked tokens), image]`` (``transformer_lumina2.py`` lines 530-532: ``joint_hidden_states[i,
  :encoder_seq_len] = caption; joint_hidden_states[i, encoder_seq_len:seq_len] = image``): text first. When the
  entries of a batch have captions of different unmasked lengths, each entry's image starts at another position
  (and the shorter ones end in padding), which one layout cannot describe: refused at the call.

Both pipelines pass ``1 - t / 1000`` as the timestep (reversed, 0..1): ``reversed_unit_time`` maps it back onto the
schedulers' 0..1000 scale. Lumina-Next's
pipeline batches [cond, uncond]; Lumina 2 calls the two branches separately: ``cfg_in_batch=False`` for both.
"""

from __future__ import annotations

import torch

from ..errors import LayoutError
from .base import _SELF_CROSS, FamilyAdapter, ModelInputs, RoleRule, _image_grid, _require, reversed_unit_time

_PATCHED = _image_grid(lambda m: m.config.patch_size)


def _lumina2_grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
    """(height, width) of the latents / the patch size"""
    mask = inputs.get("encoder_attention_mask")
    if mask is not None and mask.shape[0] > 1:
        lengths = set(mask.sum(dim=1).tolist())
        if len(lengths) > 1:
            raise LayoutError(
                "Lumina2Transformer2DModel: the batch's captions have different unmasked lengths "
                f"({sorted(lengths)}), so each entry's image tokens start at another position of the joint "
                "sequence; call the model with captions of one length per batch (or one prompt per call)."
            )
    _require(inputs, "hidden_states", "Lumina2Transformer2DModel")
    return _PATCHED(model, inputs)


ADAPTERS = (
    FamilyAdapter(
        "lumina_next",
        "LuminaNextDiT2DModel",
        _SELF_CROSS,
        _PATCHED,
        cfg_in_batch=False,
        timestep_map=reversed_unit_time,
    ),
    FamilyAdapter(
        "lumina2",
        "Lumina2Transformer2DModel",
        (
            RoleRule(r"noise_refiner\.\d+\.attn", "self"),
            RoleRule(r"layers\.\d+\.attn", "joint", text_first=True),
        ),
        _lumina2_grid,
        cfg_in_batch=False,
        timestep_map=reversed_unit_time,
    ),
)
