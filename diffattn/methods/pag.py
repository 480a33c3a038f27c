"""Perturbed-attention guidance: :class:`PAG` and HeadHunter's :class:`SoftPAG` (see
:mod:`~diffattn.methods.perturbed` for what every perturbed-attention method shares).

* :class:`PAG`: the perturbed self-attention map is the identity, so each token's output is its own value row. In
  joint attention (``joint="image"``, the PAG paper's and diffusers' SD3 definition) only the image -> image block
  is the identity: an image query attends to itself and to the text keys, text queries are unchanged.
  ``joint="full"`` makes every row one-hot (output = V for text tokens too), like diffusers' guider-based PAG.
* :class:`SoftPAG` (HeadHunter): the map is interpolated toward the PAG map, A' = (1 - u) A + u I.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..context import AttentionContext
from .perturbed import PerturbedAttention, _replace

__all__ = ["PAG", "SoftPAG"]


def _expand_kv(x: Tensor, num_heads: int) -> Tensor:
    """Keys/values with as many heads as the queries (SDPA's ``enable_gqa`` grouping)."""
    if x.shape[1] == num_heads:
        return x
    return x.repeat_interleave(num_heads // x.shape[1], dim=1)


def _mask_rows(mask: Tensor | None, rows: Tensor, batch: int) -> Tensor | None:
    """The stock SDPA mask (broadcastable to ``(B, H, Sq, Skv)``) for the batch entries ``rows``, as 4-D."""
    if mask is None:
        return None
    mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    return mask.index_select(0, rows.to(mask.device)) if mask.shape[0] == batch and batch > 1 else mask


def _joint_identity(q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext, rows: Tensor) -> Tensor:
    """Visual rows of PAG's joint map: each visual query attends to its own key and to the text keys only.

    Equal to SDPA with the image -> image block set to -inf off its diagonal (diffusers' ``PAGJointAttnProcessor``),
    computed in O(N T) instead of O(N^2). Returns the visual rows, ``(len(rows), H, N_visual, D)``.
    """
    layout = ctx.q_layout
    vis, txt = layout.visual_slice, layout.text_slice
    qv, kv_, vv = q[:, :, vis], k[:, :, vis], v[:, :, vis]
    if layout.text_len == 0:
        return vv
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scale = ctx.scale if ctx.scale is not None else 1.0 / math.sqrt(q.shape[-1])
    qv, kv_, vv = qv.to(compute), kv_.to(compute), vv.to(compute)
    kt, vt = k[:, :, txt].to(compute), v[:, :, txt].to(compute)
    own = (qv * kv_).sum(-1, keepdim=True) * scale  # (b, H, Nv, 1)
    text = torch.matmul(qv, kt.transpose(-1, -2)) * scale  # (b, H, Nv, T)
    mask = _mask_rows(ctx.attn_mask, rows, len(ctx.batch_roles or ()))
    if mask is not None:
        visual_rows = mask if mask.shape[-2] == 1 else mask[..., vis, :]  # size-1 dims broadcast
        text_mask = visual_rows if mask.shape[-1] == 1 else visual_rows[..., txt]
        if text_mask.dtype == torch.bool:
            text = text.masked_fill(~text_mask, float("-inf"))
        else:
            text = text + text_mask.to(compute)
            diag = visual_rows if mask.shape[-1] == 1 else visual_rows[..., vis]
            diag = diag.expand(*diag.shape[:-2], layout.num_visual, layout.num_visual).diagonal(dim1=-2, dim2=-1)
            own = own + diag.unsqueeze(-1).to(compute)  # the token always sees itself (no boolean mask on it)
    weights = torch.softmax(torch.cat([own, text], dim=-1), dim=-1)
    out = weights[..., :1] * vv + torch.matmul(weights[..., 1:], vt)
    return out.to(q.dtype)


@dataclass(frozen=True, kw_only=True)
class PAG(PerturbedAttention):
    """Perturbed-attention guidance: the perturbed entries' self-attention map is the identity (output = V).

    ``joint``: on joint text + image attention, ``"image"`` (default; the PAG paper, diffusers' SD3 PAG) replaces
    only the image -> image block by the identity (image queries still read the text keys, text rows unchanged);
    ``"full"`` makes every row one-hot, text rows included.
    """

    joint: Literal["image", "full"] = "image"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.joint not in ("image", "full"):
            raise ValueError(f"{type(self).__name__}: joint must be 'image' or 'full', got {self.joint!r}")

    def _identity(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext, rows: Tensor, dense: Tensor) -> Tensor:
        """The PAG output of the entries ``rows`` (all heads); ``dense`` is the stock output of the whole batch."""
        v_rows = _expand_kv(v.index_select(0, rows), q.shape[1])
        if ctx.role != "joint" or self.joint == "full":
            return v_rows
        k_rows = _expand_kv(k.index_select(0, rows), q.shape[1])
        out = dense.index_select(0, rows).clone()  # text rows stay as the stock attention computed them
        out[:, :, ctx.q_layout.visual_slice] = _joint_identity(q.index_select(0, rows), k_rows, v_rows, ctx, rows)
        return out

    def _perturb(
        self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext, rows: Tensor, heads: Tensor | None
    ) -> Tensor:
        dense = ctx.dense(q, k, v)
        return _replace(dense, self._identity(q, k, v, ctx, rows, dense), rows, heads)


@dataclass(frozen=True, kw_only=True)
class SoftPAG(PAG):
    """HeadHunter's SoftPAG: the perturbed map is ``(1 - u) A + u I`` (I = PAG's map), so the perturbed entries'
    output is ``(1 - u) * attention + u * PAG``: ``u = 0`` is the stock attention, ``u = 1`` is PAG."""

    u: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        u = self.u
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0.0 <= u <= 1.0:
            raise ValueError(f"SoftPAG: u must be in [0, 1] (0 = no perturbation, 1 = PAG), got {u!r}")
        object.__setattr__(self, "u", float(u))

    @property
    def perturbs(self) -> bool:
        return self.scale > 0 and self.u > 0

    def _perturb(
        self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext, rows: Tensor, heads: Tensor | None
    ) -> Tensor:
        dense = ctx.dense(q, k, v)
        if self.u == 0.0:
            return dense
        pag = self._identity(q, k, v, ctx, rows, dense)
        if self.u < 1.0:
            pag = torch.lerp(dense.index_select(0, rows), pag, self.u)  # exact at both ends; linear in u
        return _replace(dense, pag, rows, heads)
