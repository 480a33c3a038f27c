"""The sensitivity probe :func:`~diffattn.tune` applies: it returns dense attention (the pipeline runs as stock)
and measures, per layer, step range and head, the relative L1 error of each candidate budget's output."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..context import AttentionContext
from ..errors import MethodConfigError
from ..methods.base import AttentionMethod
from ..methods.dynamic_common import _ROLES
from ..methods.dynamic_sparse import DynamicSparseAttention
from .profile import step_range

__all__ = ["CandidateProbe", "SensitivityProbe", "relative_l1_per_head"]


def relative_l1_per_head(out: Tensor, dense: Tensor) -> Tensor:
    """``sum |out - dense| / sum |dense|`` per head of ``(B, H, L, D)`` outputs, in float64."""
    num = (out.double() - dense.double()).abs().sum(dim=(0, 2, 3))
    den = dense.double().abs().sum(dim=(0, 2, 3)).clamp_min(torch.finfo(torch.float64).tiny)
    return num / den


@dataclass(frozen=True)
class CandidateProbe(AttentionMethod):
    """Dense attention beside :class:`~diffattn.DynamicSparseAttention` at each of ``candidates`` (top-k fractions,
    ``block_size``, ``tile``, ``compute_dtype``): the base of the probes :func:`~diffattn.tune` applies."""

    candidates: tuple[float, ...]
    block_size: int = 128
    tile: object = "auto"
    roles: frozenset[str] = field(default=_ROLES)
    compute_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        methods = tuple(
            DynamicSparseAttention(
                topk=c,
                block_size=self.block_size,
                tile=self.tile,
                roles=self.roles,
                compute_dtype=self.compute_dtype,
            )
            for c in self.candidates
        )
        object.__setattr__(self, "_candidates", methods)

    def validate(self, ctx: AttentionContext) -> None:
        for method in self._candidates:
            method.validate(ctx)


@dataclass(frozen=True)
class SensitivityProbe(CandidateProbe):
    """Dense attention that also runs :class:`~diffattn.DynamicSparseAttention` at each of ``candidates`` (top-k
    fractions) and adds each head's relative L1 error to ``sums[(layer, range)]`` (``(len(candidates), heads)``),
    ``counts[(layer, range)]`` calls; ``grids[layer]`` is the layer's visual token grid."""

    step_ranges: int = 2
    sums: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    counts: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    grids: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    requires_step = True

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        if ctx.total_heads not in (None, q.shape[1]):
            raise MethodConfigError(
                f"tuning sees {q.shape[1]} of {ctx.total_heads} heads at {ctx.layer}: tune without context "
                "parallelism, then apply the profile under it"
            )
        dense = ctx.dense(q, k, v)
        quiet = dataclasses.replace(ctx, report=lambda **metrics: None)
        errors = torch.stack([relative_l1_per_head(m(q, k, v, quiet), dense) for m in self._candidates])
        key = (ctx.layer, step_range(ctx, self.step_ranges))
        self.sums[key] = self.sums.get(key, 0) + errors
        self.counts[key] = self.counts.get(key, 0) + 1
        self.grids[ctx.layer] = tuple(ctx.q_layout.grid)
        return dense
