"""DDIM inversion: the noise from which a pipeline regenerates a given image, so that every editing method can edit
an existing image (the source branch replays the inverted noise)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["invert", "ddim_scheduler"]

# both directions on the same timesteps (DDIMInverseScheduler refuses "linspace", the embedded model's spacing), and
# no clipping of the predicted sample to [-1, 1] (DDIM's default; latents exceed it)
_SPACING = {"timestep_spacing": "trailing", "clip_sample": False}


@contextlib.contextmanager
def _scheduler(pipe: Any, scheduler: Any) -> Iterator[None]:
    previous = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield
    finally:
        pipe.scheduler = previous


def ddim_scheduler(pipe: Any) -> Any:
    """A ``DDIMScheduler`` with the pipeline's noise schedule: regenerate inverted noise with it (the exact reverse of
    :func:`invert`'s steps)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(pipe.scheduler.config, **_SPACING)


def _encode(pipe: Any, image: Any, height: int | None, width: int | None) -> torch.Tensor:
    pixels = pipe.image_processor.preprocess(image, height=height, width=width).to(pipe.vae.device, pipe.vae.dtype)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * pipe.vae.config.scaling_factor


def invert(
    pipe: Any,
    image: Any,
    prompt: str,
    num_inference_steps: int = 50,
    *,
    height: int | None = None,
    width: int | None = None,
    **call_kwargs: Any,
) -> torch.Tensor:
    """The latents that the pipeline, with :func:`ddim_scheduler` and the same prompt and step count, turns back into
    ``image`` (PIL, numpy ``(H, W, 3)`` in [0, 1] or a tensor): DDIM inversion with diffusers'
    ``DDIMInverseScheduler``, run through the pipeline's own loop (``output_type="latent"``, no classifier-free
    guidance), so SD1.5 and SDXL conditioning (SDXL's added time ids included) is the pipeline's own.

    Pass the result as ``latents=`` to the pipeline or to :func:`diffattn.editing.edit` together with
    ``scheduler=ddim_scheduler(pipe)`` semantics (``edit`` swaps it in when given ``latents``). DDIM-inverted noise
    is not Gaussian-exact; the reconstruction error grows with fewer steps.
    """
    from diffusers import DDIMInverseScheduler

    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0  # the image processor reads numpy images as floats in [0, 1]
    latents = _encode(pipe, image, height, width)
    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config, **_SPACING)
    with _scheduler(pipe, inverse):
        out = pipe(
            prompt=prompt,
            latents=latents,
            num_inference_steps=num_inference_steps,
            guidance_scale=1.0,
            output_type="latent",
            height=height,
            width=width,
            **call_kwargs,
        )
    result = out.images if hasattr(out, "images") else out[0]
    return result.detach()
