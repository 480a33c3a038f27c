"""Video DiTs built like PixArt: Allegro (``AllegroTransformer3DModel``), and Latte, which diffattn refuses.

- ``AllegroTransformer3DModel``: full 3-D attention. The ``(B, C, F, H, W)`` latents are patched frame by frame and
  flattened frame-major into one sequence of ``F/pt x H/p x W/p`` tokens (``transformer_allegro.py`` lines 387-389);
  ``attn1`` is self-attention over it (3-D RoPE), ``attn2`` cross-attention to the T5 caption
  (``AllegroAttnProcessor2_0``, SDPA). The pipeline batches [uncond, cond] on the 0..1000 timestep scale.
- ``LatteTransformer3DModel`` alternates spatial blocks (each frame's tokens alone: batch ``B x F``) and temporal
  blocks (each pixel's frames alone: batch ``B x H x W``); no attention call holds the video grid.
"""

from __future__ import annotations

from .base import _SELF_CROSS, FamilyAdapter, _video_grid

ADAPTER = FamilyAdapter("allegro", "AllegroTransformer3DModel", _SELF_CROSS, _video_grid(channels_first=True))

REFUSED = {
    "LatteTransformer3DModel": (
        "Latte factorises attention: spatial blocks attend each frame separately (batch B*F) and temporal blocks "
        "each pixel's frames (batch B*H*W), so no attention call holds the video's token grid or the batch's entries"
    ),
}
