"""The custom ops ``diffattn::begin_forward`` and ``diffattn::end_forward``: under ``torch.compile`` the model-level
hook's bookkeeping (reading the loop position, grid and batch roles of the call; ending the call) becomes two
opaque ops whose Python runs at call time, so a compiled denoiser needs no graph break, ``fullgraph=True`` included.

Their order is data flow, which the compiler keeps: ``begin_forward`` returns an empty token tensor that every
``diffattn::attention_core`` of the forward takes as an input, and the forward's output tensor passes through
``end_forward`` (a copy), which the output depends on, so it runs after every core. The ops are tagged
``cudagraph_unsafe``: CUDA graph capture (``mode="reduce-overhead"``) leaves them out of the graph instead of replaying
the forward without their Python (step, records).

A forward's inputs reach ``begin_forward`` as the tensors among them plus, as a literal string, the constants (ints,
floats, bools, strings, ``None`` and tuples of them); other values (dicts of attention kwargs, tuples of tensors) are
left out: the model's token grid, timestep and batch are read from tensors and ints.
"""

from __future__ import annotations

import ast
import weakref
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ..errors import InterceptionError

if TYPE_CHECKING:
    from .model_hook import ModelStateHook

__all__ = ["ForwardOwner", "register_model_hook", "begin_forward", "end_forward", "ORDERED_OP_TAGS"]

#: Tags of every diffattn op that runs Python at call time: CUDA graph capture must not replay past it.
ORDERED_OP_TAGS = (torch.Tag.cudagraph_unsafe,)

_LIVE_MODEL_HOOKS: weakref.WeakValueDictionary[int, ModelStateHook] = weakref.WeakValueDictionary()


class ForwardOwner(Protocol):
    def begin_call(self, args: tuple, kwargs: dict) -> None: ...
    def end_call(self) -> None: ...  # noqa: E704


def register_model_hook(key: int, hook: ModelStateHook) -> None:
    _LIVE_MODEL_HOOKS[key] = hook


def _owner(key: int) -> ModelStateHook:
    owner = _LIVE_MODEL_HOOKS.get(key)
    if owner is None:
        raise InterceptionError(
            "the diffattn model hook was removed while a compiled model still calls it; call torch._dynamo.reset() "
            "(or recompile) after removing diffattn handles"
        )
    return owner


def _constant(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (tuple, list)) and all(_constant(v) for v in value)


@torch.library.custom_op("diffattn::begin_forward", mutates_args=(), tags=ORDERED_OP_TAGS)
def _begin_forward(tensors: list[Tensor], names: str, constants: str, hook: int) -> Tensor:
    """Begin the call of the model of hook ``hook`` with the inputs ``names`` (positional ones by index) =
    ``tensors``, plus the literal ``constants``."""
    values: dict[str, Any] = dict(zip(names.split(",") if names else [], tensors, strict=True))
    values.update(ast.literal_eval(constants))
    positional = sorted(int(n) for n in values if n.isdigit())
    args = tuple(values.get(str(i)) for i in range(positional[-1] + 1)) if positional else ()
    kwargs = {n: v for n, v in values.items() if not n.isdigit()}
    _owner(hook).begin_call(args, kwargs)
    return torch.empty(0, device=tensors[0].device if tensors else "cpu")


@_begin_forward.register_fake
def _(tensors, names, constants, hook):
    return torch.empty(0, device=tensors[0].device if tensors else "cpu")


@torch.library.custom_op("diffattn::end_forward", mutates_args=(), tags=ORDERED_OP_TAGS)
def _end_forward(output: Tensor, hook: int) -> Tensor:
    """End the call of hook ``hook``; ``output`` (the forward's output, which depends on every attention core of the
    forward) passes through as a copy."""
    _owner(hook).end_call()
    return output.clone()


@_end_forward.register_fake
def _(output, hook):
    return torch.empty_like(output)


def begin_forward(hook: int, args: tuple, kwargs: dict) -> Tensor:
    """Traced by torch.compile: the call's inputs go to ``diffattn::begin_forward``, run at call time; returns the
    token the forward's attention cores take."""
    names: list[str] = []
    tensors: list[Tensor] = []
    constants: dict[str, Any] = {}
    for name, value in [*((str(i), a) for i, a in enumerate(args)), *kwargs.items()]:
        if isinstance(value, Tensor):
            names.append(name)
            tensors.append(value)
        elif _constant(value):
            constants[name] = value
    return _begin_forward(tensors, ",".join(names), repr(constants), hook)


def end_forward(hook: int, output: Any) -> Any:
    """``output`` with its first tensor passed through ``diffattn::end_forward`` (tuples and diffusers' output
    classes are pytrees)."""
    leaves, spec = pytree.tree_flatten(output)
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, Tensor):
            leaves[i] = _end_forward(leaf, hook)
            return pytree.tree_unflatten(leaves, spec)
    raise InterceptionError(
        f"the compiled model returned no tensor ({type(output).__name__}); diffattn ends each forward on its output"
    )
