"""Sana (``SanaTransformer2DModel``), Sana-Video (``SanaVideoTransformer3DModel``) and SANA-WM
(``SanaWMTransformer3DModel``): only their cross-attention (visual queries, text keys) is reachable.

Their self-attention is linear or recurrent and calls no SDPA, so no rule names it and diffattn leaves it alone:
Sana's ``attn1`` runs ``SanaLinearAttnProcessor2_0``, Sana-Video's ``SanaLinearAttnProcessor3_0``, and SANA-WM's
``blocks.N.attn`` is a gated-delta-net (or, every ``softmax_every_n``-th block, a softmax) module without a processor.
Methods that act on self or joint attention therefore find no layer on these models; cross-attention methods work.

Cross-attention (diffusers 0.42.1), no text concatenated into the visual sequence:

- Sana: ``transformer_blocks.N.attn2`` with ``SanaAttnProcessor2_0`` (models/transformers/sana_transformer.py, line
  173: one ``F.scaled_dot_product_attention``, queries = the ``(H/p) * (W/p)`` image tokens).
- Sana-Video: ``transformer_blocks.N.attn2`` with ``SanaAttnProcessor2_0`` (transformer_sana_video.py, line 329:
  ``dispatch_attention_fn``), over ``(B, C, F, H, W)`` latents patched by ``patch_size = (p_t, p_h, p_w)``.
- SANA-WM: ``blocks.N.cross_attn`` (``MultiHeadCrossAttention``) with ``SanaWMCrossAttnProcessor``
  (transformer_sana_wm.py, line 312: ``dispatch_attention_fn``), queries = all ``T * H * W`` video tokens
  (``SanaVideoMSCamCtrlBlock.forward``, line 2644), over ``(B, C, T, H, W)`` latents patched by ``patch_size``.

SANA-WM's LTX-2 refiner (``SanaWMLTX2RefinerTransformer3DModel``) is refused: it takes packed latents with no grid in
its inputs, and its self-attention prepends an attention-sink and history K/V cache to the keys
(transformer_sana_wm_refiner.py, line 868).
"""

from __future__ import annotations

from .base import FamilyAdapter, RoleRule, _image_grid, _video_grid

_CROSS = (RoleRule(r"transformer_blocks\.\d+\.attn2", "cross"),)

ADAPTERS = (
    FamilyAdapter("sana", "SanaTransformer2DModel", _CROSS, _image_grid(lambda m: m.config.patch_size)),
    FamilyAdapter("sana_video", "SanaVideoTransformer3DModel", _CROSS, _video_grid(channels_first=True)),
    FamilyAdapter(
        "sana_wm",
        "SanaWMTransformer3DModel",
        (RoleRule(r"blocks\.\d+\.cross_attn", "cross"),),
        _video_grid(channels_first=True),
    ),
)

REFUSED = {
    "SanaWMLTX2RefinerTransformer3DModel": (
        "its inputs are packed latents without the video grid, and its self-attention prepends an attention-sink "
        "and history K/V cache (sliding-window autoregressive refiner) to the keys"
    ),
}
