"""The custom op ``diffattn::attention_core``: under ``torch.compile`` an intercepted SDPA call becomes this op,
opaque to the compiler (no graph break), whose implementation runs the attention hook's chain eagerly at call time,
with the step, batch roles and records of that call. Ops take ints, not hooks: live hooks register under a key."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import InterceptionError
from .forward_ops import ORDERED_OP_TAGS

if TYPE_CHECKING:
    from .attention_hook import AttentionHook

__all__ = ["register_hook", "unregister_hook", "core_op"]

# key -> hook, for the custom op (ints are what an op can take); weak: a module's registry owns its hook, and a
# dropped model must not stay alive through this table
_LIVE_HOOKS: weakref.WeakValueDictionary[int, AttentionHook] = weakref.WeakValueDictionary()


def register_hook(key: int, hook: AttentionHook) -> None:
    _LIVE_HOOKS[key] = hook


def unregister_hook(key: int) -> None:
    _LIVE_HOOKS.pop(key, None)


@torch.library.custom_op("diffattn::attention_core", mutates_args=(), tags=ORDERED_OP_TAGS)
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
    token: Tensor | None = None,
    index: int = 1,
) -> Tensor:
    """The chain of diffattn methods of attention hook ``hook`` on one SDPA call, run eagerly (the compiled graph
    sees an opaque op; its Python runs with the current step, batch roles and records). ``index``: which SDPA call
    of the module's forward this is (1-based; IP-Adapter's image-prompt attention is a second call)."""
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
        ),
        index,
    )
    return out.contiguous().clone() if _aliases(out, (query, key, value)) else out.contiguous()


@_attention_core.register_fake
def _(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, hook, token=None, index=1):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def _aliases(out: Tensor, inputs: tuple[Tensor, ...]) -> bool:
    """Whether ``out`` shares storage with an input (a custom op's output must not alias its inputs)."""
    pointer = out.untyped_storage().data_ptr()
    return any(x.untyped_storage().data_ptr() == pointer for x in inputs)


def core_op(sdpa: Any, call: dict[str, Any], *, hook: int, token: Tensor | None, index: int) -> Tensor:
    """The intercepted SDPA ``call`` (the module's ``index``-th) as the custom op of attention hook ``hook``;
    ``token`` (from ``diffattn::begin_forward``) orders it after the forward's begin."""
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
        token,
        index,
    )
