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
        call_state = read_call_state(
            self.state.model,
            self.state.adapter,
            inputs if inputs is not None else model_inputs(module, args, kwargs),
            getattr(context, "name", None),
            context,
        )
        self.state.replace_current(call_state)
        for application in self.state.applications:
            if application.extension is not None:
                args, kwargs = application.extension.pre_forward(call_state, module, args, kwargs)
        return args, kwargs

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        """The model's forward; a forward that raises (KeyboardInterrupt included) ends its call state too."""
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        except BaseException:
            self._end_call()
            raise

    @torch.compiler.disable  # at the end of the forward: the graph ends here anyway
    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        """Batch extensions combine their outputs; then the call state ends, so nothing after this forward (a direct
        call of an attention submodule, the next pipeline call) can read its step, roles or pipeline."""
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
