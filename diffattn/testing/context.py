"""An :class:`~diffattn.AttentionContext` for calling a method directly on q, k, v (benchmarks, experiments, tests),
outside a pipeline: self-attention over ``layout``, dense attention as ``ctx.dense``, reports collected in a dict."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from ..context import AttentionContext
from ..layout import TokenLayout

__all__ = ["standalone_context"]


def standalone_context(
    layout: TokenLayout,
    *,
    step: int = 0,
    num_steps: int | None = None,
    layer: str = "bench",
    batch_roles: Any = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    **fields: Any,
) -> tuple[AttentionContext, dict]:
    """``(ctx, reports)``: a context for ``method(q, k, v, ctx)`` at ``step`` of ``num_steps`` on ``layer``, and the
    dict that collects what the method reports (``ctx.report(density=...)``). ``ctx.dense`` is SDPA with
    ``attn_mask`` and ``scale``; ``fields`` sets the context's other fields (``timestep=``, ``input_grid=``,
    ``head_offset=`` and ``total_heads=`` as under context parallelism, ...)."""
    reports: dict = {}

    def dense(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)

    ctx = AttentionContext(
        layer=layer,
        role="joint" if layout.text_len else "self",
        step=step,
        num_steps=num_steps,
        q_layout=layout,
        kv_layout=layout,
        batch_roles=batch_roles,
        attn_mask=attn_mask,
        scale=scale,
        enable_gqa=False,
        dense=dense,
        report=lambda **metrics: reports.update(metrics),
        **fields,
    )
    return ctx, reports
