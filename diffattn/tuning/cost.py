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
from .probe import CandidateProbe
from .profile import dense_in

__all__ = ["CostProbe", "relative_costs"]


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
