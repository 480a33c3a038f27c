"""Motif-Video (``MotifVideoTransformer3DModel``, ``transformer_motif_video.py`` in diffusers 0.42.1): joint text +
video attention with the video tokens FIRST, over ``(B, C, F, H, W)`` latents.

- ``transformer_blocks.N.attn`` (dual-stream): ``query = torch.cat([query, encoder_query], dim=1)`` (line 183).
- ``single_transformer_blocks.N.attn`` (single-stream): the block passes the video and text streams apart and the
  processor joins them as ``torch.cat([hidden_states, encoder_hidden_states], dim=1)`` (line 129).
- ``*.cross_attn`` (``enable_text_cross_attention_*``): video queries, text keys (the image-embedding prefix of the
  context is sliced off, line 69).

The "text" part of the joint sequence is the context stream: the text tokens, preceded by the projected image
embeddings when ``image_embeds`` is given (line 952). Configs with ``num_decoder_layers > 0`` run their last single
blocks as video-over-video joint attention (the decoder's video tokens joined with the encoder's output), which is
not text + one grid: calls of such a model raise.
"""

from __future__ import annotations

from ..errors import LayoutError
from .base import FamilyAdapter, ModelInputs, RoleRule, _video_grid

_FAMILY = "MotifVideoTransformer3DModel"
_latent_grid = _video_grid(channels_first=True)


def _grid(model, inputs: ModelInputs) -> tuple[int, ...]:
    """(frames, height, width) of the latents / the patch sizes"""
    if getattr(model.config, "num_decoder_layers", 0):
        raise LayoutError(
            f"{_FAMILY} with num_decoder_layers={model.config.num_decoder_layers}: its decoder blocks attend the "
            "video tokens jointly with the encoder's video output (not text), which diffattn's roles cannot describe"
        )
    return _latent_grid(model, inputs)


ADAPTER = FamilyAdapter(
    "motif_video",
    _FAMILY,
    (
        RoleRule(r"(single_)?transformer_blocks\.\d+\.attn", "joint", text_first=False),
        RoleRule(r"(single_)?transformer_blocks\.\d+\.cross_attn", "cross"),
    ),
    _grid,
    cfg_in_batch=False,
)
