"""Float64 dense masked attention: the oracle every other kernel is tested against.

Layout follows ``torch.nn.functional.scaled_dot_product_attention``: q ``(B, H, Sq, D)``, k ``(B, Hkv, Skv, D)``,
v ``(B, Hkv, Skv, Dv)``. ``mask`` is boolean (True = may attend) and ``bias`` additive, both broadcastable to
``(B, H, Sq, Skv)``.

A query row whose keys are all masked has no defined softmax. Here it is defined as output 0 and log-sum-exp
``-inf`` (never NaN, and never the silent uniform average that a ``finfo.min`` fill would give).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["reference_attention", "merge_attention"]


def _expand_kv_heads(x: Tensor, num_heads: int) -> Tensor:
    if x.shape[1] == num_heads:
        return x
    if num_heads % x.shape[1]:
        raise ValueError(
            f"query has {num_heads} heads but key/value have {x.shape[1]}; grouped-query attention needs the query "
            "head count to be a multiple of the key/value head count."
        )
    return x.repeat_interleave(num_heads // x.shape[1], dim=1)


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Return ``(out, lse)``: ``out`` in q's dtype, ``lse`` float64 of shape ``(B, H, Sq)`` (natural log)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"expected 4-D (B, H, S, D) tensors, got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    num_heads = q.shape[1]
    q64 = q.to(torch.float64)
    k64 = _expand_kv_heads(k, num_heads).to(torch.float64)
    v64 = _expand_kv_heads(v, num_heads).to(torch.float64)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q64, k64.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.to(torch.float64)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be boolean (True = may attend), got {mask.dtype}; pass float masks as bias=")
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    empty = torch.isneginf(lse)
    probs = torch.exp(scores - torch.where(empty, 0.0, lse).unsqueeze(-1))
    out = torch.matmul(probs, v64)
    out = out.masked_fill(empty.unsqueeze(-1), 0.0)
    return out.to(q.dtype), lse


def merge_attention(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Merge attention computed over disjoint key sets by their log-sum-exp.

    ``parts`` holds ``(out, lse)`` pairs with ``out`` ``(B, H, Sq, Dv)`` and ``lse`` ``(B, H, Sq)``; the result equals
    attention over the union of the key sets. Rows empty in every part stay 0 with lse ``-inf``.
    """
    if not parts:
        raise ValueError("merge_attention needs at least one (out, lse) pair")
    lses = torch.stack([lse.to(torch.float64) for _, lse in parts])
    total = torch.logsumexp(lses, dim=0)
    safe_total = torch.where(torch.isneginf(total), 0.0, total)
    out = sum(torch.exp(lse.to(torch.float64) - safe_total).unsqueeze(-1) * o.to(torch.float64) for o, lse in parts)
    return out.to(parts[0][0].dtype), total
