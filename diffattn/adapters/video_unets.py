"""Video UNets: ``UNetMotionModel`` (AnimateDiff) and ``UNet3DConditionModel`` run with per-frame spatial layers and
temporal layers (``RoleRule.axes``); the others here are refused.

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

import torch

from .base import FamilyAdapter, ModelInputs, RoleRule, _require


def _frames_grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
    """(frames, height, width) of the ``(B, C, F, H, W)`` latent ``sample``, height and width halved per level"""
    sample = _require(inputs, "sample", type(model).__name__)
    return (int(sample.shape[2]), int(sample.shape[-2]), int(sample.shape[-1]))


def _video_unet_rules(temporal: str) -> tuple[RoleRule, ...]:
    """Spatial ``attentions`` per frame (self, cross) and the temporal modules matching ``temporal``: self-attention
    over the frames of each pixel (their ``attn2`` has no text either)."""
    return (
        RoleRule(temporal + r"\.transformer_blocks\.\d+\.attn[12]", "self", axes="temporal"),
        RoleRule(r".*\battentions\.\d+\.transformer_blocks\.\d+\.attn1", "self", axes="per_frame"),
        RoleRule(r".*\battentions\.\d+\.transformer_blocks\.\d+\.attn2", "cross", axes="per_frame"),
    )


ADAPTERS = (
    FamilyAdapter(
        "animatediff",
        "UNetMotionModel",
        _video_unet_rules(r".*motion_modules\.\d+"),
        _frames_grid,
        multiscale=True,
        frame_folded_inputs=frozenset({"encoder_hidden_states"}),
    ),
    FamilyAdapter(
        "unet3d",
        "UNet3DConditionModel",
        _video_unet_rules(r"(transformer_in|.*temp_attentions\.\d+)"),
        _frames_grid,
        multiscale=True,
    ),
)

_PER_FRAME = (
    "its spatial attention runs per frame (a batch of B*F images of H*W tokens) and its temporal attention over "
    "the frames of each pixel (a batch of B*H*W sequences of F tokens); diffattn needs the video's F*H*W tokens "
    "in one sequence per batch entry (per-frame spatial and temporal layouts are not supported yet)"
)

REFUSED = {
    "UNetSpatioTemporalConditionModel": _PER_FRAME,
    "I2VGenXLUNet": _PER_FRAME,
    "TransformerTemporalModel": (
        "temporal attention only: each call attends over the F frames of one pixel (a batch of B*H*W sequences "
        "of F tokens), which is no visual grid (a temporal role is not supported yet)"
    ),
}
