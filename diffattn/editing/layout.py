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
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np
import torch

from ..api import apply
from ..methods.bounded import _COLLECTOR, _REFINER, BoundedAttention, Box, LossCollector, MaskRefiner, _check_box
from ..runtime import denoising_step
from .callbacks import chain_step_end, refuse_owned
from .erase import unet_conditioning
from .tokens import find_tokens, text_tokenizer

__all__ = ["layout", "layout_method", "attach_modifiers", "authors_layers", "call_order", "FILTER_WORDS"]

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


_PUNCTUATION = ".,;:!?"


def attach_modifiers(prompt: str, phrases: Sequence[str]) -> list[str]:
    """Each subject phrase with the words just before it in ``prompt`` that modify it (``'circle'`` in ``'a big red
    circle'`` -> ``'big red circle'``): the run of words back to a grammar word of :data:`FILTER_WORDS` (always those,
    whatever the filter hides), another subject's words, punctuation or the prompt's start. A phrase not found as
    whole words is returned unchanged.

    Bounded attention shows a subject's tokens inside its box only and every other word to every pixel, so a colour
    word left out of its subject reaches every object (issue #28: 'red' and 'blue' both seen by the circle drew it
    blue). The authors' subject token indices hold the attribute words (their examples: 'ginger kitten', 'gray
    puppy')."""
    words = prompt.split()
    plain = [w.strip(_PUNCTUATION).lower() for w in words]
    spans: list[tuple[int, int] | None] = []
    for phrase in phrases:
        target = [w.strip(_PUNCTUATION).lower() for w in phrase.split()]
        found = next(
            (i for i in range(len(plain) - len(target) + 1) if target and plain[i : i + len(target)] == target), None
        )
        spans.append(None if found is None else (found, found + len(target)))
    claimed = {i for span in spans if span is not None for i in range(*span)}
    out = []
    for phrase, span in zip(phrases, spans):
        if span is None:
            out.append(phrase)
            continue
        start = span[0]
        while (
            start > 0
            and start - 1 not in claimed
            and plain[start - 1]
            and plain[start - 1] not in FILTER_WORDS
            and not words[start - 1].endswith(tuple(_PUNCTUATION))
        ):
            start -= 1
        out.append(" ".join(w.strip(_PUNCTUATION) for w in words[start : span[1]]) if start < span[0] else phrase)
    return out


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
    modifiers: bool = True,
    **options: Any,
) -> BoundedAttention:
    """The :class:`~diffattn.BoundedAttention` for ``prompt`` with ``subjects`` ((word, box), ...): the words' token
    indices, the ``filter_words``' (hidden from every pixel; ``()`` hides none) and the EOS index found with the
    pipeline's tokenizer; ``options`` go to the method (``mask_eos``, ``mask_cross``, ``mask_self``, ``faithful``,
    ...). ``modifiers``: each subject also takes the words just before it that modify it (:func:`attach_modifiers`:
    ``'circle'`` in ``'a red circle'`` is bound as ``'red circle'``); ``False`` binds the given words only."""
    if not subjects:
        raise ValueError("layout: give at least one (word, box) subject, box = (x0, y0, x1, y1) in [0, 1]")
    tokenizer = text_tokenizer(pipe)
    ids = tokenizer(prompt).input_ids
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and len(ids) > limit:
        raise ValueError(f"layout: the prompt has {len(ids)} tokens, more than the tokenizer's {limit}; shorten it")
    words = [word for word, _ in subjects]
    bound = attach_modifiers(prompt, words) if modifiers else words
    groups, boxes = [], []
    for word, phrase, (_, box) in zip(words, bound, subjects):
        found = find_tokens(tokenizer, ids, phrase) if phrase != word else None
        if phrase != word:
            logger.info("layout: subject %r is bound as %r (modifiers=False binds the word alone)", word, phrase)
        groups.append(found if found is not None else _word_tokens(tokenizer, ids, word, prompt))
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


