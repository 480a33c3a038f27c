"""Multi-subject layout with bounded attention: each subject word drawn inside its box, without leaking into the others.

    image = diffattn.editing.layout(pipe, "a red circle and a blue square",
                                    [("circle", (0.05, 0.1, 0.45, 0.5)), ("square", (0.55, 0.45, 0.95, 0.9))])

The masks (:class:`~diffattn.BoundedAttention`) act on every attention layer of the denoiser for the whole run; for
the first ``guidance_steps`` steps the latents are also moved down the gradient of the paper's attention-mass loss
(``(1 - IoU)^2`` per subject, cross- and self-attention), which needs gradients through the model: built for
UNet pipelines, SD1.5-style and SDXL (the paper's two models). On SD3 and Flux the masks (and refinement) run
alone.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..api import apply
from ..methods.bounded import _COLLECTOR, _REFINER, BoundedAttention, Box, LossCollector, MaskRefiner, _check_box
from ..runtime import denoising_step
from .callbacks import chain_step_end, refuse_owned
from .erase import unet_conditioning
from .tokens import find_tokens, text_tokenizer

__all__ = ["layout", "layout_method", "FILTER_WORDS"]

logger = logging.getLogger(__name__)

#: Words hidden from every pixel (the paper filters determiners, conjunctions, numbers, prepositions and spatial
#: words by part-of-speech tags; these are the ones such prompts hold).
FILTER_WORDS = frozenset(
    {
        "a",
        "an",
        "the",
        "and",
        "or",
        "of",
        "on",
        "in",
        "at",
        "with",
        "to",
        "next",
        "near",
        "above",
        "below",
        "behind",
        "left",
        "right",
        "top",
        "bottom",
        "centre",
        "center",
        "middle",
        "one",
        "two",
        "three",
        "four",
        "five",
    }
)


def _word_tokens(tokenizer: Any, ids: list[int], word: str, prompt: str) -> tuple[int, ...]:
    found = find_tokens(tokenizer, ids, word)
    if found is not None:
        return found
    raise ValueError(
        f"layout: subject word {word!r} is not in the prompt {prompt!r}; name each subject by a word "
        "of the prompt (e.g. ('circle', box) for 'a red circle ...')"
    )


def layout_method(
    pipe: Any,
    prompt: str,
    subjects: Sequence[tuple[str, Box]],
    *,
    filter_words: frozenset[str] | Sequence[str] = FILTER_WORDS,
    **options: Any,
) -> BoundedAttention:
    """The :class:`~diffattn.BoundedAttention` for ``prompt`` with ``subjects`` ((word, box), ...): the words' token
    indices, the ``filter_words``' (hidden from every pixel; ``()`` hides none) and the EOS index found with the
    pipeline's tokenizer; ``options`` go to the method (``mask_eos``, ``mask_cross``, ``mask_self``, ...)."""
    if not subjects:
        raise ValueError("layout: give at least one (word, box) subject, box = (x0, y0, x1, y1) in [0, 1]")
    tokenizer = text_tokenizer(pipe)
    ids = tokenizer(prompt).input_ids
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and len(ids) > limit:
        raise ValueError(f"layout: the prompt has {len(ids)} tokens, more than the tokenizer's {limit}; shorten it")
    groups, boxes = [], []
    for word, box in subjects:
        groups.append(_word_tokens(tokenizer, ids, word, prompt))
        boxes.append(_check_box(box, "layout"))
    subject_ids = {t for g in groups for t in g}
    special = set(getattr(tokenizer, "all_special_ids", ()))
    filters: set[int] = set()
    for word in {w.strip(".,;:!?").lower() for w in prompt.split()} & {w.lower() for w in filter_words}:
        word_ids = tokenizer(word, add_special_tokens=False).input_ids
        filters.update(
            i
            for start in range(len(ids) - len(word_ids) + 1)
            if ids[start : start + len(word_ids)] == word_ids
            for i in range(start, start + len(word_ids))
        )
    filters = tuple(sorted(i for i in filters if i not in subject_ids and ids[i] not in special))
    eos = next((i for i, token in enumerate(ids) if token == tokenizer.eos_token_id and i > 0), len(ids) - 1)
    settings: dict[str, Any] = dict(filter_tokens=filters, eos_token=eos)
    settings.update(options)
    return BoundedAttention(boxes=tuple(boxes), subject_tokens=tuple(groups), **settings)


