"""Token downsampling: :class:`TokenDownsampling` (ToDo), full-resolution queries attending to keys and values
pooled over the grid."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..context import AttentionContext
from ..patterns.dynamic import POOL_MODES, pool_grid
from .base import AttentionMethod
from .checks import check_number, check_roles_arg, given
from .dynamic_common import _ROLES, _check_call
from .sparse import config_error, text_padding_per_batch

__all__ = ["TokenDownsampling"]


@dataclass(frozen=True)
class TokenDownsampling(AttentionMethod):
    """ToDo (token downsampling): queries at full resolution attend to keys and values downsampled by ``factor``
    on the token grid (each frame of a video separately). Cheap and training-free; meant for UNets at high
    resolution.

    As the original, the factor depends on the resolution level of the call: ``factor`` at the model's highest
    resolution, ``factor_level_2`` at half of it (default 1: untouched), none below; so SDXL, whose top level has no
    attention, is untouched with the defaults. Downsampling stops once ``t / 1000 <= timestep_threshold_stop``
    (``t`` the model's timestep on the 0..1000 scale; 0 = never stops). ``mode`` (see
    :func:`~diffattn.patterns.dynamic.pool_grid`): ``"nearest-exact"`` (default, the authors' library default:
    ``F.interpolate`` to ``floor(h / factor) x floor(w / factor)``) or ``"nearest"`` (the authors' demo app);
    diffattn's ``"avg"`` / ``"max"`` (its earlier default: the mean / max of each ``factor x factor`` cell, ``ceil``
    sizes with smaller border cells) or ``"top-left"`` (each cell's first token). Text tokens of joint attention
    are kept. Where the factor is 1 the stock attention runs unchanged (bitwise).
    """

    factor: int = 2
    factor_level_2: int = 1
    mode: str = "nearest-exact"
    timestep_threshold_stop: float = 0.0
    roles: frozenset[str] = field(default=_ROLES)

    def __post_init__(self) -> None:
        object.__setattr__(self, "roles", check_roles_arg(self.roles, self.name, _ROLES))
        for name in ("factor", "factor_level_2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: {name} is a positive int (1 = no downsampling), got {value!r}")
        if not isinstance(self.mode, str) or self.mode not in POOL_MODES:
            raise ValueError(
                f"{self.name}: mode is one of {POOL_MODES} (default 'nearest-exact', the authors'), got "
                f"{given(self.mode)}"
            )
        stop = check_number(
            self.name,
            "timestep_threshold_stop",
            self.timestep_threshold_stop,
            low=0.0,
            high=1.0,
            example=0.5,
            meaning="t/1000 (0 = never stop)",
        )
        object.__setattr__(self, "timestep_threshold_stop", stop)

    def level(self, ctx: AttentionContext) -> int:
        """1 at the model's highest resolution, 2 at half of it, and so on (from the call's and input's grids)."""
        grid, base = ctx.q_layout.grid, ctx.input_grid
        if not base or len(base) != len(grid):
            return 1
        ratio = math.prod(base) / max(math.prod(grid), 1)
        return 1 + max(0, round(math.log2(max(ratio, 1.0)) / len(grid)))

    def validate(self, ctx: AttentionContext) -> None:
        """Refuse a factor that pools every frame of this layer into one key token (its cells cover the frame), or,
        with the interpolating modes (``floor`` sizes), into none on its shorter side."""
        grid, level = ctx.kv_layout.grid, self.level(ctx)
        factor = {1: self.factor, 2: self.factor_level_2}.get(level, 1)
        if factor <= 1 or len(grid) < 2:
            return
        name = "factor" if level == 1 else "factor_level_2"
        if factor >= max(grid[-2:]):
            raise config_error(
                self.name,
                ctx,
                f"{name}={factor} pools each {grid[-2]}x{grid[-1]} frame into a single key token",
                f"use {name} < {max(grid[-2:])} (ToDo uses 2 to 4 at high resolution) or apply it to "
                "higher-resolution layers (layers=...)",
            )
        if self.mode in ("nearest-exact", "nearest") and factor > min(grid[-2:]):
            raise config_error(
                self.name,
                ctx,
                f"{name}={factor} with mode={self.mode!r} keeps floor({min(grid[-2:])} / {factor}) = 0 "
                f"rows or columns of each {grid[-2]}x{grid[-1]} frame",
                f"use {name} <= {min(grid[-2:])}, mode='avg' (ceil sizes), or apply it to higher-resolution layers "
                "(layers=...)",
            )

    def factor_for(self, ctx: AttentionContext) -> int:
        if ctx.timestep is not None and ctx.timestep / 1000.0 <= self.timestep_threshold_stop:
            return 1
        return {1: self.factor, 2: self.factor_level_2}.get(self.level(ctx), 1)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        _check_call(self.name, ctx)
        factor = self.factor_for(ctx)
        grid = ctx.kv_layout.grid
        if factor == 1 or len(grid) < 2:
            ctx.report(density=1.0, selection_seconds=0.0)
            return ctx.dense(q, k, v)
        start = time.perf_counter()
        layout = ctx.kv_layout
        mask = None
        if ctx.attn_mask is not None:  # only key padding of trailing text tokens (else refused)
            paddings = text_padding_per_batch(ctx.attn_mask, layout, q.shape[0], ctx.layer)
        pooled = [pool_grid(x[:, :, layout.visual_slice], grid, factor, self.mode)[0] for x in (k, v)]
        m_vis = pooled[0].shape[-2]
        if layout.text_len:
            text = [x[:, :, layout.text_slice] for x in (k, v)]
            parts = [(t, p) if layout.text_first else (p, t) for p, t in zip(pooled, text)]
            pooled = [torch.cat(pair, dim=-2) for pair in parts]
            if ctx.attn_mask is not None:
                keep = torch.ones(q.shape[0], m_vis + layout.text_len, dtype=torch.bool, device=q.device)
                text0 = 0 if layout.text_first else m_vis
                for b, pad in enumerate(paddings):
                    if pad:
                        keep[b, text0 + layout.text_len - pad : text0 + layout.text_len] = False
                mask = keep.view(q.shape[0], 1, 1, -1)
        kp, vp = pooled
        selected = time.perf_counter()
        out = torch.nn.functional.scaled_dot_product_attention(
            q, kp, vp, attn_mask=mask, scale=ctx.scale, enable_gqa=ctx.enable_gqa
        )
        ctx.report(
            density=kp.shape[-2] / k.shape[-2],
            selection_seconds=selected - start,
            attention_seconds=time.perf_counter() - selected,
        )
        return out
