"""The attention-module hook (``"diffattn.attention"``): the applications on one attention module, and on each call
the module's own forward with its SDPA core replaced by the chain of the applications that act."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import Tensor

from .. import parallel
from ..errors import InterceptionError
from .application import Application, LayerInfo
from .backend import native_backend, needs_native_override
from .chain import MethodChain
from .conflicts import refuse_layer_skip
from .core_op import core_op, register_hook, unregister_hook
from .ids import next_id
from .interceptor import SDPA, CoreInterceptor

__all__ = ["ATTENTION_HOOK", "AttentionHook", "Entry", "attach_entry", "detach_application", "stock_processor"]

ATTENTION_HOOK = "diffattn.attention"


@dataclass(frozen=True)
class Entry:
    """One application on one attention module. ``gate``: when set (``diffattn.processors``), the entry acts only
    while the module's processor is that object; once another processor is set, the entry goes."""

    application: Application
    layer: LayerInfo
    gate: Any = None


def stock_processor(module: torch.nn.Module) -> Any:
    """The module's processor, unwrapped from a ``diffattn.processors`` wrapper (its ``inner``)."""
    processor = module.processor
    return getattr(processor, "diffattn_inner", processor)


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
        self.key = next_id()
        self.module: weakref.ref[torch.nn.Module] | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.module = weakref.ref(module)
        register_hook(self.key, self)
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:  # diffusers' spelling
        unregister_hook(self.key)
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if any(e.gate is not None and e.gate is not module.processor for e in self.entries):
            self._drop_replaced(module)
        if not self.entries:
            return self.fn_ref.original_forward(*args, **kwargs)
        if not torch.compiler.is_compiling():  # a layer-skip hook registered after diffattn: refused at its first call
            refuse_layer_skip(module, self.entries[0].layer.name, [e.application.method.name for e in self.entries])
        if torch.compiler.is_compiling() and not needs_native_override(stock_processor(module)):
            return self._compiled_forward(module, *args, **kwargs)
        return self._eager_forward(module, *args, **kwargs)

    @torch.compiler.disable
    def _drop_replaced(self, module: torch.nn.Module) -> None:
        """Entries of ``diffattn.processors`` whose processor was replaced (a stock one set back): removed, as
        setting a processor removes the one before it."""
        replaced = [e for e in self.entries if e.gate is not None and e.gate is not module.processor]
        self.entries = [e for e in self.entries if e not in replaced]
        for entry in replaced:
            entry.application.layers.pop(entry.layer.name, None)
            state = entry.application.state
            if not entry.application.layers and entry.application in state.applications:
                state.applications.remove(entry.application)

    def _compiled_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        """Traced by torch.compile: the SDPA call becomes the custom op, which runs the chain at call time."""
        layer = self.entries[0].layer
        parallel.processor_ulysses(
            stock_processor(module), self.entries[0].application.state.model, layer.name, getattr(module, "heads", None)
        )
        token = self.entries[0].application.state.trace_token

        def chain(sdpa: Any, call: dict[str, Any]) -> Tensor:
            return core_op(sdpa, call, hook=self.key, token=token, index=interceptor.calls)

        interceptor = CoreInterceptor(chain)
        with interceptor:
            out = self.fn_ref.original_forward(*args, **kwargs)
        if interceptor.calls == 0:
            raise _no_sdpa_error(layer.name, stock_processor(module), self.entries)
        return out

    @torch.compiler.disable  # under torch.compile only when the processor must be routed to SDPA for the call
    def _eager_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        processor = stock_processor(module)
        chain = self._build_chain(module)
        if chain is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        interceptor = CoreInterceptor(chain)
        with native_backend(processor), interceptor, _module_forward_calls(module) as ran:
            out = self.fn_ref.original_forward(*args, **kwargs)
        if interceptor.calls == 0:
            if ran[0] == 0:  # a cache hook inside this one served the call: the module computed no attention
                step = self.entries[0].application.state.current.step
                for entry in chain.entries:
                    entry.application.records.record(step, entry.layer.name, entry.layer.role, acted=False)
                return out
            raise _no_sdpa_error(self.entries[0].layer.name, processor, chain.entries)
        return out

    def _build_chain(self, module: torch.nn.Module) -> MethodChain | None:
        """The chain of the applications that act in the current forward (records the others), or None."""
        state = self.entries[0].application.state
        call_state = state.current
        stack = []
        for entry in self.entries:
            if entry.application.acts(call_state):
                stack.append(entry)
            else:
                entry.application.records.record(call_state.step, entry.layer.name, entry.layer.role, acted=False)
        processor = stock_processor(module)
        heads = getattr(module, "heads", None)
        # before anything else: a processor installed after enable_parallelism gets the model's parallel config
        ulysses = parallel.processor_ulysses(processor, state.model, self.entries[0].layer.name, heads)
        if not stack:
            return None
        stack.sort(key=lambda e: (e.application.method.stack_level, e.application.id))
        return MethodChain(stack, call_state, ulysses, heads, processor, state.adapter.text_call(module))

    def run_core(self, call: dict[str, Any], index: int = 1) -> Tensor:
        """The ``index``-th intercepted SDPA call of a compiled module's forward (see ``diffattn::attention_core``)."""
        module = self.module() if self.module is not None else None
        if module is None or not self.entries:
            raise InterceptionError(
                "a diffattn attention hook was removed while a compiled model still calls it; "
                "call torch._dynamo.reset() (or recompile) after removing diffattn handles"
            )
        chain = self._build_chain(module)
        if chain is None:
            q, k, v = call.pop("query"), call.pop("key"), call.pop("value")
            return SDPA(q, k, v, **call)
        chain.sdpa_calls = index - 1
        return chain(SDPA, call)