def _supports_guidance(pipe: Any) -> bool:
    from diffusers import UNet2DConditionModel

    unet = getattr(pipe, "unet", None)
    return (
        isinstance(unet, UNet2DConditionModel)
        and unet.config.addition_embed_type in (None, "text_time")
        and hasattr(pipe, "encode_prompt")
    )


def _num_inference_steps(pipe: Any, call_kwargs: dict[str, Any]) -> int:
    """The ``num_inference_steps`` of the call: the one given, else the pipeline's own default (SD: 50, SD3 and Flux:
    28)."""
    steps = call_kwargs.get("num_inference_steps")
    if steps is None:
        parameter = inspect.signature(type(pipe).__call__).parameters.get("num_inference_steps")
        steps = None if parameter is None else parameter.default
        if not isinstance(steps, int) or isinstance(steps, bool):
            raise ValueError(
                f"layout: {type(pipe).__name__} has no default num_inference_steps; pass num_inference_steps=..."
            )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"layout: num_inference_steps must be an int >= 1, got {steps!r}")
    return steps


#: What layout() sets in the pipeline call itself, and what to pass instead.
_OWNED = {
    "prompt": "give it as layout's prompt",
    "generator": "pass seed=",
    "output_type": "the result is a numpy image",
}


def _loop_length(pipe: Any, steps: int) -> int:
    """How many model calls the pipeline's loop makes for ``steps`` (the scheduler's timesteps: Heun 2n - 1)."""
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def _step_sizes(count: int, first: float, last: float) -> list[float]:
    return [first + (last - first) * i / max(count - 1, 1) for i in range(count)]


