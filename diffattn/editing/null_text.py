"""Null-text inversion (Mokady et al., 2022): DDIM inversion without guidance gives a pivot trajectory; then, step by
step, the unconditional text embedding is optimised so that the classifier-free-guided DDIM step from the current
latent lands on the pivot's next latent. The per-step embeddings reproduce the image at guidance > 1, where plain DDIM
inversion drifts, and :func:`diffattn.editing.edit` puts them into the unconditional branch of every prompt
(``edit(..., inversion=null_text_invert(...))``), whatever the attention method.

    inversion = diffattn.editing.null_text_invert(pipe, image, "a red circle on the left", 50, guidance_scale=7.5)
    result = diffattn.editing.edit(pipe, inversion.prompt, "a blue circle on the left", diffattn.PromptToPrompt(),
                                   inversion=inversion, guidance_scale=7.5)

Built for UNet pipelines conditioned on text embeddings alone (SD1.x / SD2.x-style ``StableDiffusionPipeline``);
others raise.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from ..adapters import adapter_for, model_inputs
from ..errors import LayoutError
from ..runtime import denoising_step
from ..runtime.call_state import read_call_state
from .inversion import Inversion, ddim_scheduler, invert

__all__ = ["NullTextConfig", "null_text_invert", "null_text_hook"]


@dataclass(frozen=True)
class NullTextConfig:
    """The optimisation of each step's unconditional embedding: Adam with ``learning_rate`` for at most
    ``inner_steps`` iterations, stopped early once the MSE between the guided step's latent and the pivot's is below
    ``tolerance + step * tolerance_growth`` (``step``: the denoising step, 0 at the noisiest; later steps are allowed
    a larger error, as the paper's early stopping does)."""

    inner_steps: int = 10
    learning_rate: float = 1e-2
    tolerance: float = 1e-5
    tolerance_growth: float = 2e-5

    def __post_init__(self) -> None:
        if isinstance(self.inner_steps, bool) or not isinstance(self.inner_steps, int) or self.inner_steps < 0:
            raise ValueError(f"NullTextConfig: inner_steps must be an int >= 0, got {self.inner_steps!r}")
        for name in ("learning_rate", "tolerance", "tolerance_growth"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"NullTextConfig: {name} must be a finite number >= 0, got {value!r}")


def _check_pipeline(pipe: Any, owner: str) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, UNet2DConditionModel) or unet.config.addition_embed_type is not None:
        raise ValueError(
            f"{owner}: built for UNet pipelines conditioned on text embeddings alone (SD1.x / SD2.x, "
            f"StableDiffusionPipeline); {type(pipe).__name__} is not one (SDXL's pooled embeddings and transformer "
            "pipelines are not built). Use plain invert(..., return_intermediates=True) there"
        )
    if unet.config.time_cond_proj_dim is not None:
        raise ValueError(
            f"{owner}: the UNet embeds the guidance scale (LCM-style); it runs no classifier-free guidance"
        )
    return unet


def _guided_step(
    unet: torch.nn.Module,
    scheduler: Any,
    latent: torch.Tensor,
    t: torch.Tensor,
    uncond: torch.Tensor,
    eps_cond: torch.Tensor,
    guidance_scale: float,
    position: tuple[int, int],
) -> torch.Tensor:
    """The DDIM step from ``latent`` at ``t`` with classifier-free guidance (the pipeline's formula), the conditional
    prediction ``eps_cond`` given."""
    step, total = position
    model_input = scheduler.scale_model_input(latent, t)
    with denoising_step(step, total, timestep=float(t), batch_roles=("uncond",)):
        eps_uncond = unet(model_input, t, encoder_hidden_states=uncond).sample
    guided = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
    return scheduler.step(guided, t, latent).prev_sample


def null_text_invert(
    pipe: Any,
    image: Any,
    prompt: str,
    num_inference_steps: int = 50,
    *,
    guidance_scale: float,
    config: NullTextConfig = NullTextConfig(),
    height: int | None = None,
    width: int | None = None,
    return_intermediates: bool = False,
    progress: bool = True,
) -> Inversion:
    """Null-text inversion of ``image`` with ``prompt``: an :class:`~diffattn.editing.Inversion` holding the inverted
    noise and one optimised unconditional embedding per denoising step, for classifier-free guidance
    ``guidance_scale`` (> 1; the edit must use the same). ``return_intermediates``: keep the pivot trajectory too
    (``edit`` then also puts it into the source branch). ``progress``: a progress bar over the steps, showing the
    last loss and inner iterations."""
    unet = _check_pipeline(pipe, "null_text_invert")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not guidance_scale > 1.0:
        raise ValueError(
            f"null_text_invert: guidance_scale must be a number > 1 (the classifier-free guidance the edit will run; "
            f"the paper: 7.5), got {guidance_scale!r}; without guidance plain DDIM inversion already reconstructs"
        )
    pivot = invert(pipe, image, prompt, num_inference_steps, height=height, width=width, return_intermediates=True)
    assert isinstance(pivot, Inversion) and pivot.trajectory is not None
    device = pivot.latents.device
    cond, uncond = pipe.encode_prompt(prompt, device, 1, True)
    cond, uncond = cond.detach(), uncond.detach()
    scheduler = ddim_scheduler(pipe)
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    if len(timesteps) != num_inference_steps:
        raise RuntimeError(
            f"null_text_invert: the DDIM scheduler made {len(timesteps)} timesteps, not {num_inference_steps}"
        )
    latent = pivot.latents
    embeddings: list[torch.Tensor] = []
    bar = tqdm(total=num_inference_steps, desc="null-text inversion", disable=not progress)
    for i, t in enumerate(timesteps):
        with torch.no_grad(), denoising_step(i, num_inference_steps, timestep=float(t), batch_roles=("cond",)):
            eps_cond = unet(scheduler.scale_model_input(latent, t), t, encoder_hidden_states=cond).sample
        guided = functools.partial(
            _guided_step,
            unet,
            scheduler,
            latent,
            t,
            eps_cond=eps_cond,
            guidance_scale=float(guidance_scale),
            position=(i, num_inference_steps),
        )
        tolerance = config.tolerance + i * config.tolerance_growth
        uncond, loss, used = _optimise(guided, uncond, pivot.trajectory[i], config, tolerance)
        embeddings.append(uncond)
        with torch.no_grad():
            latent = guided(uncond)
        bar.set_postfix(loss=f"{loss:.2e}", iterations=used)
        bar.update(1)
    bar.close()
    return replace(
        pivot,
        trajectory=pivot.trajectory if return_intermediates else None,
        uncond_embeddings=tuple(embeddings),
        guidance_scale=float(guidance_scale),
    )


