"""Cosmos (``CosmosTransformer3DModel``, ``transformer_cosmos.py`` in diffusers 0.42.1): self-attention over the video
grid (``attn1``) and cross-attention to the text (``attn2``, line 434), over ``(B, C, F, H, W)`` latents patched to
one row-major grid (line 756). Cosmos 2.5 checkpoints with an image context call attention twice in ``attn2``: the
text first (line 265), then the image context (line 296), which the runtime passes through as an extra call.

The pipelines pass Cosmos 1's EDM noise level or Cosmos 2's ``sigma / (sigma + 1)`` as the timestep, neither on the
0..1000 scale; the adapter leaves the timestep as given.

Refused: ``Cosmos3OmniTransformer`` (``transformer_cosmos3.py``), a packed mixture-of-transformers whose layers run
causal attention over the text (line 98) and attend the generation tokens over text + visual keys (line 108).
"""

from __future__ import annotations

from .base import _SELF_CROSS, FamilyAdapter, _video_grid

ADAPTER = FamilyAdapter(
    "cosmos", "CosmosTransformer3DModel", _SELF_CROSS, _video_grid(channels_first=True), cfg_in_batch=False
)

REFUSED = {
    "Cosmos3OmniTransformer": (
        "it is a packed mixture-of-transformers: causal attention over the text (understanding) tokens, then the "
        "generation queries over text + visual keys in one call on an unbatched packed sequence, not text + one "
        "visual grid"
    ),
}