@contextlib.contextmanager
def _module_forward_calls(module: torch.nn.Module) -> Iterator[list[int]]:
    """Counts (``ran[0]``) the calls of the module's own forward, under every hook, while the block runs: zero means
    a hook inside diffattn's (a cache such as PyramidAttentionBroadcast or FasterCache) returned without running it,
    which is not a processor computing attention without SDPA."""
    ran = [0]
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or not registry._hook_order:
        ran[0] = 1  # no hook chain to look through: the forward is counted as run, so the SDPA check stays strict
        yield ran
        return
    ref = registry.hooks[registry._hook_order[0]].fn_ref  # the innermost hook holds the module's own forward
    name = "original_forward" if ref.original_forward is not None else "forward"
    inner = getattr(ref, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        ran[0] += 1
        return inner(*args, **kwargs)

    setattr(ref, name, counted)
    try:
        yield ran
    finally:
        setattr(ref, name, inner)


def _no_sdpa_error(layer: str, processor: Any, entries: list[Entry]) -> InterceptionError:
    names = ", ".join(e.application.method.name for e in entries)
    return InterceptionError(
        f"{layer}: the processor {type(processor).__name__} computed attention without "
        f"torch.nn.functional.scaled_dot_product_attention (e.g. xformers, flex or a manual softmax), so "
        f"{names} could not replace it. Set an SDPA processor (for UNets: model.set_default_attn_processor();"
        " for dispatch_attention_fn models: model.set_attention_backend('native')), or remove the diffattn "
        "handle first."
    )


def attach_entry(module: torch.nn.Module, entry: Entry) -> None:
    """Add ``entry`` to the module's attention hook, installing the hook on first use."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    hook = registry.get_hook(ATTENTION_HOOK)
    if hook is None:
        hook = AttentionHook()
        registry.register_hook(hook, ATTENTION_HOOK)
    hook.entries.append(entry)


def detach_application(module: torch.nn.Module, application: Application) -> None:
    """Remove the entries of ``application`` from the module's attention hook; the hook goes with the last."""
    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook(ATTENTION_HOOK) if registry is not None else None
    if hook is None:
        return
    hook.entries = [e for e in hook.entries if e.application is not application]
    if not hook.entries:
        registry.remove_hook(ATTENTION_HOOK, recurse=False)
