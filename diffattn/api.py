"""Public entry points: ``apply`` a method to a pipeline or model, get a handle, ``remove`` it again."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from . import parallel
from .adapters import adapter_for
from .errors import LayerSelectionError, UnsupportedModelError
from .methods.base import AttentionMethod
from .processor import DiffattnProcessor, unwrap_processor
from .runtime import CallRecord, RunState, install_hook, remove_hook
from .schedule import LayerSpec, StepSchedule, StepSpec, select_layers

__all__ = ["apply", "remove", "Handle", "attention_modules"]

logger = logging.getLogger(__name__)

_DENOISER_ATTRIBUTES = ("unet", "transformer", "transformer_2")
_HANDLE_ATTRIBUTE = "_diffattn_handle"


def attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every diffusers attention module of ``model`` (anything with a settable processor), in model order."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if name and hasattr(module, "processor") and callable(getattr(module, "set_processor", None))
    ]


@dataclass
class _Installed:
    model: torch.nn.Module
    run: RunState
    originals: dict[str, Any]
    processors: dict[str, Any]


@dataclass
class Handle:
    """A live application of a method. ``remove()`` restores the exact original processor objects."""

    method: AttentionMethod
    _installed: list[_Installed] = field(default_factory=list)
    _removed: bool = False

    @property
    def models(self) -> list[torch.nn.Module]:
        return [i.model for i in self._installed]

    @property
    def layers(self) -> list[str]:
        """Names of the attention modules the method acts on."""
        return [name for i in self._installed for name in i.originals]

    @property
    def processors(self) -> dict[str, Any]:
        """``{"<module>.processor": processor}`` for every attention module, for ``model.set_attn_processor``."""
        if len(self._installed) != 1:
            raise ValueError("this handle covers several denoisers; use handle.processors_for(model)")
        return self.processors_for(self._installed[0].model)

    def processors_for(self, model: torch.nn.Module) -> dict[str, Any]:
        for installed in self._installed:
            if installed.model is model:
                return dict(installed.processors)
        raise ValueError(f"{type(model).__name__} is not covered by this handle")

    @property
    def calls(self) -> list[CallRecord]:
        """Every processor call since apply (or ``clear_records``), in order."""
        return [c for i in self._installed for c in i.run.calls]

    def acted(self) -> set[tuple[int, str]]:
        """The (step, layer) pairs on which the method replaced the attention core."""
        return {(c.step, c.layer) for c in self.calls if c.acted}

    def metrics(self) -> dict[str, dict[str, float]]:
        """Per layer, the mean of what the method reported while acting (e.g. ``density``: the fraction of query-key
        pairs the kernel computed)."""
        return {
            layer: {name: sum(values) / len(values) for name, values in per_layer.items()}
            for i in self._installed
            for layer, per_layer in i.run.metrics.items()
        }

    def clear_records(self) -> None:
        for installed in self._installed:
            installed.run.clear_records()

    def reset(self) -> None:
        """Start the step count afresh (a new generation is also detected on its own)."""
        for installed in self._installed:
            installed.run.reset()

    def remove(self) -> None:
        """Restore the original processors and remove the hooks. Calling it again does nothing."""
        if self._removed:
            return
        for installed in self._installed:
            modules = dict(attention_modules(installed.model))
            for name, original in installed.originals.items():
                modules[name].set_processor(original)
            remove_hook(installed.model)
            if getattr(installed.model, _HANDLE_ATTRIBUTE, None) is self:
                delattr(installed.model, _HANDLE_ATTRIBUTE)
        self._removed = True

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _denoisers(target: Any) -> tuple[list[torch.nn.Module], Any]:
    if isinstance(target, torch.nn.Module):
        return [target], None
    found = [getattr(target, a) for a in _DENOISER_ATTRIBUTES if isinstance(getattr(target, a, None), torch.nn.Module)]
    if not found:
        raise UnsupportedModelError(
            f"{type(target).__name__} is neither a diffusers model nor a pipeline with a unet/transformer; pass the "
            "pipeline (e.g. StableDiffusionPipeline) or its denoiser (pipe.unet / pipe.transformer)"
        )
    return found, target


def apply(
    target: Any,
    method: AttentionMethod,
    *,
    layers: LayerSpec = None,
    steps: StepSpec = None,
    num_steps: int | None = None,
) -> Handle:
    """Run ``method`` in place of the attention core of a pipeline's denoiser (or of a model).

    ``layers``: regexes over attention-module names, matched on whole dot-separated parts (``blocks.1`` never
    selects ``blocks.10``); ``None`` selects every module whose role (self / cross / joint) the method acts on.
    ``steps``: ``None`` (all), step indices, a ``range``, or a float fraction of the schedule kept dense first.
    ``num_steps``: the schedule length, needed for a fraction when ``target`` is a model rather than a pipeline.
    Applying again replaces the previous application; ``remove`` restores the original processors.
    """
    if not isinstance(method, AttentionMethod):
        raise TypeError(f"method must be a diffattn method (e.g. diffattn.Dense()), got {type(method).__name__}")
    schedule = StepSchedule.parse(steps)
    models, pipeline = _denoisers(target)
    if schedule.needs_num_steps and pipeline is None and num_steps is None:
        raise LayerSelectionError(
            "steps was given as a fraction of the schedule; apply to the pipeline, or pass num_steps= with a model"
        )
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
            parallel.processor_ulysses(unwrap_processor(module.processor), model, name, getattr(module, "heads", None))
        plans.append((model, adapter, by_name, rules, chosen))

    handle = Handle(method)
    for model, adapter, modules, rules, chosen in plans:
        previous = getattr(model, _HANDLE_ATTRIBUTE, None)
        if previous is not None:
            previous.remove()
        run = RunState(model, adapter, method, schedule, pipeline=pipeline, num_steps=num_steps)
        originals = {name: modules[name].processor for name in chosen}
        wrappers = {
            name: DiffattnProcessor(
                originals[name], layer=name, role=rules[name].role, text_first=rules[name].text_first, run=run
            )
            for name in chosen
        }
        for name, wrapper in wrappers.items():
            modules[name].set_processor(wrapper)
        install_hook(model, run)
        processors = {f"{name}.processor": wrappers.get(name, module.processor) for name, module in modules.items()}
        handle._installed.append(_Installed(model, run, originals, processors))
        setattr(model, _HANDLE_ATTRIBUTE, handle)
        logger.info("diffattn: %s on %d attention layers of %s", method.name, len(chosen), type(model).__name__)
    return handle


def remove(target: Any) -> None:
    """Undo ``apply``: pass the handle, the pipeline or the model. Nothing applied means nothing to do."""
    if isinstance(target, Handle):
        target.remove()
        return
    models, _ = _denoisers(target)
    for model in models:
        handle = getattr(model, _HANDLE_ATTRIBUTE, None)
        if handle is not None:
            handle.remove()
