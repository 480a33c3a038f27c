"""Per-application run state: the denoising step, the token grid and the batch roles, read from the model's own
forward inputs by a diffusers hook (never by patching a pipeline's ``__call__``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from . import parallel
from .adapters import FamilyAdapter, ModelInputs, model_inputs
from .errors import LayoutError
from .methods.base import AttentionMethod
from .schedule import StepSchedule

__all__ = ["CallRecord", "RunState", "StepHook", "BatchExtension", "HOOK_NAME"]

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


class BatchExtension(Protocol):
    """Changes the batch of every model forward (e.g. guidance appends perturbed copies of the conditional entries).

    The hook calls ``pre_forward`` after the step, grid and batch roles of the incoming batch are known (it reports
    the roles of the entries it appends with :meth:`RunState.extend_batch`) and ``post_forward`` on the output.
    ``active``, set by ``pre_forward``, says whether the method acts in this forward (e.g. only on extended batches);
    when False every processor runs its stock attention, with the model's own backend.
    """

    active: bool

    def pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]: ...

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any: ...


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
        self.extension: BatchExtension | None = None
        self.validated: set[tuple] = set()  # (layer, q layout, kv layout) the method's parameters were checked on
        self.reset()

    def reset(self) -> None:
        """Forget the step position (the next model call is step 0). Records are kept; see ``clear_records``."""
        self.step = -1
        self.timestep: float | None = None
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
        self.timestep = t
        self.grid = self.adapter.grid(self.model, inputs)
        ulysses = parallel.model_ulysses(self.model)  # refuses ring attention before anything is split or sent
        if ulysses is not None:
            parallel.check_sequence_split(self.model, inputs, self.grid, ulysses)
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

    def extend_batch(self, roles: tuple[str, ...]) -> None:
        """Entries with ``roles`` were appended to this forward's batch (after the pipeline's own entries)."""
        if self.batch_roles is None:
            raise LayoutError(
                "entries were appended to a batch whose roles are unknown; call the model through a standard "
                "pipeline or inside model.cache_context('cond')"
            )
        self.batch_roles = self.batch_roles + tuple(roles)

    # -- called by the processors ------------------------------------------------------------------------------
    def acts_at(self, step: int) -> bool:
        if step < 0:
            raise LayoutError(
                "a diffattn processor ran before its model's forward hook: call the model or the pipeline, not an "
                "attention submodule directly"
            )
        if self.extension is not None and not self.extension.active:
            return False
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
    """Reads the timestep, the token grid and the pipeline's cache context (cond/uncond) before each forward, then
    lets the run's batch extension (if any) change the inputs and the output.

    The inputs are read from what a plain torch forward pre-hook (:meth:`capture`) saw: it runs before every
    diffusers hook, so it sees the whole inputs even when context parallelism was enabled after ``diffattn.apply``
    (diffusers' input-splitting hook then wraps this one and would hand it this rank's shard, e.g. of Flux's
    ``hidden_states`` and ``img_ids``).
    """

    _is_stateful = True

    def __init__(self, run: RunState) -> None:
        super().__init__()
        self.run = run
        self.cache_context = StateManager(_NoState)  # diffusers fills in the pipeline's cache_context(...) here
        self.captured: ModelInputs | None = None
        self.capture_handle: torch.utils.hooks.RemovableHandle | None = None

    def capture(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.captured = model_inputs(module, args, kwargs)

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        try:
            context = self.cache_context.context
        except ValueError:
            context = None
        inputs, self.captured = self.captured, None
        self.run.begin_forward(
            inputs if inputs is not None else model_inputs(module, args, kwargs),
            getattr(context, "name", None),
            getattr(context, "num_inference_steps", None),
        )
        if self.run.extension is not None:
            args, kwargs = self.run.extension.pre_forward(module, args, kwargs)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        if self.run.extension is not None:
            output = self.run.extension.post_forward(module, output)
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.run.reset()
        return module


def install_hook(model: torch.nn.Module, run: RunState) -> None:
    hook = StepHook(run)
    HookRegistry.check_if_exists_or_initialize(model).register_hook(hook, HOOK_NAME)
    hook.capture_handle = model.register_forward_pre_hook(hook.capture, with_kwargs=True)


def remove_hook(model: torch.nn.Module) -> None:
    registry = getattr(model, "_diffusers_hook", None)
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    if hook is not None:
        if hook.capture_handle is not None:
            hook.capture_handle.remove()
        registry.remove_hook(HOOK_NAME, recurse=False)
