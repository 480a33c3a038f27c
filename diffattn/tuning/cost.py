"""What each candidate budget costs on this machine: :class:`CostProbe` times dense attention and the dynamic method
at every candidate top-k fraction on each layer's first call, so that :func:`~diffattn.tune` can drop key blocks
where they save time, not where they merely save blocks (the selection and the sparse loop have costs of their own,
and at a budget near 1 they cost more than the stock core)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from ..context import AttentionContext
from ..methods.base import AttentionMethod
from ..methods.dynamic_common import _ROLES
from .probe import CandidateProbe
from .profile import TunedProfile, dense_in, step_range

__all__ = ["CostProbe", "ProfileCostProbe", "relative_costs", "drop_unpaid_ranges"]


def _seconds(run: Callable[[], Tensor], repeats: int) -> float:
    """The least wall time of ``repeats`` runs (after one warm-up run)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


@dataclass(frozen=True)
class CostProbe(CandidateProbe):
    """Dense attention that, on the first call of each layer, also times the stock core and
    :class:`~diffattn.DynamicSparseAttention` at each of ``candidates`` (the same fraction for every head):
    ``seconds[layer]`` is ``(dense, candidate 0, candidate 1, ...)``, the least of ``repeats`` runs each. The stock
    core is timed as a profile of ``compute_dtype`` runs its dense heads (:func:`~.profile.dense_in`, casts
    included)."""

    repeats: int = 2
    seconds: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        if ctx.layer not in self.seconds:
            quiet = dataclasses.replace(ctx, report=lambda **metrics: None)
            times = [_seconds(lambda: dense_in(self.compute_dtype, q, k, v, ctx), self.repeats)]
            times += [_seconds(lambda m=m: m(q, k, v, quiet), self.repeats) for m in self._candidates]
            self.seconds[ctx.layer] = tuple(times)
        return ctx.dense(q, k, v)


def relative_costs(seconds: tuple[float, ...]) -> tuple[float, ...]:
    """Each candidate's time as a fraction of dense's (``seconds[0]``): ``0.4`` saves 60% of that layer's attention
    time, ``1.1`` is slower than the stock core."""
    dense = max(seconds[0], 1e-12)
    return tuple(s / dense for s in seconds[1:])


@dataclass(frozen=True)
class ProfileCostProbe(AttentionMethod):
    """Dense attention that, on the first call of each tuned layer in each step range, times the stock core and the
    profile's own call there (its heads split into dense and sparse ones, the selection, the gathers):
    ``seconds[(layer, range)]`` is ``(dense, profile)``, the least of ``repeats`` runs each. :class:`CostProbe` times
    each candidate with every head at one budget; a layer whose heads :func:`~diffattn.tune` split between budgets
    costs more than their weighted sum, and only this timing shows it."""

    profile: TunedProfile
    repeats: int = 2
    roles: frozenset[str] = field(default=_ROLES)
    seconds: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    requires_step = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "_method", self.profile.method())

    def validate(self, ctx: AttentionContext) -> None:
        self._method.validate(ctx)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        key = (ctx.layer, step_range(ctx, self.profile.step_ranges))
        if key not in self.seconds:
            quiet = dataclasses.replace(ctx, report=lambda **metrics: None)
            dtype = self._method._dtype
            self.seconds[key] = (
                _seconds(lambda: dense_in(dtype, q, k, v, ctx), self.repeats),
                _seconds(lambda: self._method(q, k, v, quiet), self.repeats),
            )
        return ctx.dense(q, k, v)


def drop_unpaid_ranges(profile: TunedProfile, seconds: dict) -> tuple[TunedProfile, list[tuple[str, int]]]:
    """``profile`` with every layer's step range that :class:`ProfileCostProbe` timed no faster than the stock core
    made dense (budgets 1.0, errors 0.0), and the ``(layer, range)`` pairs it changed. A range not timed is kept."""
    dropped: list[tuple[str, int]] = []
    layers = []
    for layer in profile.layers:
        budgets, errors = list(layer.budgets), list(layer.errors)
        for index, row in enumerate(layer.budgets):
            timed = seconds.get((layer.name, index))
            if timed is None or all(b >= 1.0 for b in row) or timed[1] < timed[0]:
                continue
            budgets[index] = tuple(1.0 for _ in row)
            errors[index] = tuple(0.0 for _ in row)
            dropped.append((layer.name, index))
        layers.append(dataclasses.replace(layer, budgets=tuple(budgets), errors=tuple(errors)))
    return dataclasses.replace(profile, layers=tuple(layers)), dropped
