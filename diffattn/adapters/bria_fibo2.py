"""Bria Fibo 2 (``BriaFibo2Transformer2DModel``): a Z-Image-style single stream of ``[gist | image]`` tokens, the gist
tokens being the text squeezed by a Perceiver; the grid from the ``(B, C, H, W)`` latents and ``patch_size``.

- ``noise_refiner.N.attention``: self-attention over the image tokens alone.
- ``layers.N.attention``: joint, gist ("text") first: ``transformer_bria_fibo2.py:607``
  ``torch.cat([gist, hidden_states], dim=1)``.
- Left alone: ``layers.N.cross_attention`` (its queries are the whole ``[gist | image]`` stream, its keys the text
  encoder's) and the Perceiver's attentions (gist tokens only, no image).

Not supported (the grid reader raises ``LayoutError``): ``context_latents`` (edit mode appends the context images'
tokens after the image tokens, ``:551``) and a batch whose prompts get different gist counts (the gist then goes
last, ``:611``).
"""

from __future__ import annotations

import torch

from ..errors import LayoutError
from .base import FamilyAdapter, ModelInputs, RoleRule, _require


def _grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
    """(height, width) of the latents / the patch size"""
    name = type(model).__name__
    x = _require(inputs, "hidden_states", name)
    if inputs.get("context_latents"):
        raise LayoutError(
            f"{name}: context_latents (images to edit) put their tokens after the image's in every attention call; "
            "diffattn's layout has one visual grid, so edit mode is not supported"
        )
    mask = inputs.get("encoder_attention_mask")
    if mask is not None and mask.shape[0] > 1:
        from diffusers.models.transformers.transformer_bria_fibo2 import compute_gist_count

        cfg = model.config
        counts = compute_gist_count(
            mask.sum(dim=1).tolist(),
            min_gist=cfg.min_num_gist_tokens,
            max_gist=cfg.max_num_gist_tokens,
            gist_step=cfg.gist_step,
            min_text_len=cfg.gist_min_text_len,
            max_text_len=cfg.gist_max_text_len,
        )
        if min(counts) != max(counts):
            raise LayoutError(
                f"{name}: the batch's prompts get different gist-token counts ({counts}), so the model moves the gist "
                "tokens after the image tokens and masks the padding; run the prompts one per call"
            )
    p = model.config.patch_size
    return (x.shape[-2] // p, x.shape[-1] // p)


ADAPTER = FamilyAdapter(
    "bria_fibo2",
    "BriaFibo2Transformer2DModel",
    (
        RoleRule(r"noise_refiner\.\d+\.attention", "self"),
        RoleRule(r"layers\.\d+\.attention", "joint", text_first=True),
    ),
    _grid,
    cfg_in_batch=False,  # the negative prompt runs as a second pass (pipeline_bria_fibo2.py:823)
    timestep_scale=1000.0,  # the pipeline passes t / 1000 (pipeline_bria_fibo2.py:811)
)
