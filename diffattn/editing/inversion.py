"""DDIM inversion: the noise from which a pipeline regenerates a given image, so that every editing method can edit
an existing image (the source branch replays the inverted noise).

``invert(..., return_intermediates=True)`` also keeps the latent after every inversion step (an :class:`Inversion`);
:func:`diffattn.editing.edit` given ``inversion=`` then puts the inversion's latent of each step into the source
branch (MasaCtrl's ``ref_intermediate_latents``), so the source side reproduces the encoded image exactly even where
DDIM inversion alone drifts (classifier-free guidance > 1, few steps). :func:`check_reconstruction` measures how well
a pipeline regenerates an image from its inverted noise: a low PSNR marks an image unlike the model's training data.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

__all__ = [
    "Inversion",
    "invert",
    "replay",
    "ddim_scheduler",
    "rgb_image",
    "ReconstructionCheck",
    "check_reconstruction",
]

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


@dataclass(frozen=True)
class Inversion:
    """What an inversion of one image holds, for :func:`diffattn.editing.edit`'s ``inversion=``.

    ``latents``: the inverted noise (batch 1), where the replay starts. ``trajectory``: the inversion's latent at the
    end of each denoising step of the replay, in denoising order (``trajectory[i]`` is where step ``i`` lands;
    ``trajectory[-1]`` is the encoded image), or ``None``. ``uncond_embeddings``: null-text inversion's unconditional
    text embedding of each denoising step (one ``(1, tokens, dim)`` tensor per step), optimised for classifier-free
    guidance ``guidance_scale``, or ``None``. ``prompt`` and ``num_inference_steps``: the inversion's, which the
    edit's source prompt and step count must equal."""

    latents: torch.Tensor
    prompt: str
    num_inference_steps: int
    trajectory: tuple[torch.Tensor, ...] | None = None
    uncond_embeddings: tuple[torch.Tensor, ...] | None = None
    guidance_scale: float | None = None

    def __post_init__(self) -> None:
        steps = self.num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"Inversion: num_inference_steps must be an int >= 1, got {steps!r}")
        if self.latents.ndim < 2 or self.latents.shape[0] != 1:
            raise ValueError(f"Inversion: latents must hold one entry (batch 1), got {tuple(self.latents.shape)}")
        for name in ("trajectory", "uncond_embeddings"):
            value = getattr(self, name)
            if value is not None and len(value) != steps:
                raise ValueError(
                    f"Inversion: {name} must hold one tensor per denoising step ({steps}), got {len(value)}; "
                    "make it with the same num_inference_steps"
                )
        if self.trajectory is not None and any(t.shape != self.latents.shape for t in self.trajectory):
            raise ValueError(
                f"Inversion: every trajectory latent must have the latents' shape {tuple(self.latents.shape)}"
            )
        if self.uncond_embeddings is not None:
            shapes = sorted({tuple(e.shape) for e in self.uncond_embeddings})
            if len(shapes) != 1 or len(shapes[0]) != 3 or shapes[0][0] != 1:
                raise ValueError(f"Inversion: uncond_embeddings must all have one shape (1, tokens, dim), got {shapes}")
            if self.guidance_scale is None or not self.guidance_scale > 1.0:
                raise ValueError(
                    "Inversion: uncond_embeddings are optimised for one classifier-free guidance scale > 1; give "
                    f"guidance_scale (got {self.guidance_scale!r})"
                )

    def without_trajectory(self) -> Inversion:
        """The same inversion without its per-step latents (the source branch then runs freely from ``latents``)."""
        return replace(self, trajectory=None)

    def without_null_text(self) -> Inversion:
        """The same inversion without null-text's unconditional embeddings (the pipeline's own are used then)."""
        return replace(self, uncond_embeddings=None, guidance_scale=None)


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
    return_intermediates: bool = False,
    **call_kwargs: Any,
) -> torch.Tensor | Inversion:
    """The latents that the pipeline, with :func:`ddim_scheduler` and the same prompt and step count, turns back into
    ``image`` (PIL, numpy ``(H, W, 3)`` uint8 or floats in [0, 1] or a tensor; grayscale and opaque RGBA are read
    as RGB, see :func:`rgb_image`): DDIM inversion with diffusers'
    ``DDIMInverseScheduler``, run through the pipeline's own loop (``output_type="latent"``, no classifier-free
    guidance), so SD1.5 and SDXL conditioning (SDXL's added time ids included) is the pipeline's own.

    Pass the result as ``latents=`` to the pipeline or to :func:`diffattn.editing.edit` together with
    ``scheduler=ddim_scheduler(pipe)`` semantics (``edit`` swaps it in when given ``latents``). DDIM-inverted noise
    is not Gaussian-exact; the reconstruction error grows with fewer steps.

    ``return_intermediates=True``: an :class:`Inversion` that also holds the latent after every inversion step, in
    the replay's order (``edit(..., inversion=...)`` puts them into the source branch step by step).
    """
    from diffusers import DDIMInverseScheduler

    from .callbacks import chain_step_end

    image = rgb_image(image, "invert")  # the image processor reads numpy images as RGB floats in [0, 1]
    latents = _encode(pipe, image, height, width)
    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config, **_SPACING)
    reached: list[torch.Tensor] = []  # the latent after each inversion step: z_1 ... z_T

    def keep(_pipe: Any, _i: int, _t: Any, outputs: dict[str, Any]) -> dict[str, Any]:
        reached.append(outputs["latents"].detach().clone())
        return outputs

    if return_intermediates:
        call_kwargs.update(chain_step_end(call_kwargs, keep))
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
    result = (out.images if hasattr(out, "images") else out[0]).detach()
    if not return_intermediates:
        return result
    if len(reached) != num_inference_steps:
        raise RuntimeError(
            f"invert: the pipeline ran {len(reached)} steps for num_inference_steps={num_inference_steps}; "
            "intermediate latents need one step-end callback per step (a diffusers pipeline with "
            "callback_on_step_end)"
        )
    # denoising step i goes from z_{T-i} to z_{T-i-1}: the trajectory is z_{T-1}, ..., z_1, then the encoded image
    trajectory = tuple(reversed(reached[:-1])) + (latents.detach().clone(),)
    return Inversion(result, prompt, num_inference_steps, trajectory=trajectory)


