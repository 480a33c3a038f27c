"""Attentive Eraser's attention activation suppression: :class:`AttentiveEraser`, which removes an object from the
``w`` branch of an erase batch (see :func:`diffattn.editing.erase`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ..context import AttentionContext
from ..errors import LayoutError
from .base import AttentionMethod
from .checks import check_bool, check_int, check_number, check_roles_arg, check_str, given
from .edit_branches import require_step
from .edit_masks import object_mask

__all__ = ["AttentiveEraser"]


@dataclass(frozen=True)
class AttentiveEraser(AttentionMethod):
    """Attentive Eraser's attention activation suppression (AAS), on the ``w`` branch of an erase batch (see
    :func:`diffattn.editing.erase`): every query's attention to the keys inside the object mask is removed, so the
    region is redrawn from the background; for the first ``ss_steps`` steps the queries inside the mask also see
    their logits scaled by ``ss_scale`` (similarity suppression: ``fg * m + bg * (1 - m)``; ``ss_steps`` counts the
    steps of the running call, which must be known). The mask (bool, or numbers with the object at values >= 0.5)
    is max-pooled to each layer's grid (a dilation, as the paper). A mask covering every key (or none) leaves the
    layer unchanged, so no row is ever fully masked. The ``wo`` branch is untouched. Self-attention of UNets (SD1.5
    tested).

    ``faithful``: the steps of similarity suppression. ``False`` (default): steps ``0 .. ss_steps - 1``
    (``ss_steps`` steps); ``True``: the authors' rule, steps ``0 .. ss_steps`` (their code suppresses while
    ``step <= ss_steps``: ``ss_steps + 1`` steps, 10 with their ``ss_steps=9``).
    """

    mask: Tensor | None = field(default=None, compare=False, repr=False)
    ss_steps: int = 9
    ss_scale: float = 0.3
    branch: str = "w"
    faithful: bool = False
    roles: frozenset[str] = field(default=frozenset({"self"}))
    stack_level: ClassVar[int] = 1
    requires_step: ClassVar[bool] = True  # similarity suppression for the first ss_steps steps
    requires_roles: ClassVar[bool] = True  # acts on the entries of the w branch

    def __post_init__(self) -> None:
        object.__setattr__(self, "roles", check_roles_arg(self.roles, self.name, frozenset({"self"})))
        check_number(self.name, "ss_scale", self.ss_scale, low=0.0, high=1.0, low_open=True, example=0.3)
        check_int(self.name, "ss_steps", self.ss_steps, minimum=0, example=9, meaning="a number of steps")
        check_str(self.name, "branch", self.branch, example="w")
        check_bool(self.name, "faithful", self.faithful, "True: suppress while step <= ss_steps, as the authors")
        if self.mask is not None and (not isinstance(self.mask, Tensor) or self.mask.ndim != 2):
            raise TypeError(
                f"{self.name}: mask is an H x W tensor (True on the object), got {given(self.mask)}; for an array "
                "use AttentiveEraser(...).with_mask(array)"
            )
        if not 0.0 < self.ss_scale <= 1.0:
            raise ValueError(f"{self.name}: ss_scale must be in (0, 1], got {self.ss_scale}")

    def with_mask(self, mask: object) -> AttentiveEraser:
        """This method with the object ``mask`` (H x W, True on the object — numeric masks at values >= 0.5 —, at any
        resolution)."""
        import dataclasses

        return dataclasses.replace(self, mask=object_mask(mask, self.name))

    def suppresses(self, step: int) -> bool:
        """Whether step ``step`` (0-based) runs similarity suppression: ``step < ss_steps``, or with ``faithful``
        the authors' ``step <= ss_steps``."""
        return step <= self.ss_steps if self.faithful else step < self.ss_steps

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        step, _ = require_step(ctx, self.name)
        out = ctx.dense(q, k, v)
        if self.mask is None:
            raise LayoutError(
                f"{self.name} on {ctx.layer}: no object mask; use diffattn.editing.erase(pipe, image, "
                "mask) or AttentiveEraser().with_mask(mask)"
            )
        if ctx.branches is None:
            raise LayoutError(
                f"{self.name} on {ctx.layer}: needs the erase batch's branches ('wo', 'w'); use diffattn.editing.erase"
            )
        rows = [i for i, b in enumerate(ctx.branches) if b == self.branch]
        if not rows:
            raise LayoutError(
                f"{self.name} on {ctx.layer}: acts on the {self.branch!r} branch, but this call's branches are "
                f"{ctx.branches}; use diffattn.editing.erase (branches 'wo', 'w') or set branch=..."
            )
        grid = ctx.kv_layout.grid
        if len(grid) != 2:
            return out
        pooled = torch.nn.functional.adaptive_max_pool2d(self.mask.float()[None, None], grid)[0, 0] > 0.5
        inside = pooled.flatten().to(q.device)
        if bool(inside.all()) or not bool(inside.any()):
            return out
        index = torch.tensor(rows, device=q.device)
        qw, kw, vw = (x.index_select(0, index) for x in (q, k, v))
        allowed = ~inside[None, None, None, :]  # every query: no key inside the object
        scale = ctx.scale
        bg = torch.nn.functional.scaled_dot_product_attention(qw, kw, vw, attn_mask=allowed, scale=scale)
        if self.suppresses(step):
            fg = torch.nn.functional.scaled_dot_product_attention(
                qw * self.ss_scale, kw, vw, attn_mask=allowed, scale=scale
            )
            m = inside[None, None, :, None].to(bg.dtype)
            bg = fg * m + bg * (1 - m)
        out = out.clone()
        out[index] = bg.to(out.dtype)
        return out