def _optimise(
    step: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    target: torch.Tensor,
    config: NullTextConfig,
    tolerance: float,
) -> tuple[torch.Tensor, float, int]:
    """``(embedding, loss, iterations)``: ``start`` optimised with Adam so that ``step(embedding)`` lands on ``target``
    (MSE), stopping once the loss is below ``tolerance`` (the loss is of the returned embedding)."""
    embedding = start.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([embedding], lr=config.learning_rate)
    loss_value, used = math.inf, 0
    for used in range(config.inner_steps + 1):
        with torch.enable_grad():
            loss = torch.nn.functional.mse_loss(step(embedding), target)
            loss_value = float(loss.detach())
            if loss_value < tolerance or used == config.inner_steps:
                break
            # only the embedding's gradient (the denoiser's weights get none)
            (grad,) = torch.autograd.grad(loss, [embedding])
        embedding.grad = grad
        optimiser.step()
    return embedding.detach(), loss_value, used


def null_text_hook(pipe: Any, inversion: Inversion) -> torch.utils.hooks.RemovableHandle:
    """A forward pre-hook on ``pipe``'s UNet that gives every unconditional entry of each call the inversion's
    embedding of the running step. The step and the batch roles are diffattn's reading of the call (the pipeline's
    loop and its classifier-free-guidance halves); a call where either is unknown raises, saying how to declare it.
    Remove the returned handle when the call is over."""
    unet = _check_pipeline(pipe, "edit with null-text embeddings")
    embeddings = inversion.uncond_embeddings
    if embeddings is None:
        raise ValueError(
            "null_text_hook: the inversion holds no unconditional embeddings; make it with null_text_invert"
        )
    adapter = adapter_for(unet)

    def before(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        inputs = model_inputs(module, args, kwargs)
        state = read_call_state(module, adapter, inputs, None, None)
        if state.step is None:
            raise LayoutError(
                "null-text embeddings: the denoising step of this UNet call is unknown; call the pipeline (its loop "
                "gives the step) or declare it with diffattn.denoising_step(i, num_steps)"
            )
        if state.batch_roles is None:
            raise LayoutError(
                "null-text embeddings: the roles (uncond / cond) of this UNet call's batch entries are unknown; run a "
                "standard pipeline with classifier-free guidance or declare them with "
                "diffattn.denoising_step(i, num_steps, batch_roles=(...))"
            )
        if state.step >= len(embeddings):
            raise LayoutError(
                f"null-text embeddings: step {state.step} of a loop of {state.num_steps}, but the inversion has "
                f"{len(embeddings)} steps; run the edit with num_inference_steps={len(embeddings)}"
            )
        if "uncond" not in state.batch_roles:
            raise LayoutError(
                f"null-text embeddings: this UNet call has no unconditional entry (roles {state.batch_roles}); the "
                f"edit must run classifier-free guidance (guidance_scale={inversion.guidance_scale})"
            )
        hidden = inputs.get("encoder_hidden_states")
        chosen = embeddings[state.step]
        if not isinstance(hidden, torch.Tensor) or hidden.shape[1:] != chosen.shape[1:]:
            raise LayoutError(
                f"null-text embeddings of shape {tuple(chosen.shape[1:])} do not fit the UNet's "
                f"encoder_hidden_states {None if not isinstance(hidden, torch.Tensor) else tuple(hidden.shape)}; "
                "invert with the same pipeline"
            )
        rows = torch.tensor([r == "uncond" for r in state.batch_roles], device=hidden.device)
        replaced = torch.where(rows[:, None, None], chosen.to(hidden), hidden)
        if "encoder_hidden_states" in kwargs:
            return args, {**kwargs, "encoder_hidden_states": replaced}
        names = list(model_inputs(module, args, {}))
        position = names.index("encoder_hidden_states")
        return args[:position] + (replaced,) + args[position + 1 :], kwargs

    return unet.register_forward_pre_hook(before, with_kwargs=True, prepend=True)
