"""Kandinsky 5 and 6 video transformers: visual self-attention and cross-attention to the text, over ``(B, T, H, W, C)``
latents (channels LAST); the text runs through its own encoder blocks first, whose self-attention is text-only and
left alone (file and line references are to diffusers 0.42.1).

- ``Kandinsky5Transformer3DModel`` (``transformer_kandinsky.py``): ``visual_transformer_blocks.N.self_attention``
  over the visual tokens flattened row-major (``fractal_flatten``, line 52) and ``.cross_attention`` with the text as
  keys (line 497). With ``sparse_params`` (NABLA, from the pipeline's ``attention_type="nabla"``) the tokens are
  reordered into 8 x 8 local patches (line 47) and the self-attention mask is a flex ``BlockMask``: such calls raise.
- ``Kandinsky6Transformer3DModel`` (``transformer_kandinsky6.py``): each fused block's
  ``video_dec_block.self_attention`` over the visual tokens (flattened row-major, line 814) and
  ``video_dec_block.cross_attention`` with the video text branch as keys (line 507). Its audio stream
  (``audio_dec_block``) and the video <-> audio cross-attentions (``va_cross_attention`` / ``av_cross_attention``,
  keys are audio or video tokens, not text) are left alone.

Refused: ``Kandinsky6SRTransformer3DModel``, whose only attention is NABLA sparse attention on the flex backend.
"""

from __future__ import annotations

from ..errors import LayoutError
from .base import FamilyAdapter, GridFn, ModelInputs, RoleRule, _require


def _channels_last_grid(family: str, refuse_sparse: bool = False) -> GridFn:
    """Grid of ``(B, T, H, W, C)`` latents with the config's ``(t, h, w)`` patch size."""

    def grid(model, inputs: ModelInputs) -> tuple[int, ...]:
        if refuse_sparse and inputs.get("sparse_params") is not None:
            raise LayoutError(
                f"{family}: called with sparse_params (NABLA attention): the visual tokens are reordered into 8 x 8 "
                "local patches and attended through a flex BlockMask, which diffattn methods cannot replace; use "
                "the pipeline's regular attention (attention_type='regular') with diffattn"
            )
        x = _require(inputs, "hidden_states", family)
        pt, ph, pw = model.config.patch_size
        return (x.shape[1] // pt, x.shape[2] // ph, x.shape[3] // pw)

    grid.__doc__ = "(frames, height, width) of channels-last latents / the patch sizes"
    return grid


ADAPTERS = (
    FamilyAdapter(
        "kandinsky5",
        "Kandinsky5Transformer3DModel",
        (
            RoleRule(r"visual_transformer_blocks\.\d+\.self_attention", "self"),
            RoleRule(r"visual_transformer_blocks\.\d+\.cross_attention", "cross"),
        ),
        _channels_last_grid("Kandinsky5Transformer3DModel", refuse_sparse=True),
        cfg_in_batch=False,
    ),
    FamilyAdapter(
        "kandinsky6",
        "Kandinsky6Transformer3DModel",
        (
            RoleRule(r"visual_transformer_blocks\.\d+\.video_dec_block\.self_attention", "self"),
            RoleRule(r"visual_transformer_blocks\.\d+\.video_dec_block\.cross_attention", "cross"),
        ),
        _channels_last_grid("Kandinsky6Transformer3DModel"),
        cfg_in_batch=False,
    ),
)

REFUSED = {
    "Kandinsky6SRTransformer3DModel": (
        "its only attention is NABLA sparse attention: a flex-attention BlockMask (always the flex backend, not "
        "SDPA) over visual tokens reordered into 8 x 8 local patches"
    ),
}
