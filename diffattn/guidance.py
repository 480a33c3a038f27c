"""Perturbed-attention guidance (PAG, SoftPAG, SEG) on the standard diffusers pipelines, with no PAG pipeline class.

    handle = diffattn.guidance.enable(pipe, PAG(scale=3.0))          # family-default layers
    image = pipe(prompt, guidance_scale=7.5).images[0]               # uncond + g (cond - uncond) + s (cond - ptb)
    handle.remove()

How it works. The method (an attention method acting on the ``"perturbed"`` batch entries only) is installed on the
chosen self-/joint-attention layers like any application (outermost in the stack, see :mod:`diffattn.runtime`). Its
model hook then, on every guided step, appends a
copy of the conditional entries to every batched input of the denoiser (latents, timesteps, text embeddings,
``added_cond_kwargs``, pooled projections, guidance, masks, … — any tensor whose first dimension is the batch),
runs the model once, and returns the pipeline's own batch with both the conditional and the unconditional
predictions shifted by ``s_t * (cond - perturbed)``. Whatever affine guidance the pipeline then applies with weights
summing to one, e.g. ``uncond + g * (cond - uncond)``, the shift passes through unchanged, so the result is

    uncond + g (cond - uncond) + s_t (cond - perturbed)    (with CFG; ``cond + s_t (cond - perturbed)`` without)

for any g, including Flux's ``true_cfg_scale`` and Wan 2.2's ``guidance_scale_2``, which the model never sees.
Pipelines that batch [uncond, cond] (SD, SDXL, SD3) get [uncond, cond, perturbed] in one forward. Pipelines that run
cond and uncond as separate calls (Flux, Wan; told apart by ``transformer.cache_context``) get [cond, perturbed] in
the conditional call, and the unconditional call gets the same shift. ``s_t = max(0, s - a (1000 - t))`` with t on the
1000-step scale (diffusers' ``pag_adaptive_scale``); at ``s_t = 0`` the extra entries are not run at all, so
``scale=0`` is bitwise the base pipeline.

Default layers (``layers=None``), as anchored patterns (``blocks.1`` never matches ``blocks.10``):

==================  =====================================  ==================================================
family              default                                why
==================  =====================================  ==================================================
UNets (SD 1.5, ...) ``mid_block`` (its self-attention)     diffusers' PAG default ``"mid"``, the PAG paper's SD
SD3 / SD3.5         ``transformer_blocks.1.attn``          diffusers' SD3 PAG default ``"blocks.1"`` as meant
Flux                ``transformer_blocks.{n//2}.attn``     a middle double-stream block (untuned)
Wan 2.x             ``blocks.{n//2}.attn1``                a middle block's self-attention (untuned)
other families      the middle eligible attention layer    (untuned)
==================  =====================================  ==================================================

(n = number of blocks of that kind.) Cross-attention is never perturbed; every pattern must select at least one
self-/joint-attention layer.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .adapters import adapter_for, model_inputs
from .api import Handle, _denoisers, attach, attention_modules
from .api import remove as _remove
from .errors import InterceptionError, LayerSelectionError, LayoutError
from .methods.pag import PAG, SoftPAG
from .methods.perturbed import PERTURBED, PerturbedAttention
from .methods.seg import SEG
from .runtime import Application, CallState
from .schedule import select_layers

__all__ = [
    "enable",
    "disable",
    "default_layers",
    "GuidanceHandle",
    "GuidanceRecord",
    "PAG",
    "SoftPAG",
    "SEG",
    "PerturbedAttention",
]

logger = logging.getLogger(__name__)

# Batched-looking inputs that are not batched (Flux's 2-D position ids).
_UNBATCHED_INPUTS = frozenset({"img_ids", "txt_ids"})


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------
def _eligible(model: torch.nn.Module, method: PerturbedAttention) -> list[str]:
    adapter = adapter_for(model)
    names = []
    for name, _ in attention_modules(model):
        rule = adapter.rule_for(name)
        if rule is not None and rule.role in method.roles:
            names.append(name)
    return names


def _middle(names: list[str], regex: str) -> str | None:
    """Of the names fully matching ``regex`` (one group: the block index), the one of the middle block."""
    found = sorted({int(m.group(1)) for n in names if (m := re.fullmatch(regex, n))})
    return None if not found else regex.replace(r"(\d+)", str(found[len(found) // 2]))


def default_layers(model: torch.nn.Module, method: PerturbedAttention | None = None) -> tuple[str, ...]:
    """The family-default guidance layers of ``model`` as anchored patterns (see the module docstring)."""
    method = method or PAG()
    family = adapter_for(model).family
    names = _eligible(model, method)
    if not names:
        raise LayerSelectionError(f"{type(model).__name__} has no self-/joint-attention layer to perturb")
    pattern = None
    if any(n.startswith("mid_block.") for n in names):  # every UNet-like model: its middle block
        pattern = "mid_block"
    elif family == "sd3":
        pattern = r"transformer_blocks\.1\.attn" if r"transformer_blocks.1.attn" in names else None
    elif family == "flux":
        pattern = _middle(names, r"transformer_blocks\.(\d+)\.attn")
    elif family == "wan":
        pattern = _middle(names, r"blocks\.(\d+)\.attn1")
    if pattern is None:
        pattern = "^" + re.escape(names[len(names) // 2]) + "$"
    return (pattern,)


def _check_layers(model: torch.nn.Module, method: PerturbedAttention, layers: tuple[str, ...] | str) -> list[str]:
    """Every pattern must select a self-/joint-attention layer (matching only cross-attention is an error)."""
    eligible = _eligible(model, method)
    all_names = [n for n, _ in attention_modules(model)]
    chosen: set[str] = set()
    for pattern in [layers] if isinstance(layers, str) else layers:
        try:
            chosen.update(select_layers([pattern], eligible))
        except LayerSelectionError:
            try:
                matched = select_layers([pattern], all_names)
            except LayerSelectionError:
                matched = []
            what = (
                f"matches only {', '.join(matched[:4])}{' …' if len(matched) > 4 else ''}, which guidance never "
                "perturbs (cross-attention)"
                if matched
                else "matches no attention layer"
            )
            raise LayerSelectionError(
                f"{method.name}: layers pattern {pattern!r} {what}. Patterns match whole dot-separated parts of "
                f"module names; perturbable layers of {type(model).__name__}: {', '.join(eligible[:8])}"
                f"{' …' if len(eligible) > 8 else ''}"
            ) from None
    return [n for n in eligible if n in chosen]


# ----------------------------------------------------------------------------------------------------------------
# The batch extension
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GuidanceRecord:
    """One guided model call: step, timestep (1000-step scale), scale s_t and max |cond - perturbed|."""

    step: int | None
    timestep: float
    scale: float
    delta: float


RECENT_RECORDS = 4096  # guidance records kept (the oldest are dropped)


@dataclass
class _Pending:
    batch: int
    cond: Tensor
    uncond: Tensor | None
    scale: float


def _per_entry(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Tensor) for v in value)


def _grow(value: Any, batch: int, index: Tensor) -> Any:
    """``value`` with the entries ``index`` appended along the batch dimension, recursively through containers."""
    if isinstance(value, Tensor):
        if value.ndim >= 1 and value.shape[0] == batch:
            return torch.cat([value, value.index_select(0, index.to(value.device))])
        return value
    if isinstance(value, dict):
        return {k: _grow(v, batch, index) for k, v in value.items()}
    if isinstance(value, list):
        return [_grow(v, batch, index) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_grow(v, batch, index) for v in value)
    return value


def _prediction(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    if isinstance(output, (tuple, list)) and output and _per_entry(output[0]):
        return torch.stack(output[0])  # one prediction per entry (Z-Image)
    sample = getattr(output, "sample", None)
    if isinstance(sample, Tensor):
        return sample
    if _per_entry(sample):
        return torch.stack(sample)
    raise InterceptionError(f"guidance cannot find the prediction in the model output {type(output).__name__}")


def _with_prediction(output: Any, prediction: Tensor, batch: int, extended: int) -> Any:
    def trim(x: Any) -> Any:
        return x[:batch] if isinstance(x, Tensor) and x.ndim >= 1 and x.shape[0] == extended else x

    if isinstance(output, Tensor):
        return prediction
    if isinstance(output, (tuple, list)):
        first = list(prediction.unbind(0)) if _per_entry(output[0]) else prediction
        return type(output)([first, *(trim(x) for x in output[1:])])
    sample = list(prediction.unbind(0)) if _per_entry(output.sample) else prediction
    return dataclasses.replace(output, sample=sample)


class _GuidanceBatch:
    """The denoiser hook's batch extension: appends perturbed copies of the conditional entries, combines outputs."""

    def __init__(self, application: Application, method: PerturbedAttention) -> None:
        self.application = application
        self.method = method
        self.records: list[GuidanceRecord] = []
        # for the unconditional call of separate-call CFG, which the same thread's pipeline loop makes next: per
        # thread, so two pipelines sharing the denoiser in two threads never read each other's shift
        self._local = threading.local()

    def active(self, call_state: CallState) -> bool:
        """The method acts only in forwards whose batch this extension extended."""
        return self.application.id in call_state.extension_data

    def _scale_now(self, call_state: CallState) -> float:
        if not self.method.perturbs or not self.application.on_schedule(call_state):
            return 0.0
        return self.method.scale_at(float(call_state.timestep_1000))

    @staticmethod
    def _key(call_state: CallState) -> tuple:
        return (call_state.step, call_state.timestep)

    def pre_forward(
        self, call_state: CallState, module: torch.nn.Module, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict]:
        roles = call_state.batch_roles
        if roles and set(roles) == {"uncond"}:
            return args, kwargs  # the conditional call of this step already ran the perturbed entries
        self._local.shift = None
        scale = self._scale_now(call_state)
        if scale == 0.0:
            return args, kwargs
        if roles is None:
            raise LayoutError(
                f"{self.method.name} guidance: cannot tell which batch entries of this {type(module).__name__} call "
                "are conditional. Call it through a standard pipeline, or inside model.cache_context('cond') for a "
                "batch of conditional entries only."
            )
        cond = [i for i, r in enumerate(roles) if r == "cond"]
        uncond = [i for i, r in enumerate(roles) if r == "uncond"]
        if not cond or len(cond) + len(uncond) != len(roles) or (uncond and len(uncond) != len(cond)):
            raise LayoutError(f"{self.method.name} guidance: unsupported batch roles {roles}")
        index = torch.tensor(cond)
        batch = len(roles)
        args = tuple(_grow(a, batch, index) for a in args)
        adapter = self.application.state.adapter
        if adapter.listed_inputs:  # per-entry lists (Z-Image), passed by position too: every input by name
            args, kwargs = (), model_inputs(module, args, kwargs)
            for name in adapter.listed_inputs & {k for k, v in kwargs.items() if _per_entry(v)}:
                kwargs[name] = kwargs[name] + [kwargs[name][i] for i in cond]
        unbatched = _UNBATCHED_INPUTS | adapter.unbatched_inputs | adapter.listed_inputs
        folded = {k for k in adapter.frame_folded_inputs if k in kwargs}
        kwargs = {k: v if k in unbatched | folded else _grow(v, batch, index) for k, v in kwargs.items()}
        if folded:  # inputs with one entry per (video, frame): the appended videos' frames, in order
            frames = call_state.grid[0]
            per_frame = torch.tensor([i * frames + f for i in cond for f in range(frames)])
            kwargs.update({k: _grow(kwargs[k], batch * frames, per_frame) for k in folded})
        call_state.extend_batch((PERTURBED,) * len(cond), cond)
        call_state.extension_data[self.application.id] = _Pending(
            batch, index, torch.tensor(uncond) if uncond else None, scale
        )
        return args, kwargs

    def post_forward(self, call_state: CallState, module: torch.nn.Module, output: Any) -> Any:
        pending = call_state.extension_data.pop(self.application.id, None)
        if pending is None:
            roles = call_state.batch_roles
            if roles and set(roles) == {"uncond"}:
                return self._unconditional(call_state, output)
            return output
        prediction = _prediction(output)
        extended = pending.batch + pending.cond.numel()
        if prediction.shape[0] != extended:
            raise InterceptionError(
                f"guidance appended {pending.cond.numel()} perturbed entries to a batch of {pending.batch}, but "
                f"{type(module).__name__} returned a batch of {prediction.shape[0]}"
            )
        if not call_state.acted.get(self.application.id):
            raise InterceptionError(
                f"{self.method.name} guidance ran perturbed batch entries but no perturbed-attention layer acted in "
                f"this call of {type(module).__name__}: does its processor compute attention with SDPA?"
            )
        base, perturbed = prediction[: pending.batch], prediction[pending.batch :]
        cond = pending.cond.to(base.device)
        delta = base.index_select(0, cond) - perturbed
        shift = pending.scale * delta
        out = base.clone()
        out[cond] = base.index_select(0, cond) + shift
        if pending.uncond is not None:
            uncond = pending.uncond.to(base.device)
            out[uncond] = base.index_select(0, uncond) + shift
        else:
            self._local.shift = (self._key(call_state), shift)
        self.records.append(
            GuidanceRecord(
                call_state.step, float(call_state.timestep_1000), pending.scale, float(delta.detach().abs().max())
            )
        )
        del self.records[:-RECENT_RECORDS]
        return _with_prediction(output, out, pending.batch, extended)

    def _unconditional(self, call_state: CallState, output: Any) -> Any:
        shift, self._local.shift = getattr(self._local, "shift", None), None
        if shift is None or shift[0] != self._key(call_state):
            if self._scale_now(call_state) > 0:
                raise InterceptionError(
                    f"{self.method.name} guidance: the pipeline ran its unconditional call before the conditional "
                    "one at this step; guidance with separate CFG calls needs the conditional call first"
                )
            return output
        prediction = _prediction(output)
        if prediction.shape != shift[1].shape:
            raise InterceptionError(
                f"guidance: the unconditional call returned {tuple(prediction.shape)}, the conditional one "
                f"{tuple(shift[1].shape)}; their batches must match"
            )
        return _with_prediction(output, prediction + shift[1], prediction.shape[0], -1)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class GuidanceHandle:
    """A live guidance application. ``remove()`` removes its hooks (other diffattn applications stay)."""

    method: PerturbedAttention
    attention: Handle
    _batches: list[_GuidanceBatch] = field(default_factory=list)

    @property
    def layers(self) -> list[str]:
        """Names of the perturbed attention modules."""
        return self.attention.layers

    @property
    def records(self) -> list[GuidanceRecord]:
        """The most recent guided model calls (bounded), in order."""
        return [r for b in self._batches for r in b.records]

    def clear_records(self) -> None:
        for batch in self._batches:
            batch.records.clear()
        self.attention.clear_records()

    def remove(self) -> None:
        """Remove the guidance hooks. Calling it again does nothing."""
        self.attention.remove()

    def __enter__(self) -> GuidanceHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def enable(target: Any, method: PerturbedAttention) -> GuidanceHandle:
    """Guide a standard diffusers pipeline (or its denoiser) with ``method`` (:class:`PAG`, :class:`SoftPAG`,
    :class:`SEG`): one extra batch entry per conditional entry, in the same forward, on every guided step.

    Works with the pipelines' own ``__call__`` (StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux, Wan, …);
    ``guidance_scale`` keeps its meaning. Guidance stacks with other diffattn applications (it runs outermost); one
    guidance method per model.
    A bare model is guided when called inside ``model.cache_context("cond")`` (a batch of conditional entries).
    """
    if not isinstance(method, PerturbedAttention):
        raise TypeError(
            f"guidance.enable takes PAG, SoftPAG or SEG (a PerturbedAttention), got {type(method).__name__}; use "
            "diffattn.apply for other attention methods"
        )
    models, _ = _denoisers(target)
    layers = method.layers if method.layers is not None else default_layers(models[0], method)
    for model in models:
        chosen = _check_layers(model, method, layers)
        logger.info("diffattn guidance: %s on %s of %s", method.name, ", ".join(chosen), type(model).__name__)
    attention = attach(
        target,
        method,
        layers=layers,
        steps=method.steps,
        extension=lambda application: _GuidanceBatch(application, method),
    )
    return GuidanceHandle(method, attention, [a.extension for a in attention.applications])


def disable(target: Any) -> None:
    """Remove guidance (or any diffattn method) from a pipeline, a model or a handle."""
    if isinstance(target, GuidanceHandle):
        target.remove()
    else:
        _remove(target)
