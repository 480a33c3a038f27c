"""Class-conditional and PixArt-style DiTs built from diffusers' ``BasicTransformerBlock``: ``attn1`` is
self-attention over the patch grid, ``attn2`` (when the model has text) is cross-attention to the caption.

- ``DiTTransformer2DModel``: ``attn1`` only (class labels, no text); latents ``(B, C, H, W)``, grid ``H/p x W/p``.
  Its unpatchify assumes a square grid (``dit_transformer_2d.py``: ``height = width = int(N ** 0.5)``), so only
  square inputs run at all.
- ``PixArtTransformer2DModel``: ``attn1`` self, ``attn2`` cross; grid ``H/p x W/p``.
- ``Transformer2DModel``: continuous input (no patching: grid ``H x W`` of the latents), patched input (``H/p x
  W/p``) or vectorized input (a ``sample_size x sample_size`` grid of discrete latent pixels). GLIGEN's
  ``fuser.attn`` (visual tokens followed by grounding tokens) is left alone. Configs with
  ``only_cross_attention`` / ``double_self_attention`` swap what ``attn1`` / ``attn2`` attend to; they are refused
  at the first call (the grid reader raises).
- ``DreamLiteTransformer2DModel``: the continuous-input ``Transformer2DModel`` with DreamLite's block
  (``transformer_2d_dreamlite.py``): grid ``H x W`` of the latents; ``attn1`` (absent with
  ``use_self_attention=False``) self, ``attn2`` cross. Same ``only_cross_attention`` / ``double_self_attention`` check.
- ``HunyuanDiT2DModel``: ``attn1`` self (2-D RoPE on the image tokens), ``attn2`` cross to the CLIP + T5 tokens
  (concatenated into one text sequence, ``hunyuan_transformer_2d.py`` line 420); grid ``H/p x W/p``. Its long skip
  connections concatenate along channels, not tokens.
"""

from __future__ import annotations

import torch

from ..errors import LayoutError
from .base import _SELF_CROSS, FamilyAdapter, ModelInputs, _image_grid, _require


def _transformer_2d_grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
    """(height, width) of the latents (continuous input) or / the patch size (patched input)"""
    cfg = model.config
    name = type(model).__name__
    if cfg.only_cross_attention or cfg.double_self_attention:
        raise LayoutError(
            f"{name}: only_cross_attention / double_self_attention change what attn1 and attn2 attend "
            "to; diffattn's adapter assumes attn1 = self-attention and attn2 = cross-attention."
        )
    x = _require(inputs, "hidden_states", name)
    if getattr(model, "is_input_vectorized", False):
        return (int(cfg.sample_size), int(cfg.sample_size))
    p = cfg.patch_size if getattr(model, "is_input_patches", False) else 1
    return (int(x.shape[-2]) // p, int(x.shape[-1]) // p)


_PATCHED = _image_grid(lambda m: m.config.patch_size)

ADAPTERS = (
    # DiTPipeline batches [cond, uncond] (class labels, then the null class): not the [uncond, cond] of cfg_in_batch
    FamilyAdapter("dit", "DiTTransformer2DModel", _SELF_CROSS, _PATCHED, cfg_in_batch=False),
    FamilyAdapter("pixart", "PixArtTransformer2DModel", _SELF_CROSS, _PATCHED),
    FamilyAdapter("hunyuan_dit", "HunyuanDiT2DModel", _SELF_CROSS, _PATCHED),
    FamilyAdapter("transformer_2d", "Transformer2DModel", _SELF_CROSS, _transformer_2d_grid),
    FamilyAdapter("dreamlite", "DreamLiteTransformer2DModel", _SELF_CROSS, _transformer_2d_grid),
)
