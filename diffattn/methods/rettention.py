"""Re-ttention: :class:`Rettention`, sparse attention whose softmax mass and missing part are calibrated against
dense attention every few steps and corrected in between. Shared machinery: :mod:`~diffattn.methods.dynamic_common`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

import diffattn_kernels as kernels

from ..context import AttentionContext
from ..errors import MethodConfigError
from .base import AttentionMethod
from .checks import check_int, check_number, check_roles_arg
from .dynamic_common import (
    _ROLES,
    _call_key,
    _check_call,
    _evict_finished,
    _finite_or_report,
    _new_generation,
    _Plan,
    _release_application,
    _scale,
)
from .dynamic_sparse import DynamicSparseAttention
from .sparse import SparseAttention, text_padding_per_batch

__all__ = ["Rettention"]


def _run_plans(
    q: Tensor, k: Tensor, v: Tensor, plans: list[_Plan], scale: float, backend: str, need_lse: bool
) -> tuple[Tensor, Tensor | None]:
    """Attention of every plan's batch rows, back in sequence order: ``(out, lse)`` (lse float32 or None)."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device) if need_lse else None
    for plan in plans:
        qk, kk, vk = plan.queries(q), plan.keys(k), plan.keys(v)
        o, l = kernels.attention(qk, kk, vk, plan.block_mask, scale=scale, backend=backend, return_lse=need_lse)
        out[plan.rows] = plan.output(o)
        if need_lse:
            lse[plan.rows] = plan.output(l)
    return out, lse


@dataclass
class _Calibration:
    plans: list[_Plan]
    ratio: Tensor  # (B, H, S) float32: sparse softmax mass / dense softmax mass, per query
    residual: Tensor  # (B, H, S, Dv) float32: dense output - ratio * sparse output
    calibrated_step: int
    last_step: int
    timestep: float | None


