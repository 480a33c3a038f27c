"""The runtime: diffusers hooks that run a stack of methods in place of an attention module's attention core.

Two kinds of named diffusers ``ModelHook`` (the registry diffusers' own layer-skip and cache hooks use):

- one :class:`ModelStateHook` (``"diffattn"``) on each denoiser that has at least one application: before every
  forward it reads where the denoising loop is (:mod:`diffattn.steps`), the token grid and the role of each batch
  entry, for this call and this thread only, and lets a batch-expanding application (guidance) change the batch;
- one :class:`AttentionHook` (``"diffattn.attention"``) on each attention module some application selected, holding
  the applications on it (removing one removes its entries, the hook goes with the last). The stock
  processor object is never replaced: whatever processor the module has at call time (after ``set_attn_processor``,
  IP-Adapter loading or ``set_attention_backend``) runs, and a ``TorchFunctionMode`` catches its
  ``scaled_dot_product_attention`` call. Processors that go through diffusers' ``dispatch_attention_fn`` are routed
  to the native (SDPA) backend for that call through their own ``_attention_backend`` attribute (no process-global
  switch). A processor whose core is not an SDPA call raises :class:`InterceptionError` at that call.

**Stacking.** Any number of applications on one model. On a call, the acting applications of the module form a
chain ordered by :attr:`AttentionMethod.stack_level` (batch-expanding guidance 0, editing 1, kernel-level methods 2;
ties in the order they were applied): each method's ``ctx.dense(q, k, v)`` calls the next one, the last one the
stock attention core. Removing an application removes exactly its own hooks.

**Threads.** Per-call state lives in thread-local storage and the interception mode is per thread, so two pipelines
(two models) in two threads do not see each other. One model called from two threads at once is not supported.

**Memory.** Records are bounded: the last :data:`RECENT_CALLS` call records, the set of (step, layer) pairs acted on,
and per-layer metric sums.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from torch import Tensor
from torch.overrides import TorchFunctionMode

from . import parallel
from .adapters import FamilyAdapter, ModelInputs, model_inputs
from .context import AttentionContext, Role
from .errors import ContextParallelError, InterceptionError, LayoutError
from .layout import TokenLayout
from .methods.base import AttentionMethod
from .schedule import StepSchedule
from .steps import LoopPosition, declared_branches, loop_position

__all__ = [
    "CallRecord",
    "Records",
    "Forward",
    "ModelState",
    "Application",
    "AttentionHook",
    "ModelStateHook",
    "BatchExtension",
    "Entry",
    "MODEL_HOOK",
    "ATTENTION_HOOK",
    "RECENT_CALLS",
    "attach_entry",
    "detach_application",
]

logger = logging.getLogger(__name__)

MODEL_HOOK = "diffattn"
ATTENTION_HOOK = "diffattn.attention"
RECENT_CALLS = 2048
_SDPA = F.scaled_dot_product_attention
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
_IDS = itertools.count(1)


# ----------------------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CallRecord:
    """One attention call: at which step, on which layer, and whether the method acted."""

    step: int | None
    layer: str
    role: str
    acted: bool


class Records:
    """Bounded records of one application: recent calls, (step, layer) pairs acted on, per-layer metric sums."""

    def __init__(self, recent: int = RECENT_CALLS) -> None:
        self.calls: deque[CallRecord] = deque(maxlen=recent)
        self.acted: set[tuple[int | None, str]] = set()
        self.acted_calls: dict[str, int] = {}
        self._sums: dict[str, dict[str, list[float]]] = {}  # layer -> name -> [sum, count]

    def record(self, step: int | None, layer: str, role: str, acted: bool) -> None:
        self.calls.append(CallRecord(step, layer, role, acted))
        if acted:
            self.acted.add((step, layer))
            self.acted_calls[layer] = self.acted_calls.get(layer, 0) + 1

    def report(self, layer: str, metrics: dict[str, float]) -> None:
        per_layer = self._sums.setdefault(layer, {})
        for name, value in metrics.items():
            total = per_layer.setdefault(name, [0.0, 0])
            total[0] += float(value)
            total[1] += 1

    def metrics(self) -> dict[str, dict[str, float]]:
        return {layer: {name: s / n for name, (s, n) in per.items()} for layer, per in self._sums.items()}

    def clear(self) -> None:
        self.calls.clear()
        self.acted.clear()
        self.acted_calls.clear()
        self._sums.clear()


# ----------------------------------------------------------------------------------------------------------------
# Per-forward state
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Forward:
    """What one forward of a denoiser knows (one thread): loop position, grid, batch roles, the model's timestep."""

    position: LoopPosition
    grid: tuple[int, ...]
    batch_roles: tuple[str, ...] | None
    timestep: float | None  # the model's own timestep input (its scale: Flux passes t / 1000)
    timestep_1000: float | None  # on the 1000-step scale of diffusers' schedulers
    branches: tuple[str, ...] | None = None  # per entry, when the call declared prompt branches (editing)
    acted: dict[int, int] = field(default_factory=dict)  # application id -> attention calls it acted on
    decisions: dict[int, bool] = field(default_factory=dict)  # application id -> acts in this forward

    @property
    def step(self) -> int | None:
        return self.position.step

    @property
    def num_steps(self) -> int | None:
        return self.position.num_steps

    def extend_batch(self, roles: tuple[str, ...], copied_from: list[int]) -> None:
        """Entries with ``roles``, copies of the entries ``copied_from``, were appended to this forward's batch."""
        if self.batch_roles is None:
            raise LayoutError(
                "entries were appended to a batch whose roles are unknown; call the model through a standard "
                "pipeline or inside model.cache_context('cond')"
            )
        self.batch_roles = self.batch_roles + tuple(roles)
        if self.branches is not None:
            self.branches = self.branches + tuple(self.branches[i] for i in copied_from)


