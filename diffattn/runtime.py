"""Per-application run state: the denoising step, the token grid and the batch roles, read from the model's own
forward inputs by a diffusers hook (never by patching a pipeline's ``__call__``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .adapters import FamilyAdapter, ModelInputs, model_inputs
from .errors import LayoutError
from .methods.base import AttentionMethod
from .schedule import StepSchedule

__all__ = ["CallRecord", "RunState", "StepHook", "HOOK_NAME"]

logger = logging.getLogger(__name__)

HOOK_NAME = "diffattn"


@dataclass(frozen=True)
class CallRecord:
    """One attention-processor call: at which step, on which layer, and whether the method acted."""

    step: int
    layer: str
    role: str
    acted: bool


def _timestep_value(timestep: Any, family: str) -> float:
    if timestep is None:
        raise LayoutError(f"{family}: the model was called without a timestep; diffattn derives the step from it")
    if isinstance(timestep, torch.Tensor):
        return float(timestep.detach().float().max())
    return float(timestep)


def _batch_size(inputs: ModelInputs) -> int | None:
    for key in ("sample", "hidden_states"):
        value = inputs.get(key)
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    return None


class RunState:
    """What the processors of one model share during a generation. Reset by a new generation."""

    def __init__(
        self,
        model: torch.nn.Module,
        adapter: FamilyAdapter,
        method: AttentionMethod,
        schedule: StepSchedule,
        *,
        pipeline: Any = None,
        num_steps: int | None = None,
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.method = method
        self.schedule = schedule
        self.pipeline = pipeline
        self.fixed_num_steps = num_steps
        self.calls: list[CallRecord] = []
        self.metrics: dict[str, dict[str, list[float]]] = {}
        self.reset()

    def reset(self) -> None:
        """Forget the step position (the next model call is step 0). Records are kept; see ``clear_records``."""
        self.step = -1
        self.grid: tuple[int, ...] | None = None
        self.batch_roles: tuple[str, ...] | None = None
        self.num_steps = self.fixed_num_steps
        self._last_t: float | None = None

    def clear_records(self) -> None:
        self.calls.clear()
        self.metrics.clear()

    # -- called by the hook before every model forward -------------------------------------------------------
    def begin_forward(self, inputs: ModelInputs, cache_name: str | None, cache_num_steps: int | None) -> None:
        t = _timestep_value(inputs.get("timestep"), self.adapter.model_class)
        if self._last_t is None or t > self._last_t:
            self.step = 0  # first call, or the noise level went back up: a new generation
        elif t < self._last_t:
            self.step += 1
        self._last_t = t
        self.grid = self.adapter.grid(self.model, inputs)
        self.num_steps = cache_num_steps or self._schedule_length() or self.fixed_num_steps
        self.batch_roles = self._batch_roles(_batch_size(inputs), cache_name)

    def _schedule_length(self) -> int | None:
        timesteps = getattr(getattr(self.pipeline, "scheduler", None), "timesteps", None)
        if isinstance(timesteps, torch.Tensor) and timesteps.numel():
            return int(torch.unique(timesteps).numel())
        return None

    def _batch_roles(self, batch: int | None, cache_name: str | None) -> tuple[str, ...] | None:
        if batch is None:
            return None
        if cache_name in ("cond", "uncond"):
            return (cache_name,) * batch
        if self.pipeline is None or not hasattr(type(self.pipeline), "do_classifier_free_guidance"):
            return None
        try:
            guided = bool(self.pipeline.do_classifier_free_guidance)
        except AttributeError:  # read outside a pipeline call
            return None
        if guided and self.adapter.cfg_in_batch and batch % 2 == 0:
            return ("uncond",) * (batch // 2) + ("cond",) * (batch // 2)
        return None if guided else ("cond",) * batch

    # -- called by the processors ------------------------------------------------------------------------------
    def acts_at(self, step: int) -> bool:
        if step < 0:
            raise LayoutError(
                "a diffattn processor ran before its model's forward hook: call the model or the pipeline, not an "
                "attention submodule directly"
            )
        return self.schedule.is_active(step, self.num_steps)

    def record(self, step: int, layer: str, role: str, *, acted: bool) -> None:
        self.calls.append(CallRecord(step, layer, role, acted))

    def report(self, layer: str, metrics: dict[str, float]) -> None:
        per_layer = self.metrics.setdefault(layer, {})
        for name, value in metrics.items():
            per_layer.setdefault(name, []).append(float(value))


class _NoState(BaseState):
    def reset(self, *args: Any, **kwargs: Any) -> None:
        pass


class StepHook(ModelHook):
    """Reads the timestep, the token grid and the pipeline's cache context (cond/uncond) before each forward."""

    _is_stateful = True

    def __init__(self, run: RunState) -> None:
        super().__init__()
        self.run = run
        self.cache_context = StateManager(_NoState)  # diffusers fills in the pipeline's cache_context(...) here

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        try:
            context = self.cache_context.context
        except ValueError:
            context = None
        self.run.begin_forward(
            model_inputs(module, args, kwargs),
            getattr(context, "name", None),
            getattr(context, "num_inference_steps", None),
        )
        return args, kwargs

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.run.reset()
        return module


def install_hook(model: torch.nn.Module, run: RunState) -> None:
    HookRegistry.check_if_exists_or_initialize(model).register_hook(StepHook(run), HOOK_NAME)


def remove_hook(model: torch.nn.Module) -> None:
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(HOOK_NAME) is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)
