"""Public entry points: ``apply`` a method to a pipeline or model, get a handle, ``remove`` it again."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import parallel
from .adapters import adapter_for
from .errors import DiffattnError, LayerSelectionError, UnsupportedModelError
from .methods.base import AttentionMethod
from .runtime import (
    Application,
    BatchExtension,
    CallRecord,
    Entry,
    LayerInfo,
    attach_entry,
    detach_application,
    drop_state_if_unused,
    existing_state,
    model_state,
)
from .runtime.conflicts import refuse_layer_skip
from .schedule import LayerSpec, StepSchedule, StepSpec, select_layers
from .tuning.profile import TunedProfile

__all__ = ["apply", "remove", "Handle", "attention_modules"]

logger = logging.getLogger(__name__)

_DENOISER_ATTRIBUTES = ("unet", "transformer", "transformer_2")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module itself under ``torch.compile(model)`` (an ``OptimizedModule`` calls it, hooks included)."""
    return getattr(model, "_orig_mod", model)


def attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every diffusers attention module of ``model`` (anything with a settable processor), in model order."""
    return [
        (name, module)
        for name, module in _unwrap(model).named_modules()
        if name and hasattr(module, "processor") and callable(getattr(module, "set_processor", None))
    ]


@dataclass
class Handle:
    """A live application of a method (on each denoiser of a pipeline). ``remove()`` removes exactly its hooks."""

    method: AttentionMethod
    applications: list[Application] = field(default_factory=list)
    _removed: bool = False

    @property
    def models(self) -> list[torch.nn.Module]:
        return [a.state.model for a in self.applications]

    @property
    def layers(self) -> list[str]:
        """Names of the attention modules the method acts on."""
        return [name for a in self.applications for name in a.layers]

    @property
    def calls(self) -> list[CallRecord]:
        """The most recent attention calls (bounded; see :data:`diffattn.runtime.RECENT_CALLS`), in order."""
        return [c for a in self.applications for c in a.records.calls]

    def acted(self) -> set[tuple[int | None, str]]:
        """The (step, layer) pairs on which the method replaced the attention core since apply/``clear_records``."""
        return {pair for a in self.applications for pair in a.records.acted}

    def acted_calls(self) -> dict[str, int]:
        """Per layer, how many attention calls the method acted on."""
        return {layer: n for a in self.applications for layer, n in a.records.acted_calls.items()}

    def metrics(self) -> dict[str, dict[str, float]]:
        """Per layer, the mean of what the method reported while acting (e.g. ``density``: the fraction of query-key
        pairs the kernel computed)."""
        return {layer: m for a in self.applications for layer, m in a.records.metrics().items()}

    def clear_records(self) -> None:
        for application in self.applications:
            application.records.clear()

    def remove(self) -> None:
        """Remove this application's hooks (other applications stay exact). Calling it again does nothing."""
        if self._removed:
            return
        for application in self.applications:
            modules = dict(attention_modules(application.state.model))
            for name in application.layers:
                detach_application(modules[name], application)
            if application in application.state.applications:
                application.state.applications.remove(application)
            drop_state_if_unused(application.state.model)
            application.method.release(application.id)
        self._removed = True

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _denoisers(target: Any) -> tuple[list[torch.nn.Module], Any]:
    if isinstance(target, torch.nn.Module):
        return [_unwrap(target)], None
    found = [
        _unwrap(getattr(target, a))
        for a in _DENOISER_ATTRIBUTES
        if isinstance(getattr(target, a, None), torch.nn.Module)
    ]
    if not found:
        raise UnsupportedModelError(
            f"{type(target).__name__} is neither a diffusers model nor a pipeline with a unet/transformer; pass the "
            "pipeline (e.g. StableDiffusionPipeline) or its denoiser (pipe.unet / pipe.transformer)"
        )
    return found, target