def _step_sizes(count: int, first: float, last: float, *, faithful: bool = False) -> list[float]:
    """The latent update's step size at each guided step: linear from ``first`` to ``last`` over the ``count``
    steps (``faithful``: the authors' ``first + (last - first) i / count``, which stops one step short of ``last``)."""
    if faithful:
        return [first + (last - first) * i / count for i in range(count)]
    return [first + (last - first) * i / max(count - 1, 1) for i in range(count)]


def _descend(
    loss_of: Callable[[torch.Tensor], tuple[torch.Tensor, float]],
    latents: torch.Tensor,
    size: float,
    iterations: int,
    stop_loss: float,
    *,
    faithful: bool = False,
) -> torch.Tensor:
    """At most ``iterations`` gradient steps of ``loss_of`` (loss, per-subject value) from ``latents``. diffattn's
    rule: stop before stepping once the per-subject value is below ``stop_loss``. ``faithful`` (the authors'
    ``update_loss``): every computed loss is stepped on, and the loop stops before the next forward pass once the
    last value was below ``stop_loss`` (one step more than diffattn's)."""
    current = latents.detach().clone().requires_grad_(True)
    last = math.inf
    for _ in range(iterations):
        if faithful and last < stop_loss:
            break
        loss, last = loss_of(current)
        if not faithful and last < stop_loss:
            break
        (grad,) = torch.autograd.grad(loss, [current])
        current = (current - size * grad).detach().requires_grad_(True)
    return current.detach()


def _model_input(pipe: Any, steps: int, index: int, t: Any, latents: torch.Tensor) -> torch.Tensor:
    """``latents`` as the UNet takes them at loop step ``index`` (the scheduler's ``scale_model_input``: Euler
    divides by ``sqrt(sigma^2 + 1)``; DDIM, PNDM and DPM-Solver leave them), on a copy of the pipeline's scheduler
    so that its own step counter is untouched."""
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(index)
    return scheduler.scale_model_input(latents, t)


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
    modifiers: bool = True,
    faithful: bool = False,
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
    ShapesEdit numbers); ``modifiers``: each subject word also binds the words before it that modify it ('circle' in
    'a red circle' is bound as 'red circle', see :func:`attach_modifiers`; ``False``: the given words only);
    ``faithful``: the authors' rules where diffattn's differ (omer11a/bounded-attention, listed in
    ``docs/deviations.md``): :class:`~diffattn.BoundedAttention` ``faithful=True`` (EOS alone hidden, their box
    rounding, loss on the boxes), their step-size schedule and stopping rule, their layers (:func:`authors_layers`)
    where ``loss_layers`` / ``refine_layers`` are not given, and their refinement (``MaskRefiner(faithful=True)``:
    maps averaged from the first step, masks rebuilt before the first step from ``refine_start`` and then before
    every step that is a multiple of ``refine_every``); the step sizes and fractions stay the arguments';
    ``method_options``: more
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
    options = {"faithful": faithful, **(method_options or {})}
    method = layout_method(pipe, prompt, subjects, filter_words=filter_words, modifiers=modifiers, **options)
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

        def refine_steps(num_steps: int) -> Collection[int]:  # of the steps the running call makes
            every = max(1, round(refine_every * num_steps))
            first = math.ceil(refine_start * num_steps - 1e-9)
            if faithful:  # rebuilt before these steps: the first from refine_start, then the multiples of every
                return {s for s in range(first, num_steps) if s == first or s % every == 0}
            return range(first, num_steps, every)

        if refine_layers is not None:
            layers = tuple(refine_layers)
        elif faithful and _supports_guidance(pipe):
            layers = authors_layers(pipe.unet)[1]
        else:
            layers = _default_refine_layers(pipe, call_kwargs)
        refiner = MaskRefiner(method, layers, refine_steps, seed=seed, faithful=faithful)
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
            _step_sizes(guided, *step_size, faithful=faithful),
            iterations,
            stop_loss,
            cross_weight,
            self_weight,
            loss_layers,
            refiner,
            call_kwargs,
            faithful,
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


