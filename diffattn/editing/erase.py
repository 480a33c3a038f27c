"""Object removal with Attentive Eraser (attention activation suppression + self-attention redirection guidance).

    image = diffattn.editing.erase(pipe, image, mask, num_inference_steps=50)

The batch is two branches of one latent, ``wo`` (plain attention) and ``w`` (the :class:`AttentiveEraser` method
acts), both with the empty prompt and no classifier-free guidance; the prediction is
``eps_wo + guidance * (eps_w - eps_wo)`` (SARG), and after every step the latent outside the (dilated) mask is
reset to the source latent noised to that step (inpainting-style blending), so only the masked region is redrawn.
The loop starts from the source image noised to ``strength`` (as img2img). UNet pipelines: SD1.5-style
(``StableDiffusionPipeline``) and SDXL (``StableDiffusionXLPipeline``, the paper's model: its pooled text embeddings
and size time ids are passed as the pipeline does). SD3 / Flux (flow-matching transformers) raise: not built.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..api import apply
from ..methods.edit_masks import MASK_THRESHOLD, object_mask
from ..methods.eraser import AttentiveEraser
from ..runtime import denoising_step, prompt_branches
from .inversion import _encode, ddim_scheduler, rgb_image

__all__ = ["erase"]


def _latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The object mask (H x W bool) at latent size by max-pooling (any covered pixel marks its latent cell)."""
    return (F.adaptive_max_pool2d(mask.float()[None, None], size) > 0.5).float()


def unet_conditioning(pipe: Any, prompt: str, batch: int, size: tuple[int, int], device: Any) -> dict[str, Any]:
    """The UNet's keyword arguments for ``prompt`` repeated ``batch`` times, no CFG, as the pipeline builds them:
    text embeddings, and for SDXL the pooled text embeddings and the (size, crop (0, 0), size) time ids."""
    encoded = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=batch, do_classifier_free_guidance=False)
    if pipe.unet.config.addition_embed_type != "text_time":
        return {"encoder_hidden_states": encoded[0]}
    embeds, _, pooled, _ = encoded
    time_ids = (
        pipe._get_add_time_ids(
            tuple(size), (0, 0), tuple(size), dtype=embeds.dtype, text_encoder_projection_dim=int(pooled.shape[-1])
        )
        .repeat(batch, 1)
        .to(device)
    )
    return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


@torch.no_grad()
def erase(
    pipe: Any,
    image: Any,
    mask: Any,
    *,
    num_inference_steps: int = 50,
    strength: float = 0.8,
    guidance: float = 9.0,
    method: AttentiveEraser | None = None,
    seed: int = 0,
    layers: Any = "up_blocks",
    suppress: bool = True,
) -> np.ndarray:
    """Remove the object under ``mask`` from ``image`` (H x W x 3 uint8 or floats in [0, 1]; grayscale and opaque
    RGBA are read as RGB); returns the edited image as floats in [0, 1]. ``mask``: the image's H x W, True on the
    object, or numbers with the object at values >= 0.5 (one threshold for the latent blending and the attention
    suppression; a soft mask's feathered edge below it is background). ``method`` sets AAS (default
    ``AttentiveEraser()``); ``layers``: where it acts (the paper: the decoder's self-attention). ``suppress=False``:
    the same masked regeneration without attention suppression (both branches plain), the baseline that shows
    what the suppression adds."""
    from diffusers import UNet2DConditionModel

    if not isinstance(getattr(pipe, "unet", None), UNet2DConditionModel):
        raise ValueError(
            f"erase: runs on UNet pipelines (SD1.5, SDXL); {type(pipe).__name__} is not one (SD3 / Flux "
            "erasing is not built). Use a StableDiffusionPipeline or StableDiffusionXLPipeline"
        )
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"erase: strength must be in (0, 1], got {strength}")
    image = rgb_image(image, "erase", array=True)
    mask = object_mask(mask, "erase")
    if tuple(mask.shape) != image.shape[:2]:
        raise ValueError(
            f"erase: the mask ({tuple(mask.shape)}) must have the image's height and width {image.shape[:2]}; "
            "resize it (nearest) to the image"
        )
    if not bool(mask.any()):
        raise ValueError(
            f"erase: the mask selects nothing: values >= {MASK_THRESHOLD} mark the object (True in a bool mask); "
            "mark the object to remove"
        )
    method = method or AttentiveEraser()
    scheduler = ddim_scheduler(pipe)
    x0 = _encode(pipe, image, image.shape[0], image.shape[1])
    keep = 1.0 - _latent_mask(mask, x0.shape[-2:]).to(x0)
    scheduler.set_timesteps(num_inference_steps)
    start = num_inference_steps - int(round(strength * num_inference_steps))
    timesteps = scheduler.timesteps[start:]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)
    latents = scheduler.add_noise(x0, noise, timesteps[:1])
    conditioning = unet_conditioning(pipe, "", 2, image.shape[:2], x0.device)
    if not isinstance(suppress, bool):
        raise TypeError(f"erase: suppress must be True or False, got {suppress!r}")
    handle = apply(pipe, method.with_mask(mask), layers=layers) if suppress else None
    try:
        for i, t in enumerate(timesteps):
            with (
                denoising_step(i, len(timesteps), timestep=float(t), batch_roles=("cond", "cond")),
                prompt_branches(("wo", "w")),
            ):
                eps = pipe.unet(torch.cat([latents] * 2), t, **conditioning).sample
            eps_wo, eps_w = eps.chunk(2)
            latents = scheduler.step(eps_wo + guidance * (eps_w - eps_wo), t, latents).prev_sample
            if i + 1 < len(timesteps):  # outside the mask: the source, noised to the next step
                source = scheduler.add_noise(x0, noise, timesteps[i + 1 : i + 2])
            else:
                source = x0
            latents = keep * source + (1.0 - keep) * latents
    finally:
        if handle is not None:
            handle.remove()
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return ((decoded[0].permute(1, 2, 0).clamp(-1, 1) + 1) / 2).float().cpu().numpy()
