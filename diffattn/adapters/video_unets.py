"""Video UNets and temporal transformers diffattn refuses until the runtime knows per-frame spatial and temporal
layouts.

``UNet3DConditionModel``, ``UNetMotionModel`` (AnimateDiff), ``UNetSpatioTemporalConditionModel`` (SVD) and
``I2VGenXLUNet`` run their spatial attention (``attentions.N...attn1`` / ``attn2``) on each frame separately: the
``(B, C, F, H, W)`` latents are folded to a batch of ``B * F`` images of ``H * W`` tokens. Their temporal attention
(``temp_attentions``, ``motion_modules``, ``temporal_transformer_blocks``, ``transformer_in``) runs
``TransformerTemporalModel``-style over the ``F`` frames of each pixel: a batch of ``B * H * W`` sequences of ``F``
tokens (diffusers ``models/transformers/transformer_temporal.py``: ``permute(0, 3, 4, 2, 1).reshape(batch_size *
height * width, num_frames, channel)``). Neither call holds the video's ``F * H * W`` tokens, and the batch of a
call is not the model's batch, so neither fits one visual grid per batch entry. ``TransformerTemporalModel`` alone
is only temporal attention.
"""

from __future__ import annotations

_PER_FRAME = (
    "its spatial attention runs per frame (a batch of B*F images of H*W tokens) and its temporal attention over "
    "the frames of each pixel (a batch of B*H*W sequences of F tokens); diffattn needs the video's F*H*W tokens "
    "in one sequence per batch entry (per-frame spatial and temporal layouts are not supported yet)"
)

REFUSED = {
    "UNet3DConditionModel": _PER_FRAME,
    "UNetMotionModel": _PER_FRAME,
    "UNetSpatioTemporalConditionModel": _PER_FRAME,
    "I2VGenXLUNet": _PER_FRAME,
    "TransformerTemporalModel": (
        "temporal attention only: each call attends over the F frames of one pixel (a batch of B*H*W sequences "
        "of F tokens), which is no visual grid (a temporal role is not supported yet)"
    ),
}