def replay(pipe: Any, prompt: str, latents: torch.Tensor, num_inference_steps: int, **call_kwargs: Any) -> np.ndarray:
    """The image ``pipe`` regenerates from inverted ``latents`` with ``prompt`` (:func:`ddim_scheduler`, no
    classifier-free guidance, as :func:`invert` ran): the inverted image's reconstruction, ``(H, W, 3)`` in [0, 1]."""
    with _scheduler(pipe, ddim_scheduler(pipe)):
        out = pipe(
            prompt=prompt,
            latents=latents,
            num_inference_steps=num_inference_steps,
            guidance_scale=1.0,
            output_type="np",
            **call_kwargs,
        )
    return np.asarray(out.images)[0]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two images of floats in [0, 1] (inf when equal)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


@dataclass(frozen=True)
class ReconstructionCheck:
    """How well a pipeline regenerates an image from its inverted noise: ``psnr`` (dB) against the image, the
    ``threshold`` it is held against, and the ``reconstruction`` itself."""

    psnr: float
    threshold: float
    reconstruction: np.ndarray

    @property
    def out_of_domain(self) -> bool:
        return self.psnr < self.threshold

    @property
    def message(self) -> str | None:
        """The warning for the user when the image is out of the model's domain (else ``None``)."""
        if not self.out_of_domain:
            return None
        return (
            f"Warning: this image looks unlike the model's training images: regenerated from its inversion it comes "
            f"back at {self.psnr:.1f} dB PSNR (images the model knows: >= {self.threshold:g} dB), so the source and "
            "the edit will differ from it."
        )


def check_reconstruction(
    pipe: Any,
    image: Any,
    prompt: str,
    latents: torch.Tensor | Inversion,
    num_inference_steps: int,
    *,
    threshold: float,
    **call_kwargs: Any,
) -> ReconstructionCheck:
    """The reconstruction PSNR of an inverted ``image`` (``latents`` from :func:`invert` with ``prompt`` and
    ``num_inference_steps``; the :func:`replay` runs without guidance, as the inversion did) and whether it falls
    below ``threshold`` dB: an image far from the model's training data comes back changed. The threshold belongs
    to the model and has no default; the embedded image model's (``diffattn_bench.embedded.IMAGE_INVERSION_PSNR``)
    was measured on in-domain rendered scenes against photo-like and patterned images with

        python scripts/eval_inversion.py --model image --cases 20 --domain-only
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"check_reconstruction: threshold must be a finite number of dB, got {threshold!r}")
    if isinstance(latents, Inversion):
        if latents.num_inference_steps != num_inference_steps:
            raise ValueError(
                f"check_reconstruction: the inversion ran {latents.num_inference_steps} steps, the check "
                f"{num_inference_steps}; pass the inversion's num_inference_steps"
            )
        latents = latents.latents
    truth = rgb_image(image, "check_reconstruction", array=True)
    out = replay(pipe, prompt, latents, num_inference_steps, **call_kwargs)
    if out.shape != truth.shape:
        raise ValueError(
            f"check_reconstruction: the image is {truth.shape[:2]} but the pipeline regenerates {out.shape[:2]}; "
            "pass the image at the size it was inverted at (or height= / width= of that size)"
        )
    return ReconstructionCheck(psnr=psnr(out, truth), threshold=float(threshold), reconstruction=out)
