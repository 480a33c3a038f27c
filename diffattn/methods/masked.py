"""``Masked``: attention restricted by a user mask function over the token layout, computed by the reference kernel."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffattn_kernels.reference import reference_attention

from ..context import ROLES, AttentionContext
from ..errors import MethodConfigError
from .base import AttentionMethod
from .checks import check_roles_arg

__all__ = ["Masked", "MaskMod", "stock_mask_parts"]

MaskMod = Callable[[Tensor, Tensor, AttentionContext], Tensor]


def stock_mask_parts(attn_mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Split an SDPA ``attn_mask`` into (boolean mask, additive bias)."""
    if attn_mask is None:
        return None, None
    if attn_mask.dtype == torch.bool:
        return attn_mask, None
    return None, attn_mask


@dataclass(frozen=True)
class Masked(AttentionMethod):
    """Attention where query ``i`` may see key ``j`` only if ``mask_mod(i, j, ctx)`` is True.

    ``mask_mod`` gets index tensors ``q_idx`` of shape ``(Sq, 1)`` and ``kv_idx`` of shape ``(1, Skv)`` plus the
    call's context (use ``ctx.q_layout`` / ``ctx.kv_layout`` to tell text from visual tokens and to get grid
    coordinates) and returns a boolean tensor broadcastable to ``(B, H, Sq, Skv)``. The stock call's own mask still
    applies. Rows left with no key give 0 (see ``diffattn_kernels.reference``). Computed in float64: for checking
    layouts and prototyping masks, not for speed. A mask of another shape or dtype is refused before any attention
    (:class:`~diffattn.errors.MethodConfigError` naming the layer and its layouts).
    """

    mask_mod: MaskMod
    roles: frozenset[str] = field(default=ROLES)

    def __post_init__(self) -> None:
        if not callable(self.mask_mod):
            raise TypeError("Masked(mask_mod): mask_mod must be a function (q_idx, kv_idx, ctx) -> bool tensor")
        object.__setattr__(self, "roles", check_roles_arg(self.roles, "Masked"))

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        q_idx = torch.arange(q.shape[-2], device=q.device).unsqueeze(1)
        kv_idx = torch.arange(k.shape[-2], device=q.device).unsqueeze(0)
        user = self.mask_mod(q_idx, kv_idx, ctx)
        full = (q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])
        if (
            not isinstance(user, Tensor)
            or user.dtype != torch.bool
            or user.ndim > 4
            or any(n not in (1, m) for n, m in zip(reversed(user.shape), reversed(full)))
        ):
            got = f"a {tuple(user.shape)} {user.dtype} tensor" if isinstance(user, Tensor) else type(user).__name__
            raise MethodConfigError(
                f"Masked on layer {ctx.layer} ({ctx.role} attention; queries: {ctx.q_layout.describe()}, keys: "
                f"{ctx.kv_layout.describe()}): mask_mod returned {got}, but it must be a boolean tensor (True = may "
                f"attend) broadcastable to (batch, heads, queries, keys) = {full}. Fix: build it from the q_idx "
                f"({full[2]}, 1) and kv_idx (1, {full[3]}) it is given, e.g. q_idx >= kv_idx, not from fixed sizes"
            )
        stock_mask, bias = stock_mask_parts(ctx.attn_mask)
        mask = user if stock_mask is None else user & stock_mask
        out, _ = reference_attention(q, k, v, mask=mask, bias=bias, scale=ctx.scale)
        return out
