"""The method interface: ``(q, k, v, ctx) -> out`` on the SDPA layout ``(B, H, S, D)``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..context import ROLES, AttentionContext

__all__ = ["AttentionMethod", "check_roles"]


SELF_AND_JOINT = frozenset({"self", "joint"})


def check_roles(roles: Iterable[str], owner: str, allowed: frozenset[str] = ROLES) -> frozenset[str]:
    """``roles`` as a frozenset, checked against the known roles and the ones ``owner`` can act on."""
    roles = frozenset(roles)
    unknown = roles - ROLES
    if unknown or not roles:
        raise ValueError(f"{owner}: roles must be a non-empty subset of {sorted(ROLES)}, got {sorted(roles)}")
    if not roles <= allowed:
        names = " and ".join(r for r in ("self", "cross", "joint") if r in allowed)
        raise ValueError(f"{owner} acts on {names} attention only, got roles {sorted(roles)}")
    return roles


def _not_a_processor(method: object) -> TypeError:
    name = type(method).__name__
    return TypeError(
        f"{name} is a diffattn method, not a diffusers attention processor. Either apply it: "
        f"diffattn.apply(pipe, {name}(...)), or install processors that run it: "
        f"model.set_attn_processor(diffattn.processors(model, {name}(...)))"
    )


def _guarded(call: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``call`` refusing to run as a diffusers processor (called with the attention module first)."""

    @functools.wraps(call)
    def guarded(self: AttentionMethod, *args: Any, **kwargs: Any) -> Tensor:
        if (args and isinstance(args[0], torch.nn.Module)) or "encoder_hidden_states" in kwargs:
            raise _not_a_processor(self)
        return call(self, *args, **kwargs)

    guarded.diffattn_guarded = True  # type: ignore[attr-defined]
    return guarded


class AttentionMethod:
    """Base class of attention methods. Subclasses are frozen dataclasses with a ``roles`` field.

    ``roles`` says which attention calls the method acts on by default: ``"self"`` (visual tokens only),
    ``"cross"`` (visual queries, text keys) and ``"joint"`` (text and visual tokens in one sequence).

    ``stack_level``: where the method sits when several applications act on one attention call (see
    :mod:`diffattn.runtime`); the innermost method's ``ctx.dense`` is the stock attention core.

    ``position_free``: the output for a query depends on the q/k/v values only, never on where tokens sit (``Dense``).
    Under context parallelism such a method also runs on calls that hold only this rank's queries, and gets joint
    sequences in the order diffusers gathered them (no reordering to the layout's order).
    """

    roles: frozenset[str]
    position_free: ClassVar[bool] = False
    # Place in a stack of applications on one attention module: lower runs outside (its ctx.dense calls the next).
    # 0: batch-expanding guidance, 1: editing, 2: kernel-level methods (sparse, masked, dense).
    stack_level: ClassVar[int] = 2
    # Methods that need extra batch entries (guidance) are applied with diffattn.guidance.enable, never apply().
    expands_batch: ClassVar[bool] = False
    # Facts the method cannot act without. When one is unknown for a call, the runtime raises StepSelectionError
    # (step) or LayoutError (roles) saying how to declare it; the method never picks a default in its place.
    requires_step: ClassVar[bool] = False  # ctx.step and ctx.num_steps
    requires_roles: ClassVar[bool] = False  # ctx.batch_roles

    #: The token grids the method can act on: ``"video"`` (frames, height, width), ``"image"`` (height, width),
    #: ``"sequence"`` (one axis). ``diffattn.inspect`` lists a method for a layer when its role and grid fit.
    grid_kinds: ClassVar[frozenset[str]] = frozenset({"video", "image", "sequence"})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        call = cls.__dict__.get("__call__")
        if call is not None and not getattr(call, "diffattn_guarded", False):
            cls.__call__ = _guarded(call)  # set as a processor by mistake: a clear error, not a TypeError on kwargs

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        raise NotImplementedError

    def validate(self, ctx: AttentionContext) -> None:
        """Check the method's parameters against this call's token layouts (``ctx.q_layout``, ``ctx.kv_layout``).

        The runtime calls it once per (layer, layouts) before the method's first call there; raise
        :class:`~diffattn.errors.MethodConfigError` naming ``ctx.layer``, the grid and the fix. The default accepts
        every layout.
        """

    def release(self, application_id: int) -> None:
        """Forget what the method keeps for the application ``application_id`` (``ctx.application_id``): called when
        that application is removed. The default keeps nothing."""

    @property
    def name(self) -> str:
        return type(self).__name__