class BatchExtension(Protocol):
    """Changes the batch of every model forward (e.g. guidance appends perturbed copies of the conditional entries).

    ``pre_forward`` runs after the forward's position, grid and batch roles are known (it reports the roles of the
    entries it appends with :meth:`Forward.extend_batch`) and ``post_forward`` on the output. ``active(forward)``
    says whether the application's method acts in this forward (e.g. only on extended batches).
    """

    def active(self, forward: Forward) -> bool: ...

    def pre_forward(
        self, forward: Forward, module: torch.nn.Module, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict]: ...

    def post_forward(self, forward: Forward, module: torch.nn.Module, output: Any) -> Any: ...


def _timestep_value(timestep: Any) -> float | None:
    if isinstance(timestep, Tensor):
        return float(timestep.detach().float().max()) if timestep.numel() else None
    if isinstance(timestep, (int, float)):
        return float(timestep)
    return None


def _batch_size(inputs: ModelInputs) -> int | None:
    for key in ("sample", "hidden_states"):
        value = inputs.get(key)
        if isinstance(value, Tensor):
            return int(value.shape[0])
    return None


def _entry_branches(
    batch: int | None, roles: tuple[str, ...] | None, declared: tuple[str, ...] | None
) -> tuple[str, ...] | None:
    """The branch of each batch entry from the per-prompt branches: within each run of equal roles (a CFG half),
    entries are the prompts in order, each repeated ``num_images_per_prompt`` times."""
    if declared is None or batch is None:
        return None
    runs = [(0, batch)] if roles is None else _runs(roles)
    out: list[str] = []
    for start, stop in runs:
        size = stop - start
        if size % len(declared):
            raise LayoutError(
                f"the call declares {len(declared)} prompt branches {declared}, but a CFG half of its "
                f"batch has {size} entries; pass one prompt per branch"
            )
        copies = size // len(declared)
        out += [declared[j // copies] for j in range(size)]
    return tuple(out)


def _runs(roles: tuple[str, ...]) -> list[tuple[int, int]]:
    """(start, stop) of each run of equal roles."""
    found, start = [], 0
    for _, group in itertools.groupby(roles):
        stop = start + len(list(group))
        found.append((start, stop))
        start = stop
    return found


class ModelState:
    """The applications on one denoiser and, per thread, the forward it is in."""

    def __init__(self, model: torch.nn.Module, adapter: FamilyAdapter) -> None:
        self.model = model
        self.adapter = adapter
        self.applications: list[Application] = []
        self._local = threading.local()

    @property
    def forward(self) -> Forward:
        forward = getattr(self._local, "forward", None)
        if forward is None:
            raise LayoutError(
                f"a diffattn hook on an attention module of {type(self.model).__name__} ran outside the model's "
                "forward: call the model (or the pipeline), not an attention submodule directly"
            )
        return forward

    def begin(self, forward: Forward | None) -> Forward | None:
        previous = getattr(self._local, "forward", None)
        self._local.forward = forward
        return previous

    def read_forward(self, inputs: ModelInputs, cache_name: str | None, cache_context: Any) -> Forward:
        position = loop_position(self.model, cache_context)
        grid = self.adapter.grid(self.model, inputs)
        ulysses = parallel.model_ulysses(self.model)  # refuses ring attention before anything is split or sent
        if ulysses is not None:
            parallel.check_sequence_split(self.model, inputs, grid, ulysses)
        timestep = _timestep_value(inputs.get("timestep"))
        batch = _batch_size(inputs)
        roles = self._batch_roles(batch, cache_name, position)
        return Forward(
            position=position,
            grid=grid,
            batch_roles=roles,
            timestep=timestep,
            timestep_1000=None if timestep is None else timestep * self.adapter.timestep_scale,
            branches=_entry_branches(batch, roles, declared_branches()),
        )

    def _batch_roles(self, batch: int | None, cache_name: str | None, position: LoopPosition) -> tuple[str, ...] | None:
        """Roles of the batch entries, from this call: declared with denoising_step(batch_roles=...), the cache
        context's name, or the running pipeline's CFG flag."""
        if batch is None:
            return None
        if position.batch_roles is not None:
            if len(position.batch_roles) != batch:
                raise LayoutError(
                    f"denoising_step(batch_roles={position.batch_roles}) names "
                    f"{len(position.batch_roles)} entries, but the model was called with a batch of {batch}"
                )
            return position.batch_roles
        pipeline = position.pipeline
        if cache_name in ("cond", "uncond"):
            return (cache_name,) * batch
        if pipeline is None or not hasattr(type(pipeline), "do_classifier_free_guidance"):
            return None
        try:
            guided = bool(pipeline.do_classifier_free_guidance)
        except AttributeError:  # a property that reads state the pipeline sets later in its call
            return None
        if guided and self.adapter.cfg_in_batch and batch % 2 == 0:
            return ("uncond",) * (batch // 2) + ("cond",) * (batch // 2)
        return None if guided else ("cond",) * batch


# ----------------------------------------------------------------------------------------------------------------
# Applications
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerInfo:
    name: str
    role: Role
    text_first: bool


class Application:
    """One method applied to one denoiser: its schedule, selected layers, hooks and records."""

    def __init__(
        self, state: ModelState, method: AttentionMethod, schedule: StepSchedule, layers: dict[str, LayerInfo]
    ) -> None:
        self.id = next(_IDS)
        self.state = state
        self.method = method
        self.schedule = schedule
        self.layers = layers
        self.records = Records()
        self.extension: BatchExtension | None = None
        self.validated: set[tuple[str, TokenLayout, TokenLayout]] = set()
        self._checked_loop: tuple | None = None

    def on_schedule(self, forward: Forward) -> bool:
        """Whether the schedule selects this forward's step (checked once per loop: a schedule that selects no step
        that will run raises :class:`StepSelectionError`)."""
        position = forward.position
        loop = (position.num_steps, position.timesteps)
        if loop != self._checked_loop and (position.num_steps is not None or position.timesteps is not None):
            self.schedule.check_selects(
                position.num_steps, position.timesteps, f"{self.method.name} on {type(self.state.model).__name__}"
            )
            self._checked_loop = loop
        timestep = position.timestep if position.timestep is not None else forward.timestep_1000
        return self.schedule.is_active(position.step, position.num_steps, timestep)

    def acts(self, forward: Forward) -> bool:
        """Whether the method acts in this forward (decided once per forward, not per attention module)."""
        decided = forward.decisions.get(self.id)
        if decided is None:
            decided = forward.decisions[self.id] = (
                self.extension is None or self.extension.active(forward)
            ) and self.on_schedule(forward)
        return decided


# ----------------------------------------------------------------------------------------------------------------
# The model-level hook
# ----------------------------------------------------------------------------------------------------------------
class _NoState(BaseState):
    def reset(self, *args: Any, **kwargs: Any) -> None:
        pass


class ModelStateHook(ModelHook):
    """Reads each forward's position, grid and batch roles, then lets batch-expanding applications change the batch.

    The inputs are read from what a plain torch forward pre-hook (:meth:`capture`) saw: it runs before every
    diffusers hook, so it sees the whole inputs even when context parallelism was enabled after ``diffattn.apply``
    (diffusers' input-splitting hook then wraps this one and would hand it this rank's shard).
    """

    _is_stateful = True

    def __init__(self, state: ModelState) -> None:
        super().__init__()
        self.state = state
        self.cache_context = StateManager(_NoState)  # diffusers fills in the pipeline's cache_context(...) here
        self._captured = threading.local()
        self.capture_handle: torch.utils.hooks.RemovableHandle | None = None

    def capture(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.compiler.is_compiling():  # pre_forward reads its own arguments (no context parallelism + compile)
            return
        self._captured.inputs = model_inputs(module, args, kwargs)

    @torch.compiler.disable  # Python bookkeeping (the call stack, thread-local state): one graph break per forward
    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        try:
            context = self.cache_context.context
        except ValueError:
            context = None
        inputs = getattr(self._captured, "inputs", None)
        self._captured.inputs = None
        forward = self.state.read_forward(
            inputs if inputs is not None else model_inputs(module, args, kwargs),
            getattr(context, "name", None),
            context,
        )
        self.state.begin(forward)
        for application in self.state.applications:
            if application.extension is not None:
                args, kwargs = application.extension.pre_forward(forward, module, args, kwargs)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        # Without a batch extension there is nothing to do (and under torch.compile nothing to break the graph for);
        # the forward stays current until the next one begins.
        if all(application.extension is None for application in self.state.applications):
            return output
        return self._post_forward(module, output)

    @torch.compiler.disable
    def _post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        forward = self.state.begin(None)
        if forward is not None:
            for application in reversed(self.state.applications):
                if application.extension is not None:
                    output = application.extension.post_forward(forward, module, output)
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        return module


def model_state(model: torch.nn.Module, adapter: FamilyAdapter) -> ModelState:
    """The model's state, installing its model-level hook on first use."""
    registry = HookRegistry.check_if_exists_or_initialize(model)
    hook = registry.get_hook(MODEL_HOOK)
    if hook is None:
        hook = ModelStateHook(ModelState(model, adapter))
        registry.register_hook(hook, MODEL_HOOK)
        hook.capture_handle = model.register_forward_pre_hook(hook.capture, with_kwargs=True)
    return hook.state


def existing_state(model: torch.nn.Module) -> ModelState | None:
    registry = getattr(model, "_diffusers_hook", None)
    hook = registry.get_hook(MODEL_HOOK) if registry is not None else None
    return None if hook is None else hook.state


def drop_state_if_unused(model: torch.nn.Module) -> None:
    registry = getattr(model, "_diffusers_hook", None)
    hook = registry.get_hook(MODEL_HOOK) if registry is not None else None
    if hook is not None and not hook.state.applications:
        if hook.capture_handle is not None:
            hook.capture_handle.remove()
        registry.remove_hook(MODEL_HOOK, recurse=False)


# ----------------------------------------------------------------------------------------------------------------
# The attention-module hook
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One application on one attention module."""

    application: Application
    layer: LayerInfo


class AttentionHook(ModelHook):
    """The diffattn hook of one attention module: the applications on it, in the order they were applied. On a call
    it runs the module's forward with its SDPA core replaced by the chain of the applications that act.

    One hook per module (not one per application): diffusers' registry cannot unlink a hook with its own
    ``new_forward`` from the middle of a chain, and removing the middle application must leave the others exact.

    Under ``torch.compile`` the hook is traced: the SDPA call becomes the custom op ``diffattn::attention_core``
    (opaque to the compiler, so no graph break), whose implementation runs the same chain eagerly at run time, with
    the step, batch roles and records of that call.
    """

    def __init__(self) -> None:
        super().__init__()
        self.entries: list[Entry] = []
        self.key = next(_IDS)
        self.module: weakref.ref[torch.nn.Module] | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.module = weakref.ref(module)
        _LIVE_HOOKS[self.key] = self
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:  # diffusers' spelling
        _LIVE_HOOKS.pop(self.key, None)
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not self.entries:
            return self.fn_ref.original_forward(*args, **kwargs)
        if torch.compiler.is_compiling() and not _needs_native_override(module.processor):
            layer = self.entries[0].layer
            parallel.processor_ulysses(
                module.processor, self.entries[0].application.state.model, layer.name, getattr(module, "heads", None)
            )
            interceptor = _CoreInterceptor(functools.partial(_core_op, hook=self.key))
            with interceptor:
                out = self.fn_ref.original_forward(*args, **kwargs)
            if interceptor.calls == 0:
                raise _no_sdpa_error(layer.name, module.processor, self.entries)
            return out
        return self._eager_forward(module, *args, **kwargs)

    @torch.compiler.disable  # under torch.compile only when the processor must be routed to SDPA for the call
    def _eager_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        processor = module.processor
        plan = self._plan(module)
        if plan is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        interceptor = _CoreInterceptor(plan)
        with _native_backend(processor), interceptor:
            out = self.fn_ref.original_forward(*args, **kwargs)
        if interceptor.calls == 0:
            raise _no_sdpa_error(self.entries[0].layer.name, processor, plan.hooks)
        return out

    def _plan(self, module: torch.nn.Module) -> _Chain | None:
        """The chain of the applications that act in the current forward (records the others), or None."""
        state = self.entries[0].application.state
        forward = state.forward
        stack = []
        for entry in self.entries:
            if entry.application.acts(forward):
                stack.append(entry)
            else:
                entry.application.records.record(forward.step, entry.layer.name, entry.layer.role, acted=False)
        processor = module.processor
        heads = getattr(module, "heads", None)
        # before anything else: a processor installed after enable_parallelism gets the model's parallel config
        ulysses = parallel.processor_ulysses(processor, state.model, self.entries[0].layer.name, heads)
        if not stack:
            return None
        stack.sort(key=lambda e: (e.application.method.stack_level, e.application.id))
        return _Chain(stack, forward, ulysses, heads, processor)

    def run_core(self, call: dict[str, Any]) -> Tensor:
        """One intercepted SDPA call of a compiled module (see ``diffattn::attention_core``)."""
        module = self.module() if self.module is not None else None
        if module is None or not self.entries:
            raise InterceptionError(
                "a diffattn attention hook was removed while a compiled model still calls it; "
                "call torch._dynamo.reset() (or recompile) after removing diffattn handles"
            )
        plan = self._plan(module)
        if plan is None:
            q, k, v = call.pop("query"), call.pop("key"), call.pop("value")
            return _SDPA(q, k, v, **call)
        return plan(_SDPA, call)


def _no_sdpa_error(layer: str, processor: Any, entries: list[Entry]) -> InterceptionError:
    names = ", ".join(e.application.method.name for e in entries)
    return InterceptionError(
        f"{layer}: the processor {type(processor).__name__} computed attention without "
        f"torch.nn.functional.scaled_dot_product_attention (e.g. xformers, flex or a manual softmax), so "
        f"{names} could not replace it. Set an SDPA processor (for UNets: model.set_default_attn_processor();"
        " for dispatch_attention_fn models: model.set_attention_backend('native')), or remove the diffattn "
        "handle first."
    )


_LIVE_HOOKS: dict[int, AttentionHook] = {}  # key -> hook, for the custom op (ints are what an op can take)


@torch.library.custom_op("diffattn::attention_core", mutates_args=())
def _attention_core(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    hook: int,
) -> Tensor:
    """The chain of diffattn methods of attention hook ``hook`` on one SDPA call, run eagerly (the compiled graph
    sees an opaque op; its Python runs with the current step, batch roles and records)."""
    owner = _LIVE_HOOKS.get(hook)
    if owner is None:
        raise InterceptionError(
            "a diffattn attention hook was removed while a compiled model still calls it; call "
            "torch._dynamo.reset() (or recompile) after removing diffattn handles"
        )
    out = owner.run_core(
        dict(
            query=query,
            key=key,
            value=value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    )
    return out.contiguous().clone() if _aliases(out, (query, key, value)) else out.contiguous()


@_attention_core.register_fake
def _(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, hook):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def _aliases(out: Tensor, inputs: tuple[Tensor, ...]) -> bool:
    pointer = out.untyped_storage().data_ptr()
    return any(x.untyped_storage().data_ptr() == pointer for x in inputs)


def _core_op(sdpa: Any, call: dict[str, Any], *, hook: int) -> Tensor:
    return _attention_core(
        call["query"],
        call["key"],
        call["value"],
        call["attn_mask"],
        float(call["dropout_p"]),
        bool(call["is_causal"]),
        call["scale"],
        bool(call["enable_gqa"]),
        hook,
    )


def _needs_native_override(processor: Any) -> bool:
    """Whether a call of ``processor`` must be routed to diffusers' native backend to reach SDPA."""
    if not hasattr(processor, "_attention_backend"):
        return False
    from diffusers.models.attention_dispatch import AttentionBackendName

    backend = processor._attention_backend
    return backend != AttentionBackendName.NATIVE and (backend is not None or not _active_backend_is_native())


def attach_entry(module: torch.nn.Module, entry: Entry) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(module)
    hook = registry.get_hook(ATTENTION_HOOK)
    if hook is None:
        hook = AttentionHook()
        registry.register_hook(hook, ATTENTION_HOOK)
    hook.entries.append(entry)


def detach_application(module: torch.nn.Module, application: Application) -> None:
    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook(ATTENTION_HOOK) if registry is not None else None
    if hook is None:
        return
    hook.entries = [e for e in hook.entries if e.application is not application]
    if not hook.entries:
        registry.remove_hook(ATTENTION_HOOK, recurse=False)


def _active_backend_is_native() -> bool:
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    return _AttentionBackendRegistry.get_active_backend()[0] == AttentionBackendName.NATIVE


@contextlib.contextmanager
def _native_backend(processor: Any) -> Iterator[None]:
    """Route a ``dispatch_attention_fn`` processor to diffusers' native (SDPA) backend for one call, through the
    processor's own ``_attention_backend`` (never diffusers' process-global active backend)."""
    if not hasattr(processor, "_attention_backend"):
        yield
        return
    from diffusers.models.attention_dispatch import AttentionBackendName

    native = AttentionBackendName.NATIVE
    previous = processor._attention_backend
    override = _needs_native_override(processor)
    if override:
        processor._attention_backend = native
    try:
        yield
    finally:
        if override:
            processor._attention_backend = previous


def _passthrough(func: Any) -> Any:
    """The function to run for a torch call the interceptor leaves alone. Under torch.compile a Tensor method written
    in Python (``Tensor.unflatten``, ``Tensor.split``) calls ``super()``, which dynamo cannot trace inside a mode:
    use the ``torch.<name>`` function of the same meaning."""
    if torch.compiler.is_compiling() and getattr(func, "__module__", None) == "torch._tensor":
        return getattr(torch, func.__name__, func)
    return func


class _CoreInterceptor(TorchFunctionMode):
    """Replaces the SDPA calls made inside one attention-module call by ``chain(sdpa, call)``: the chain of acting
    methods, or (compiled) the custom op that runs it."""

    def __init__(self, chain: Callable[[Any, dict[str, Any]], Tensor]) -> None:
        super().__init__()
        self.chain = chain
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: A002 (torch's name)
        kwargs = kwargs or {}
        if func is not _SDPA:
            return _passthrough(func)(*args, **kwargs)
        self.calls += 1
        call = dict(_SDPA_DEFAULTS)
        call.update(zip(_SDPA_ARGS, args))
        call.update(kwargs)
        return self.chain(func, call)


class _Chain:
    """The acting methods of one attention-module call, outermost first; the last one's ``dense`` is the stock core."""

    def __init__(
        self, hooks: list[Entry], forward: Forward, ulysses: parallel.Ulysses | None, heads: int | None, processor: Any
    ) -> None:
        self.hooks = hooks
        self.forward = forward
        self.ulysses = ulysses
        self.heads = heads
        self.processor = processor
        self.layer = hooks[0].layer
        self.state = hooks[0].application.state

    def __call__(self, sdpa: Any, call: dict[str, Any]) -> Tensor:
        q, k, v = call.pop("query"), call.pop("key"), call.pop("value")
        if call["is_causal"]:
            raise InterceptionError(f"{self.layer.name}: causal attention is not supported by diffattn methods")
        q_layout, kv_layout, q_range = self._layouts(q.shape[-2], k.shape[-2])
        positional = [h.application.method.name for h in self.hooks if not h.application.method.position_free]
        if q_range is not None and positional:
            raise ContextParallelError(
                f"{self.layer.name} ({self.layer.role} attention): under context parallelism diffusers runs this call "
                f"on this rank's {q.shape[-2]} of {q_layout.num_tokens} queries (without the all-to-all), but "
                f"{', '.join(positional)} needs all of them. Leave this layer out (layers=... or the method's roles=...)."
            )
        ulysses = self.ulysses
        local_heads = q.shape[1]
        split = ulysses is not None and q_range is None and self.heads != local_heads
        if split and self.heads is not None and local_heads * ulysses.degree != self.heads:
            raise InterceptionError(
                f"{self.layer.name}: the attention call has {local_heads} heads; Ulysses over {ulysses.degree} ranks "
                f"of a {self.heads}-head layer should leave {self.heads // ulysses.degree}"
            )
        inverse = None
        if split and q_layout.text_len and positional:
            q, k, v, inverse = self._to_layout_order(q, k, v, call, q_layout, ulysses)
        shared = dict(
            role=self.layer.role,
            q_layout=q_layout,
            kv_layout=kv_layout,
            attn_mask=call["attn_mask"],
            scale=call["scale"],
            enable_gqa=call["enable_gqa"],
            head_offset=ulysses.head_offset(local_heads) if split else 0,
            total_heads=local_heads * ulysses.degree if split else None,
            q_range=q_range,
            timestep=self.forward.timestep,
            input_grid=self.forward.grid,
        )

        ran = set()

        def run(index: int, q_: Tensor, k_: Tensor, v_: Tensor) -> Tensor:
            if index == len(self.hooks) or q_.shape[-2] != q.shape[-2] or k_.shape[-2] != k.shape[-2]:
                # the stock core; a call with other token counts (e.g. PAG's one-key identity) is not on the layout
                # the inner methods act on, so it goes straight there
                return sdpa(q_, k_, v_, **call)
            ran.add(index)
            hook = self.hooks[index]
            application = hook.application
            layer = hook.layer.name
            ctx = AttentionContext(
                layer=layer,
                step=self.forward.step,
                num_steps=self.forward.num_steps,
                batch_roles=self.forward.batch_roles,
                branches=self.forward.branches,
                dense=lambda a, b, c: run(index + 1, a, b, c),
                report=lambda **metrics: application.records.report(layer, metrics),
                **shared,
            )
            key = (layer, q_layout, kv_layout)
            if key not in application.validated:
                application.method.validate(ctx)
                application.validated.add(key)
            out = application.method(q_, k_, v_, ctx)
            expected = (*q_.shape[:-1], v_.shape[-1])
            if tuple(out.shape) != expected or out.dtype != q_.dtype:
                raise InterceptionError(
                    f"{application.method.name} returned {tuple(out.shape)} {out.dtype} on {layer}; the attention "
                    f"core must return {expected} {q_.dtype}"
                )
            application.records.record(self.forward.step, layer, self.layer.role, acted=True)
            self.forward.acted[application.id] = self.forward.acted.get(application.id, 0) + 1
            return out

        out = run(0, q, k, v)
        skipped = [self.hooks[i].application.method.name for i in range(len(self.hooks)) if i not in ran]
        if skipped:
            outer = self.hooks[min(ran)].application.method.name
            raise InterceptionError(
                f"{self.layer.name}: {outer} computed the whole attention core without calling ctx.dense, so "
                f"{', '.join(skipped)} (applied inside it) never ran. Two methods that each replace the core do not "
                "compose: give them different layers (layers=...) or steps, or combine their patterns in one method "
                "(e.g. SparseAttention(Intersection(...)))."
            )
        if inverse is not None:
            out = out.index_select(-2, inverse)
        return out

    def _layouts(self, num_q: int, num_kv: int) -> tuple[TokenLayout, TokenLayout, tuple[int, int] | None]:
        """(query layout, key layout, query range): the range is set when the call holds only this rank's queries."""
        base = self.forward.grid
        role = self.layer.role
        grid = base if role == "joint" else self.state.adapter.grid_for_length(base, num_q, self.layer.name)
        visual = TokenLayout(grid)
        ulysses = self.ulysses
        if role == "self":
            if num_q != visual.num_tokens or num_kv != visual.num_tokens:
                raise self._mismatch(num_q, num_kv, visual)
            return visual, visual, None
        if role == "cross":
            text = TokenLayout((), text_len=num_kv)
            if num_q == visual.num_tokens:
                return visual, text, None
            if ulysses is not None and num_q * ulysses.degree == visual.num_tokens:
                return visual, text, ulysses.query_range(visual.num_tokens)  # e.g. Wan: local queries, all text
            raise self._mismatch(num_q, num_kv, visual)
        text_len = num_q - visual.num_tokens
        if text_len < 0 or num_kv != num_q:
            raise self._mismatch(num_q, num_kv, visual)
        joint = TokenLayout(grid, text_len=text_len, text_first=self.layer.text_first)
        return joint, joint, None

    def _mismatch(self, num_q: int, num_kv: int, visual: TokenLayout) -> LayoutError:
        where = f"{self.layer.name} ({self.layer.role} attention)"
        if self.ulysses is not None:
            return LayoutError(
                f"{where}: the attention call has {num_q} query and {num_kv} key tokens, but the layout derived from "
                f"the model inputs is {visual.describe()} and the model runs context parallelism "
                f"(ulysses_degree={self.ulysses.degree}). This usually means the processor "
                f"{type(self.processor).__name__} attended within this rank's 1/{self.ulysses.degree} of the sequence "
                "instead of running diffusers' Ulysses attention: install a processor that passes its "
                "`_parallel_config` to dispatch_attention_fn."
            )
        return LayoutError(
            f"{where}: the attention call has {num_q} query and {num_kv} key tokens, which does not fit the layout "
            f"derived from the model inputs ({visual.describe()}). If the sequence is sharded (context parallelism), "
            f"use Ulysses mode; otherwise the adapter entry for {type(self.state.model).__name__} is wrong for this "
            "model."
        )

    def _to_layout_order(
        self, q: Tensor, k: Tensor, v: Tensor, call: dict[str, Any], layout: TokenLayout, ulysses: parallel.Ulysses
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The all-to-all concatenated the ranks' ``[text shard | visual shard]`` joint sequences: put q, k, v (and
        the stock mask, in ``call``) in layout order. Returns them and the index that restores the gathered order."""
        if not parallel.text_split_with_visual(self.state.model):
            raise ContextParallelError(
                f"{self.layer.name}: under context parallelism diffattn knows where the text tokens of joint attention "
                "sit only when the model's _cp_plan splits encoder_hidden_states together with the visual tokens "
                f"(Flux, Flux2, QwenImage); {type(self.state.model).__name__}'s plan does not."
            )
        order, inverse = parallel.joint_order(
            layout.text_len, layout.num_visual, ulysses.degree, layout.text_first, q.device
        )
        mask = call["attn_mask"]
        if mask is not None:
            n = q.shape[-2]
            if mask.shape[-1] == n:
                mask = mask.index_select(-1, order)
            if mask.ndim >= 2 and mask.shape[-2] == n:
                mask = mask.index_select(-2, order)
            call["attn_mask"] = mask
        q, k, v = (x.index_select(-2, order) for x in (q, k, v))
        return q, k, v, inverse