def apply(
    target: Any, method: AttentionMethod | TunedProfile, *, layers: LayerSpec = None, steps: StepSpec = None
) -> Handle:
    """Run ``method`` in place of the attention core of a pipeline's denoiser(s) (or of a model).

    ``layers``: regexes over attention-module names, matched on whole dot-separated parts (``blocks.1`` never
    selects ``blocks.10``); ``None`` selects every module whose role (self / cross / joint) the method acts on.
    ``steps``: ``None`` (all), an int or a ``range`` / list / tuple of ints (step indices), a float warm-up fraction
    (``0.0``: none), a tuple of two floats ``(start, stop)`` (fractions) or ``StepSchedule.timesteps(low, high)``;
    the exact rules are :class:`~diffattn.schedule.StepSchedule`'s. Steps count the pipeline call's loop (see
    :mod:`diffattn.runtime.position`). Applications stack: applying another method keeps this one (see
    :mod:`diffattn.runtime`).

    ``method`` may be a :class:`~diffattn.tuning.TunedProfile` (``diffattn.tune``): it acts on the layers it was tuned
    for (``layers=`` then narrows them), and is refused on another model class.
    """
    if isinstance(method, TunedProfile):
        models, _ = _denoisers(target)
        for model in models:
            method.check_model(model)
        chosen = method.layer_patterns() if layers is None else layers
        return attach(target, method.method(), layers=chosen, steps=steps)
    if not isinstance(method, AttentionMethod):
        raise TypeError(f"method must be a diffattn method (e.g. diffattn.Dense()), got {type(method).__name__}")
    if method.expands_batch:
        raise DiffattnError(
            f"{method.name} is guidance: it needs extra batch entries that only guidance adds. Use "
            f"diffattn.guidance.enable(pipe, {method.name}(...)) instead of diffattn.apply."
        )
    return attach(target, method, layers=layers, steps=steps)


def attach(
    target: Any,
    method: AttentionMethod,
    *,
    layers: LayerSpec = None,
    steps: StepSpec = None,
    extension: Callable[[Application], BatchExtension] | None = None,
    gate: Callable[[torch.nn.Module], Any] | None = None,
) -> Handle:
    """``apply`` without the guidance check; ``extension`` builds a batch extension per denoiser (guidance);
    ``gate(module)`` makes the object each entry acts behind (``diffattn.processors``: the processor to install)."""
    schedule = StepSchedule.parse(steps)
    models, _ = _denoisers(target)
    plans = []
    for model in models:
        adapter = adapter_for(model)
        modules = attention_modules(model)
        rules = {name: adapter.rule_for(name) for name, _ in modules}
        named = [name for name, _ in modules if rules[name] is not None]
        chosen = [n for n in select_layers(layers, named) if rules[n].role in method.roles]
        if not chosen:
            raise LayerSelectionError(
                f"{method.name} acts on {sorted(method.roles)} attention, but the selected layers of "
                f"{type(model).__name__} have roles {sorted({rules[n].role for n in select_layers(layers, named)})}"
            )
        by_name = dict(modules)
        for name in chosen:  # under context parallelism already: refuse ring mode or indivisible heads right away
            module = by_name[name]
            parallel.processor_ulysses(module.processor, model, name, getattr(module, "heads", None))
            refuse_layer_skip(module, name, [method.name])
        state = existing_state(model)
        if extension is not None and state is not None and any(a.extension for a in state.applications):
            raise DiffattnError(
                f"{type(model).__name__} already has guidance; one guidance method per model (remove the other "
                "handle first)"
            )
        plans.append((model, adapter, by_name, rules, chosen))

    handle = Handle(method)
    for model, adapter, modules, rules, chosen in plans:
        state = model_state(model, adapter)
        infos = {n: LayerInfo(n, rules[n].role, rules[n].text_first, rules[n].axes) for n in chosen}
        application = Application(state, method, schedule, infos)
        if extension is not None:
            application.extension = extension(application)
        for name, info in infos.items():
            attach_entry(modules[name], Entry(application, info, None if gate is None else gate(modules[name])))
        state.applications.append(application)
        handle.applications.append(application)
        logger.info("diffattn: %s on %d attention layers of %s", method.name, len(chosen), type(model).__name__)
    return handle


def remove(target: Any) -> None:
    """Undo ``apply``: pass the handle (removes that application), or the pipeline or model (removes all diffattn
    applications on it). Nothing applied means nothing to do."""
    if isinstance(target, Handle) or isinstance(getattr(target, "attention", None), Handle):  # or a GuidanceHandle
        target.remove()
        return
    models, _ = _denoisers(target)
    for model in models:
        state = existing_state(model)
        if state is None:
            continue
        for application in list(state.applications):
            Handle(application.method, [application]).remove()