#: The authors' layers, counted as their editor counts them (every attention module in the order the UNet calls
#: them, self- and cross-attention each one; SD1.5 has 32, SDXL 140): ``run_sd.py`` loss 12-19 (the mid block and
#: ``up_blocks.1``), refinement 14-19 (``up_blocks.1``); ``run_xl.py`` 70-81 for both
#: (``up_blocks.0.attentions.0``, transformer blocks 1-6).
AUTHORS_LAYER_INDICES = {32: (range(12, 20), range(14, 20)), 140: (range(70, 82), range(70, 82))}


def call_order(unet: torch.nn.Module) -> list[str]:
    """The UNet's attention layer names in the order a forward pass calls them: the encoder, the mid block, the
    decoder (``named_modules`` lists the decoder before the mid block)."""
    from ..api import attention_modules

    names = [n for n, _ in attention_modules(unet)]
    rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(names, key=lambda n: rank.get(n.split(".")[0], 3))  # stable: model order within a part


def authors_layers(unet: torch.nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(loss layers, refinement layers) of the authors' scripts for a UNet with SD1.5's or SDXL's count of
    attention layers (:data:`AUTHORS_LAYER_INDICES`); any other UNet gets SD1.5's choice by position: the mid block
    and the first decoder level with attention for the loss, that decoder level for the refinement."""
    order = call_order(unet)
    if len(order) in AUTHORS_LAYER_INDICES:
        loss, refine = AUTHORS_LAYER_INDICES[len(order)]
        return tuple(order[i] for i in loss), tuple(order[i] for i in refine)
    ups = [n for n in order if n.startswith("up_blocks.")]
    if not ups:
        raise ValueError(
            "layout: faithful=True takes the authors' layers from the UNet's decoder, and this UNet has no "
            "attention in up_blocks; pass loss_layers=... and refine_layers=..."
        )
    first = ups[0].split(".")[1]
    level = tuple(n for n in ups if n.split(".")[1] == first)
    logger.info(
        "layout: faithful layers by SD1.5's positions (mid block + up_blocks.%s): this UNet has %d attention "
        "layers, not SD1.5's 32 or SDXL's 140",
        first,
        len(order),
    )
    return tuple(n for n in order if n.startswith("mid_block.")) + level, level


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
    faithful: bool = False,
) -> np.ndarray:
    """The pipeline call: guided steps (latent update) before steps 0 .. guided - 1, mask refinement after its
    steps."""
    if not guided:

        def refine_only(_pipe: Any, i: int, _t: Any, outputs: dict[str, Any]) -> dict[str, Any]:
            if refiner is not None:
                refiner.after_step(i)
            return outputs

        call_kwargs.update(chain_step_end(call_kwargs, refine_only))
        out = pipe(prompt=prompt, generator=generator, output_type="np", **call_kwargs)
        return np.asarray(out.images[0])
    unet = pipe.unet
    if loss_layers is not None:
        layers = tuple(loss_layers)
    else:
        layers = authors_layers(unet)[0] if faithful else _default_loss_layers(unet)
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
        t = timesteps[index]

        def loss_of(current: torch.Tensor) -> tuple[torch.Tensor, float]:
            collector = LossCollector(layers)
            token = _COLLECTOR.set(collector)
            try:
                with denoising_step(index, loop, timestep=float(t), batch_roles=("cond",)):
                    unet(_model_input(pipe, steps, index, t, current), t, **conditioning)
            finally:
                _COLLECTOR.reset(token)
            loss, per_subject = collector.loss(len(method.boxes), cross_weight, self_weight)
            logger.debug("layout: step %d loss %.4f", index, per_subject)
            return loss, per_subject

        return _descend(loss_of, latents, sizes[index], iterations, stop_loss, faithful=faithful)

    def on_step_end(_pipe: Any, i: int, _t: Any, outputs: dict[str, Any]) -> dict[str, Any]:
        if refiner is not None:
            refiner.after_step(i)
        if i + 1 < guided:
            outputs["latents"] = guide(outputs["latents"], i + 1)
        return outputs

    latents = guide(noise * sigma, 0) / sigma
    call_kwargs.update(chain_step_end(call_kwargs, on_step_end))
    out = pipe(prompt=prompt, latents=latents, output_type="np", **call_kwargs)
    return np.asarray(out.images[0])
