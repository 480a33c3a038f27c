"""The model-level hook (``"diffattn"``): per forward of a denoiser, reads the call's state and lets batch-expanding
applications (guidance) change the batch. :class:`ModelState` holds the applications on the denoiser and, per
thread, the state of the call it is in."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from ..adapters import FamilyAdapter, model_inputs
from ..errors import LayoutError
from .call_state import CallState, read_call_state
from .forward_ops import begin_forward, end_forward, register_model_hook
from .ids import next_id

if TYPE_CHECKING:
    from .application import Application

__all__ = ["MODEL_HOOK", "ModelState", "ModelStateHook", "model_state", "existing_state", "drop_state_if_unused"]

MODEL_HOOK = "diffattn"


class ModelState:
    """The applications on one denoiser and, per thread, the forward it is in."""

    def __init__(self, model: torch.nn.Module, adapter: FamilyAdapter) -> None:
        self.model = model
        self.adapter = adapter
        self.applications: list[Application] = []
        self.trace_token: torch.Tensor | None = None  # under torch.compile: begin_forward's token for the cores
        self._local = threading.local()

    @property
    def current(self) -> CallState:
        """The state of the forward this thread is in (raises outside one)."""
        call_state = getattr(self._local, "call_state", None)
        if call_state is None:
            raise LayoutError(
                f"a diffattn hook on an attention module of {type(self.model).__name__} ran outside the model's "
                "forward: call the model (or the pipeline), not an attention submodule directly"
            )
        return call_state

    def replace_current(self, call_state: CallState | None) -> CallState | None:
        """Make ``call_state`` this thread's current one (``None``: none) and return the one it replaces."""
        previous = getattr(self._local, "call_state", None)
        self._local.call_state = call_state
        return previous


_GUIDANCE_BREAK = (
    "diffattn guidance (PAG, SoftPAG, SEG) expands and combines the batch in Python at every forward: compile "
    "without fullgraph=True (one graph break per forward); static and sparse methods need none"
)


class _NoState(BaseState):
    def reset(self, *args: Any, **kwargs: Any) -> None:
        pass


class ModelStateHook(ModelHook):
    """Reads each forward's position, grid and batch roles, then lets batch-expanding applications change the batch.

    The inputs are read from what a plain torch forward pre-hook (:meth:`capture`) saw: it runs before every
    diffusers hook, so it sees the whole inputs even when context parallelism was enabled after ``diffattn.apply``
    (diffusers' input-splitting hook then wraps this one and would hand it this rank's shard).

    Under ``torch.compile`` the reading and the end of the call are the ops ``diffattn::begin_forward`` /
    ``diffattn::end_forward`` (:mod:`.forward_ops`), run at call time without a graph break, unless an application
    changes the batch (guidance): its Python runs eagerly, one graph break per forward (``fullgraph=True`` then fails).
    """

    _is_stateful = True

    def __init__(self, state: ModelState) -> None:
        super().__init__()
        self.state = state
        self.cache_context = StateManager(_NoState)  # diffusers fills in the pipeline's cache_context(...) here
        self._captured = threading.local()
        self.capture_handle: torch.utils.hooks.RemovableHandle | None = None
        self.key = next_id()
        register_model_hook(self.key, self)

    def capture(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.compiler.is_compiling():  # pre_forward reads its own arguments (no context parallelism + compile)
            return
        self._captured.inputs = model_inputs(module, args, kwargs)

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        if torch.compiler.is_compiling() and not self._extends_batch():
            # no graph break: an op that runs begin_call at call time; its token orders the attention cores after it
            self.state.trace_token = begin_forward(self.key, args, kwargs)
            return args, kwargs
        return self._eager_pre_forward(module, *args, **kwargs)

    def _extends_batch(self) -> bool:
        return any(application.extension is not None for application in self.state.applications)

    def begin_call(self, args: tuple, kwargs: dict) -> CallState:
        """Read the state of the call about to run with these inputs and make it this thread's current one."""
        try:
            context = self.cache_context.context
        except ValueError:
            context = None
        inputs = getattr(self._captured, "inputs", None)
        self._captured.inputs = None
        call_state = read_call_state(
            self.state.model,
            self.state.adapter,
            inputs if inputs is not None else model_inputs(self.state.model, args, kwargs),
            getattr(context, "name", None),
            context,
        )
        self.state.replace_current(call_state)
        return call_state

    def end_call(self) -> None:
        self.state.replace_current(None)

    @torch.compiler.disable(reason=_GUIDANCE_BREAK)
    def _eager_pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        call_state = self.begin_call(args, kwargs)
        for application in self.state.applications:
            if application.extension is not None:
                args, kwargs = application.extension.pre_forward(call_state, module, args, kwargs)
        return args, kwargs

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        """The model's forward; a forward that raises (KeyboardInterrupt included) ends its call state too (eager;
        a compiled forward that raises leaves it to the next forward, which replaces it)."""
        if torch.compiler.is_compiling():
            return self.fn_ref.original_forward(*args, **kwargs)
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        except BaseException:
            self._end_call()
            raise

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        """Batch extensions combine their outputs; then the call state ends, so nothing after this forward (a direct
        call of an attention submodule, the next pipeline call) can read its step, roles or pipeline."""
        if torch.compiler.is_compiling() and not self._extends_batch():
            return end_forward(self.key, output)
        return self._eager_post_forward(module, output)

    @torch.compiler.disable(reason=_GUIDANCE_BREAK)
    def _eager_post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        call_state = self._end_call()
        if call_state is not None:
            for application in reversed(self.state.applications):
                if application.extension is not None:
                    output = application.extension.post_forward(call_state, module, output)
        return output

    @torch.compiler.disable
    def _end_call(self) -> CallState | None:
        return self.state.replace_current(None)

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