def layout(
    pipe: Any,
    prompt: str,
    subjects: Sequence[tuple[str, Box]],
    *,
    seed: int = 0,
    bounded: bool = True,
    guidance_steps: float | int | None = None,
    step_size: tuple[float, float] = (200.0, 50.0),
    iterations: int = 5,
    stop_loss: float = 0.2,
    cross_weight: float = 1.5,
    self_weight: float = 0.5,
    loss_layers: Sequence[str] | None = None,
    filter_words: frozenset[str] | Sequence[str] = FILTER_WORDS,
    refine: bool = True,
    refine_start: float = 0.3,
    refine_every: float = 0.1,
    refine_layers: Sequence[str] | None = None,
    method_options: dict[str, Any] | None = None,
    **call_kwargs: Any,
) -> np.ndarray:
    """One image of ``prompt`` with each subject ``(word, (x0, y0, x1, y1))`` bounded to its box (fractions of the
    image, origin top-left). ``bounded=False``: the plain prompt from the same noise (the baseline).

    ``guidance_steps``: steps (int) or fraction of the steps (float) with the latent update (default: 0.3 of the
    steps where the pipeline supports it, the paper's 15 of 50; 0 = masks only); ``step_size``: the update's step,
    linear from the first to the last guided step (the paper: 8 -> 2 on SD1.5; the default 200 -> 50 was chosen on
    the embedded model's development seeds, where 20 -> 5 barely moved the objects; scale it to your model);
    ``iterations``: gradient steps per guided step, stopping early once the per-subject loss is below ``stop_loss``;
    ``loss_layers``: attention layer names whose maps make the loss (default: the decoder's layers of the two finest
    grids); ``filter_words``: words hidden from every pixel (the paper's rule: determiners, conjunctions, prepositions,
    spatial words; ``()`` keeps them, which a model that learnt its layout from position words needs, see the README's
    ShapesEdit numbers); ``method_options``: more
    :class:`~diffattn.BoundedAttention` fields; ``refine``: the paper's mask refinement by clustering self-attention
    (:class:`~diffattn.methods.bounded.MaskRefiner`) from ``refine_start`` (fraction of the steps; the paper: 15 of
    50) every ``refine_every`` (5 of 50), on ``refine_layers`` (default: the decoder level whose grid is nearest 16 x
    16 tokens, the paper's; transformers: the later half of the blocks). Other keyword arguments go to the
    pipeline call.
    Steps and fractions of them count the steps the call runs (the pipeline's own default step count when
    ``num_inference_steps`` is not given; Heun's 2n - 1 calls). A ``callback_on_step_end`` of the user's runs after
    layout's own (refinement, the next step's latent update) at every step, gets its outputs and returns what the
    pipeline takes. One image per call (``num_images_per_prompt`` 1).
    Returns the image as ``(H, W, 3)`` floats in [0, 1].
    """
    refuse_owned(call_kwargs, _OWNED, "layout")
    copies = call_kwargs.get("num_images_per_prompt")
    if copies not in (None, 1):
        raise ValueError(
            f"layout: num_images_per_prompt={copies!r} is not supported: layout makes one image per call; call it "
            "once per seed (seed=...) for several"
        )
    method = layout_method(pipe, prompt, subjects, filter_words=filter_words, **(method_options or {}))
    generator = torch.Generator().manual_seed(seed)
    if not bounded:
        return np.asarray(pipe(prompt=prompt, generator=generator, output_type="np", **call_kwargs).images[0])
    steps = _num_inference_steps(pipe, call_kwargs)
    supported = _supports_guidance(pipe)
    if guidance_steps is None:
        guidance_steps = 0.3 if supported else 0
        if not supported:
            logger.warning(
                "layout: the latent update runs on UNet pipelines (SD1.5, SDXL) only; %s gets the "
                "bounded-attention masks alone",
                type(pipe).__name__,
            )
    loop = _loop_length(pipe, steps) if supported else steps  # the steps the call runs (Heun: 2n - 1)
    guided = guidance_steps if isinstance(guidance_steps, int) else math.ceil(float(guidance_steps) * loop)
    if guided < 0 or guided > loop:
        raise ValueError(f"layout: guidance_steps must be within the {loop} steps, got {guidance_steps!r}")
    if guided and not supported:
        raise ValueError(
            f"layout: the latent update (guidance_steps={guidance_steps}) needs a UNet pipeline (SD1.5, "
            f"SDXL); {type(pipe).__name__} is not one: pass guidance_steps=0 for the masks alone"
        )
    given = [name for name in ("latents", "timesteps", "sigmas") if call_kwargs.get(name) is not None]
    if guided and given:
        raise ValueError(
            f"layout: the latent update starts from the seed's noise (seed=...) on the scheduler's timesteps for "
            f"num_inference_steps; pass {', '.join(given)} with guidance_steps=0 only"
        )
    refiner = None
    if refine:

        def refine_steps(num_steps: int) -> range:  # of the steps the running call makes
            every = max(1, round(refine_every * num_steps))
            return range(math.ceil(refine_start * num_steps - 1e-9), num_steps, every)

        layers = tuple(refine_layers) if refine_layers is not None else _default_refine_layers(pipe, call_kwargs)
        refiner = MaskRefiner(method, layers, refine_steps, seed=seed)
    token = _REFINER.set(refiner)
    handle = None
    try:
        handle = apply(pipe, method)
        return _run(
            pipe,
            method,
            prompt,
            generator,
            guided,
            steps,
            _step_sizes(guided, *step_size),
            iterations,
            stop_loss,
            cross_weight,
            self_weight,
            loss_layers,
            refiner,
            call_kwargs,
        )
    finally:
        _REFINER.reset(token)
        if handle is not None:
            handle.remove()


def _default_loss_layers(unet: torch.nn.Module) -> tuple[str, ...]:
    from ..api import attention_modules

    names = [n for n, _ in attention_modules(unet) if n.startswith("up_blocks.")]
    levels = sorted({n.split(".")[1] for n in names}, key=int)
    finest = set(levels[-2:])
    return tuple(n for n in names if n.split(".")[1] in finest)


