"""DDIM inversion: the noise from which a pipeline regenerates a given image, so that every editing method can edit
an existing image (the source branch replays the inverted noise)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["invert", "ddim_scheduler", "rgb_image"]

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


def _bad_shape(owner: str, shape: tuple[int, ...]) -> ValueError:
    return ValueError(
        f"{owner}: the image must be RGB, H x W x 3 (grayscale H x W or H x W x 1 and opaque RGBA H x W x 4 are "
        f"converted), got shape {shape}"
    )


def _opaque_pil(image: Any, owner: str) -> Any:
    """A PIL image in RGB mode; transparency is refused (what lies under it is unknown)."""
    alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if alpha and image.convert("RGBA").getchannel("A").getextrema()[0] < 255:
        raise ValueError(
            f"{owner}: the image has transparent pixels, and what lies under them is unknown; composite it onto a "
            "background first (PIL: Image.alpha_composite(background, image).convert('RGB'))"
        )
    return image if image.mode == "RGB" else image.convert("RGB")


def rgb_image(image: Any, owner: str, *, array: bool = False) -> Any:
    """``image`` as an RGB image the pipeline's image processor reads right: a PIL image in RGB mode (any mode
    without transparency is converted); numpy ``(H, W, 3)`` float32 in [0, 1] from uint8 (0..255) or floats in
    [0, 1], grayscale ``(H, W)`` / ``(H, W, 1)`` repeated, opaque RGBA ``(H, W, 4)`` without its alpha; a tensor
    ``(3, H, W)`` / ``(1, 3, H, W)`` (one channel: repeated). Anything else raises, saying what to pass. ``array``:
    PIL images become numpy too, tensors are refused."""
    from PIL import Image

    if isinstance(image, Image.Image):
        image = _opaque_pil(image, owner)
        if not array:
            return image
    if isinstance(image, torch.Tensor):
        t = image[None] if image.ndim == 3 else image
        if array or t.ndim != 4 or t.shape[0] != 1 or t.shape[1] not in (1, 3):
            raise ValueError(
                f"{owner}: pass the image as a numpy array (H x W x 3, uint8 or floats in [0, 1])"
                + ("" if array else " or a tensor (3, H, W) / (1, 3, H, W)")
                + f", got a tensor of shape {tuple(image.shape)}"
            )
        return t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise _bad_shape(owner, a.shape)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif a.dtype.kind == "f":
        a = a.astype(np.float32)
        low, high = float(a.min()), float(a.max())
        if not (np.isfinite(low) and np.isfinite(high)) or low < -1e-4 or high > 1 + 1e-4:
            raise ValueError(
                f"{owner}: a float image must hold values in [0, 1], got {low:.4g}..{high:.4g}; pass uint8 (0..255), "
                "divide a 0..255 float image by 255, or map a [-1, 1] image with (x + 1) / 2"
            )
    else:
        raise ValueError(f"{owner}: the image must be uint8 (0..255) or floats in [0, 1], got {a.dtype}")
    if a.shape[-1] == 4:
        if float(a[..., 3].min()) < 1.0:
            raise ValueError(
                f"{owner}: the image has transparent pixels (alpha < 1), and what lies under them is unknown; "
                "composite it onto a background and pass H x W x 3"
            )
        a = a[..., :3]
    return np.repeat(a, 3, -1) if a.shape[-1] == 1 else a


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
    ``image`` (PIL, numpy ``(H, W, 3)`` uint8 or floats in [0, 1] or a tensor; grayscale and opaque RGBA are read
    as RGB, see :func:`rgb_image`): DDIM inversion with diffusers'
    ``DDIMInverseScheduler``, run through the pipeline's own loop (``output_type="latent"``, no classifier-free
    guidance), so SD1.5 and SDXL conditioning (SDXL's added time ids included) is the pipeline's own.

    Pass the result as ``latents=`` to the pipeline or to :func:`diffattn.editing.edit` together with
    ``scheduler=ddim_scheduler(pipe)`` semantics (``edit`` swaps it in when given ``latents``). DDIM-inverted noise
    is not Gaussian-exact; the reconstruction error grows with fewer steps.
    """
    from diffusers import DDIMInverseScheduler

    image = rgb_image(image, "invert")  # the image processor reads numpy images as RGB floats in [0, 1]
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
