"""``Dense``: the stock attention computation, unchanged (the control for every other method)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

from ..context import ROLES, AttentionContext
from .base import AttentionMethod
from .checks import check_roles_arg

__all__ = ["Dense"]


@dataclass(frozen=True)
class Dense(AttentionMethod):
    """Runs the stock attention core with its original arguments: outputs are bitwise those of the stock model."""

    roles: frozenset[str] = field(default=ROLES)
    position_free: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "roles", check_roles_arg(self.roles, "Dense"))

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        return ctx.dense(q, k, v)
