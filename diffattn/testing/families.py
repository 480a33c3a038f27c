"""Model families of the tiny models, and the sizes they share."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

FAMILIES: tuple[str, ...] = (
    "unet_sd15",
    "unet_sdxl",
    "sd3",
    "flux",
    "wan",
    "cogvideox",
    "hunyuan_video",
    "ltx_video",
)
VIDEO_FAMILIES: frozenset[str] = frozenset({"wan", "cogvideox", "hunyuan_video", "ltx_video"})
IMAGE_FAMILIES: frozenset[str] = frozenset(FAMILIES) - VIDEO_FAMILIES
PIPELINE_KINDS: tuple[str, ...] = ("sd", "sdxl", "flux", "wan", "sd3")

#: Largest patch grid side the tiny SD3 model accepts (its cropped position-embedding table).
SD3_POS_EMBED_MAX = 32
#: Largest (patched) frames / height / width the tiny Wan model accepts (its RoPE table length).
WAN_ROPE_MAX = 128
#: Text length the tiny CogVideoX model requires (its sin-cos table reserves this many text slots).
COGVIDEOX_TEXT_LEN = 7

# Text-embedding widths the denoisers expect (and that tiny_pipeline's text encoders produce).
_TEXT_DIM = 32
_SDXL_POOLED_DIM = 16  # CLIPTextModelWithProjection projection_dim of SDXL's second encoder
_SDXL_TIME_EMBED_DIM = 8
_HUNYUAN_POOLED_DIM = 16
_LTX_CHANNELS = 8
_TIMESTEP = 500.0


# --------------------------------------------------------------------------------------------------
# Denoisers
# --------------------------------------------------------------------------------------------------


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