@dataclass(frozen=True)
class Rettention(AttentionMethod):
    """Re-ttention: sparse attention with its softmax renormalised to the dense one.

    At a calibration step it computes dense and sparse (``base``) attention together and caches, per query and
    head, the ratio ``r`` of the sparse softmax mass to the dense one (``exp(lse_sparse - lse_dense)``) and the
    residual ``R = dense - r · sparse`` (the part the sparse keys miss); it returns the dense output. At the
    following steps it computes only the sparse attention, with the same block mask, and returns
    ``r · sparse + R``: the sparse softmax rescaled to the dense denominator plus the cached rest. It recalibrates
    every ``calibrate_every`` steps, at step 0 and whenever a new generation starts (the step goes back or the
    timestep up). ``ratio_drift`` adds to ``r`` per step since calibration (the original uses 0.04 on CogVideoX),
    never beyond 1.

    ``base``: a static sparse method (``SlidingTileAttention``, ``SlidingWindowAttention``, ...) or
    :class:`DynamicSparseAttention`, whose selection is then made at calibration and kept until the next one (no
    selection cost in between). Use ``diffattn.apply(..., steps=...)`` for the dense warm-up (the original: 5 steps).

    State: the cache lives on this instance, one entry per (application, layer, batch roles or size, shape, heads
    slice, call order within the step): a residual as large as the layer's attention output. One instance applied to
    a pipeline with two denoisers (Wan 2.2) keeps one cache per denoiser. When a layer starts a new generation, the
    entries of the finished one go (another resolution's included), so the cache holds one generation's; removing an
    application drops its entries.
    """

    base: AttentionMethod = field(default_factory=lambda: DynamicSparseAttention(topk=0.1))
    calibrate_every: int = 5
    ratio_drift: float = 0.0
    roles: frozenset[str] = field(default=_ROLES)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _calls: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "roles", check_roles_arg(self.roles, self.name, _ROLES))
        if not isinstance(self.base, (SparseAttention, DynamicSparseAttention)):
            raise TypeError(
                f"{self.name}: base must be a static sparse method (e.g. SlidingTileAttention) or "
                f"DynamicSparseAttention, got {type(self.base).__name__}"
            )
        check_int(self.name, "calibrate_every", self.calibrate_every, minimum=1, example=5, meaning="a number of steps")
        drift = check_number(
            self.name, "ratio_drift", self.ratio_drift, low=0.0, example=0.04, meaning="the ratio's drift per step"
        )
        object.__setattr__(self, "ratio_drift", drift)

    def validate(self, ctx: AttentionContext) -> None:
        self.base.validate(ctx)

    def reset(self) -> None:
        """Forget every calibration (the next call of each layer calibrates)."""
        self._cache.clear()
        self._calls.clear()

    def release(self, application_id: int) -> None:
        _release_application(self._cache, self._calls, application_id)

    def _base_plans(self, q: Tensor, k: Tensor, ctx: AttentionContext) -> list[_Plan]:
        if isinstance(self.base, DynamicSparseAttention):
            return self.base.plans(q, k, ctx)
        base = self.base
        _check_call(self.name, ctx)
        paddings = text_padding_per_batch(ctx.attn_mask, ctx.q_layout, q.shape[0], ctx.layer)
        pattern = base.pattern_for_heads(ctx, q.shape[1])
        plans = []
        for pad in sorted(set(paddings)):
            rows = [b for b, p in enumerate(paddings) if p == pad]
            sel = slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else rows
            c = base.compiled(ctx, pad, q.device, pattern)
            plans.append(_Plan(sel, c.gather, c.scatter, c.block_mask, c.density))
        return plans

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        if ctx.step is None:
            raise MethodConfigError(
                f"{self.name} on {ctx.layer}: calibration follows the denoising steps, but this call's step is unknown "
                "(the model was not called from a diffusers pipeline). Wrap each call in "
                "diffattn.denoising_step(i, num_steps)."
            )
        key = _call_key(self._calls, q, v, ctx)
        state = self._cache.get(key)
        new_generation = _new_generation(state, ctx)
        calibrate = (
            state is None or new_generation or ctx.step == 0 or ctx.step - state.calibrated_step >= self.calibrate_every
        )
        scale = _scale(ctx, q)
        backend = getattr(self.base, "backend", "auto")
        start = time.perf_counter()
        if calibrate:
            if state is None or new_generation:
                _evict_finished(self._cache, self._calls, key[:2], ctx.step)
            plans = self._base_plans(q, k, ctx)
            selected = time.perf_counter()
            sparse, lse_sparse = _run_plans(q, k, v, plans, scale, backend, need_lse=True)
            dense, lse_dense = kernels.dense_attention(q, k, v, attn_mask=ctx.attn_mask, scale=scale)
            ratio = torch.exp(lse_sparse - lse_dense).clamp(max=1.0).nan_to_num(1.0)
            residual = dense.float() - ratio.unsqueeze(-1) * sparse.float()
            self._cache[key] = _Calibration(plans, ratio, residual, ctx.step, ctx.step, ctx.timestep)
            density = 1.0 + sum(p.density for p in plans) / len(plans)
            ctx.report(
                density=density,
                selection_seconds=selected - start,
                attention_seconds=time.perf_counter() - selected,
                calibration=1.0,
            )
            return _finite_or_report(dense, q, k, v, ctx, self.name)
        sparse, _ = _run_plans(q, k, v, state.plans, scale, backend, need_lse=False)
        ratio = state.ratio
        if self.ratio_drift:
            ratio = (ratio + self.ratio_drift * (ctx.step - state.calibrated_step)).clamp(max=1.0)
        state.last_step, state.timestep = ctx.step, ctx.timestep
        out = (ratio.unsqueeze(-1) * sparse.float() + state.residual).to(q.dtype)
        ctx.report(
            density=sum(p.density for p in state.plans) / len(state.plans),
            selection_seconds=0.0,
            attention_seconds=time.perf_counter() - start,
            calibration=0.0,
        )
        return _finite_or_report(out, q, k, v, ctx, self.name)
