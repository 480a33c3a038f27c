"""An :class:`~diffattn.AttentionContext` for calling a method directly on q, k, v (benchmarks, experiments), outside
a pipeline: self-attention over ``layout``, dense attention as ``ctx.dense``, reports collected in a dict."""

from __future__ import annotations

import torch.nn.functional as F

from ..context import AttentionContext
from ..layout import TokenLayout

__all__ = ["standalone_context"]


def standalone_context(
    layout: TokenLayout, *, step: int = 0, num_steps: int | None = None, layer: str = "bench"
) -> tuple[AttentionContext, dict]:
    """``(ctx, reports)``: a context for ``method(q, k, v, ctx)`` at ``step`` of ``num_steps`` on ``layer``, and the
    dict that collects what the method reports (``ctx.report(density=...)``)."""
    reports: dict = {}
    ctx = AttentionContext(
        layer=layer,
        role="joint" if layout.text_len else "self",
        step=step,
        num_steps=num_steps,
        q_layout=layout,
        kv_layout=layout,
        batch_roles=None,
        attn_mask=None,
        scale=None,
        enable_gqa=False,
        dense=F.scaled_dot_product_attention,
        report=lambda **metrics: reports.update(metrics),
    )
    return ctx, reports
