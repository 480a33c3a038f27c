"""Models built on the Wan 2.1 backbone: self-attention over the video grid (``attn1``) and cross-attention to the
text (``attn2``), no joint sequence (file and line references are to diffusers 0.42.1).

- ``WanVACETransformer3DModel`` (``transformer_wan_vace.py``): the main ``blocks`` and the control branch's
  ``vace_blocks`` both run ``attn1`` over one full video grid (the control latents are patched like the video and
  zero-padded to its length, lines 327-333) and ``attn2`` over the text.
- ``SkyReelsV2Transformer3DModel`` (``transformer_skyreels_v2.py``): as Wan. With ``num_frame_per_block > 1``
  (diffusion forcing) ``attn1`` carries a block-causal boolean mask over frames (lines 684-699), which the runtime
  passes to the methods as the stock mask.
- ``ChronoEditTransformer3DModel`` (``transformer_chronoedit.py``): as Wan (its RoPE only changes the temporal
  frequencies of 2-frame inputs).
- ``AnyFlowTransformer3DModel`` (``transformer_anyflow.py``): as Wan, latents laid out ``(B, F, C, H, W)`` (line
  663); the CLIP image tokens, when given, are concatenated before the text in the cross-attention keys (line 691).
- ``WanAnimateTransformer3DModel`` (``transformer_wan_animate.py``): as Wan; the pose latents are added to the video
  tokens (line 1223), not appended. Its ``face_adapter`` attention runs per latent frame (batch ``B * T``, keys are
  face-motion tokens, line 464) and is left alone.

Where ``added_kv_proj_dim`` is set (image-to-video checkpoints; not AnyFlow), ``attn2`` calls attention twice, the
CLIP image tokens FIRST and the text second (``transformer_wan.py`` lines 129 and 143, same processor in the others):
the runtime then treats the image call as the cross-attention and passes the text call through as the extra one.

Refused: the frame-autoregressive AnyFlow FAR model, Wan-Animate 2 (flex ``BlockMask`` over a KV cache of reference
frames) and Helios (history latents of other resolutions prepended to the video tokens).
"""

from __future__ import annotations

from .base import _SELF_CROSS, FamilyAdapter, _video_grid, image_call_first

ADAPTERS = (
    FamilyAdapter(
        "wan_vace",
        "WanVACETransformer3DModel",
        _SELF_CROSS,
        _video_grid(True),
        cfg_in_batch=False,
        text_call=image_call_first,
        unbatched_inputs=frozenset({"control_hidden_states_scale"}),
    ),
    FamilyAdapter(
        "skyreels_v2",
        "SkyReelsV2Transformer3DModel",
        _SELF_CROSS,
        _video_grid(True),
        cfg_in_batch=False,
        text_call=image_call_first,
    ),
    FamilyAdapter(
        "chronoedit",
        "ChronoEditTransformer3DModel",
        _SELF_CROSS,
        _video_grid(True),
        cfg_in_batch=False,
        text_call=image_call_first,
    ),
    FamilyAdapter("anyflow", "AnyFlowTransformer3DModel", _SELF_CROSS, _video_grid(False), cfg_in_batch=False),
    FamilyAdapter(
        "wan_animate",
        "WanAnimateTransformer3DModel",
        _SELF_CROSS,
        _video_grid(True),
        cfg_in_batch=False,
        text_call=image_call_first,
    ),
)

REFUSED = {
    "AnyFlowFARTransformer3DModel": (
        "its self-attention is frame-autoregressive (causal): a flex-attention BlockMask over a sequence of compressed "
        "context frames and full frames, with a KV cache, not one visual grid attended with SDPA"
    ),
    "WanAnimate2Transformer3DModel": (
        "its generation self-attention runs on the flex backend with a BlockMask over a padded [generation | "
        "reference] buffer whose reference keys come from a KV cache filled by a separate pass, not SDPA over one "
        "visual grid"
    ),
    "HeliosTransformer3DModel": (
        "its self-attention prepends history latents of earlier chunks (short / mid / long, at other resolutions) to "
        "the current chunk's video tokens; diffattn layouts hold one visual grid plus text, not extra visual tokens"
    ),
}