def _default_refine_layers(pipe: Any, call_kwargs: dict[str, Any]) -> tuple[str, ...]:
    from ..api import _denoisers, attention_modules
    from ..editing import _latent_grid

    models, _ = _denoisers(pipe)
    model = getattr(models[0], "_orig_mod", models[0])
    names = [n for n, _ in attention_modules(model)]
    if hasattr(pipe, "unet"):
        levels = len(pipe.unet.config.block_out_channels)
        side = _latent_grid(pipe, call_kwargs)[0]
        ups = sorted({int(n.split(".")[1]) for n in names if n.startswith("up_blocks.")})
        best = min(ups, key=lambda i: abs(math.log2(max(side / 2 ** (levels - 1 - i), 1)) - 4))
        return tuple(n for n in names if n.startswith(f"up_blocks.{best}."))
    blocks = sorted({n.split(".")[1] for n in names if n.startswith("transformer_blocks.")}, key=int)
    later = set(blocks[len(blocks) // 2 :])
    return tuple(n for n in names if n.startswith("transformer_blocks.") and n.split(".")[1] in later)


def _run(
    pipe: Any,
    method: BoundedAttention,
    prompt: str,
    generator: torch.Generator,
    guided: int,
    steps: int,
    sizes: list[float],
    iterations: int,
    stop_loss: float,
    cross_weight: float,
    self_weight: float,
    loss_layers: Sequence[str] | None,
    refiner: MaskRefiner | None,
    call_kwargs: dict[str, Any],
) -> np.ndarray:
    """The pipeline call: guided steps (latent update) before steps 0 .. guided - 1, mask refinement after its
    steps."""
    if not guided:

        def refine_only(_pipe: Any, i: int, _t: Any, outputs: dict[str, Any]) -> dict[str, Any]:
            if refiner is not None:
                refiner.refresh()
            return outputs

        call_kwargs.update(chain_step_end(call_kwargs, refine_only))
        out = pipe(prompt=prompt, generator=generator, output_type="np", **call_kwargs)
        return np.asarray(out.images[0])
    unet = pipe.unet
    layers = tuple(loss_layers) if loss_layers is not None else _default_loss_layers(unet)
    height = call_kwargs.get("height") or unet.config.sample_size * pipe.vae_scale_factor
    width = call_kwargs.get("width") or unet.config.sample_size * pipe.vae_scale_factor
    shape = (1, unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    noise = torch.randn(shape, generator=generator, dtype=unet.dtype)
    conditioning = unet_conditioning(pipe, prompt, 1, (height, width), unet.device)
    pipe.scheduler.set_timesteps(steps)
    timesteps = pipe.scheduler.timesteps.clone()
    loop = len(timesteps)
    sigma = float(pipe.scheduler.init_noise_sigma)

    @torch.enable_grad()  # the callback runs inside the pipeline's no_grad
    def guide(latents: torch.Tensor, index: int) -> torch.Tensor:
        collector = LossCollector(layers)
        current = latents.detach().clone().requires_grad_(True)
        t = timesteps[index]
        for _ in range(iterations):
            collector.cross.clear()
            collector.self_.clear()
            token = _COLLECTOR.set(collector)
            try:
                with denoising_step(index, loop, timestep=float(t), batch_roles=("cond",)):
                    unet(current, t, **conditioning)
            finally:
                _COLLECTOR.reset(token)
            loss, per_subject = collector.loss(len(method.boxes), cross_weight, self_weight)
            logger.debug("layout: step %d loss %.4f", index, per_subject)
            if per_subject < stop_loss:
                break
            (grad,) = torch.autograd.grad(loss, [current])
            current = (current - sizes[index] * grad).detach().requires_grad_(True)
        return current.detach()

    def on_step_end(_pipe: Any, i: int, _t: Any, outputs: dict[str, Any]) -> dict[str, Any]:
        if refiner is not None:
            refiner.refresh()
        if i + 1 < guided:
            outputs["latents"] = guide(outputs["latents"], i + 1)
        return outputs

    latents = guide(noise * sigma, 0) / sigma
    call_kwargs.update(chain_step_end(call_kwargs, on_step_end))
    out = pipe(prompt=prompt, latents=latents, output_type="np", **call_kwargs)
    return np.asarray(out.images[0])
