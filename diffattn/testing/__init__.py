"""Tiny random-weight diffusers models, inputs and pipelines for offline tests (and for anyone writing an adapter).

Everything here is built from small configs: nothing is downloaded, weights are random (seeded) and
one forward pass takes milliseconds on a CPU.

* :func:`tiny_model` builds the denoiser of a model family (``FAMILIES``).
* :func:`tiny_inputs` builds keyword arguments for that denoiser whose visual token grid, after
  patching, is a requested ``(h, w)`` (image families) or ``(f, h, w)`` (video families).
* :func:`visual_grid_of` reads that grid back from such inputs.
* :func:`tiny_pipeline` assembles a complete standard diffusers pipeline (VAE, text encoders,
  locally built tokenizers, scheduler) around the same tiny denoisers.

Grid conventions (``grid`` is always counted in visual tokens of the denoiser's first attention
level, in row-major ``(f, h, w)`` / ``(h, w)`` order):

* ``unet_sd15`` / ``unet_sdxl``: no patching, ``grid == latent (H, W)``; any size >= 1 works (the
  UNet matches its upsampling to the skip size). Level 1 is ``(ceil(H/2), ceil(W/2))``. sd15 attends
  at level 0 (``down_blocks.0``, ``up_blocks.1``) and level 1 (``mid_block``); sdxl only at level 1
  (``down_blocks.1``, ``mid_block``, ``up_blocks.0``), like SDXL, whose top level has no attention.
* ``sd3``: patch 2, latent ``(2h, 2w)``; ``h, w <= SD3_POS_EMBED_MAX`` (cropped position table).
* ``flux``: latents are already 2x2-packed tokens ``(B, h*w, 16)``; the grid comes from ``img_ids``.
* ``wan``: patch ``(1, 2, 2)``, latent ``(B, 16, f, 2h, 2w)``; each of ``f, h, w <= WAN_ROPE_MAX``.
* ``cogvideox``: patch 2 per frame, latent ``(B, f, 4, 2h, 2w)``; the text length is fixed to
  ``COGVIDEOX_TEXT_LEN`` (the sin-cos position table covers ``text + video`` tokens).
* ``hunyuan_video``: patch 2, patch_t 1, latent ``(B, 4, f, 2h, 2w)``.
* ``ltx_video``: patch 1, latents are packed tokens ``(B, f*h*w, 8)`` plus ``num_frames/height/width``.
"""

from __future__ import annotations

from .context import standalone_context
from .families import (
    COGVIDEOX_TEXT_LEN,
    FAMILIES,
    IMAGE_FAMILIES,
    PIPELINE_KINDS,
    SD3_POS_EMBED_MAX,
    VIDEO_FAMILIES,
    WAN_ROPE_MAX,
)
from .inputs import tiny_inputs, visual_grid_of
from .models import tiny_model
from .pipelines import tiny_pipeline
from .tokenizers import write_clip_vocab

__all__ = [
    "FAMILIES",
    "VIDEO_FAMILIES",
    "IMAGE_FAMILIES",
    "PIPELINE_KINDS",
    "COGVIDEOX_TEXT_LEN",
    "SD3_POS_EMBED_MAX",
    "WAN_ROPE_MAX",
    "tiny_model",
    "tiny_inputs",
    "standalone_context",
    "visual_grid_of",
    "tiny_pipeline",
    "write_clip_vocab",
]
