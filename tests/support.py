"""Helpers several test rooms share (``tests/`` is on ``sys.path`` through pytest's ``pythonpath`` setting)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffattn.context import AttentionContext


def make_ctx(
    layout, *, step=0, batch_roles=None, attn_mask=None, timestep=None, input_grid=None, scale=None, layer="layer"
):
    metrics = {}

    def dense(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)

    ctx = AttentionContext(
        layer=layer,
        role="joint" if layout.text_len else "self",
        step=step,
        num_steps=None,
        q_layout=layout,
        kv_layout=layout,
        batch_roles=batch_roles,
        attn_mask=attn_mask,
        scale=scale,
        enable_gqa=False,
        dense=dense,
        report=lambda **m: metrics.update(m),
        timestep=timestep,
        input_grid=input_grid,
    )
    return ctx, metrics


def qkv(batch, heads, n, dim=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, dim, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]
