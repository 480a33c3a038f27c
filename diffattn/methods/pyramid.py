"""Pyramid sparse attention: :class:`PyramidSparseAttention` (PSA), which instead of dropping a key block attends
to a 2x / 4x / 8x pooled copy of it according to its score band. Shared machinery:
:mod:`~diffattn.methods.dynamic_common`."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

import diffattn_kernels as kernels

from ..context import AttentionContext
from ..patterns.compile import KernelOrder, relation_block_mask
from ..patterns.dynamic import PYRAMID_LEVELS, block_order, pyramid_levels, selection_block_mask
from .base import AttentionMethod
from .checks import check_number, given
from .dynamic_common import (
    _ROLES,
    _check_call,
    _check_common,
    _finite_or_report,
    _per_head,
    _rows,
    _scale,
    _score,
    _tile_for,
    _validate_tile,
)
from .sparse import text_padding_per_batch

__all__ = ["PyramidSparseAttention", "PSA_BANDS"]


#: PSA's Wan-14B preset: cumulative fractions of key blocks at 1x, 2x, 4x, 8x pooling; the rest is skipped.
PSA_BANDS: tuple[float, float, float, float] = (0.4, 0.5, 0.6, 0.8)


def _pool_sequence(x: Tensor, length: int, factor: int) -> Tensor:
    """Mean of runs of ``factor`` consecutive positions of ``x[..., :length, :]`` (zero-padded to ``length``)."""
    x = x[..., :length, :]
    if x.shape[-2] < length:
        x = torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[-2]))
    return x.reshape(*x.shape[:-2], length // factor, factor, x.shape[-1]).mean(-2)


def _merge_lse(parts: list[tuple[Tensor, Tensor]], dtype: torch.dtype) -> Tensor:
    """Outputs over disjoint key sets merged by their log-sum-exp (rows empty everywhere stay 0)."""
    lses = torch.stack([l for _, l in parts])
    total = torch.logsumexp(lses, dim=0)
    total = torch.where(torch.isneginf(total), 0.0, total)
    out = torch.zeros(parts[0][0].shape, dtype=torch.float32, device=parts[0][0].device)
    for o, l in parts:  # in place: one full-size temporary per part instead of three
        out.addcmul_(torch.exp(l - total).unsqueeze(-1), o if o.dtype == torch.float32 else o.float())
    return out.to(dtype)


@dataclass(frozen=True)
class PyramidSparseAttention(AttentionMethod):
    """Pyramid sparse attention (PSA): each (query block, key block) pair is computed at full resolution, against
    the key block pooled 2x, 4x or 8x (runs of consecutive tokens in tile order averaged, for keys and values), or
    skipped, by the key block's rank in the query block's pooled scores.

    ``bands`` are cumulative fractions of key blocks per level ``(1x, 2x, 4x, 8x)``; the rest is skipped (PSA's
    Wan preset ``PSA_BANDS`` = 40 % / 10 % / 10 % / 20 %, 20 % skipped); one tuple, or one per head. A pooled key
    stands for ``L`` tokens: its logit gets ``+log L``, so a block of identical tokens is attended exactly.
    Own blocks, blocks with grid padding or text, and key blocks whose tokens disagree (self-similarity below
    ``pool_similarity``) are never pooled. ``bands=(1, 1, 1, 1)`` is dense attention, ``(0, 0, 0, 0)``
    block-diagonal. Tiles and guard as :class:`DynamicSparseAttention`.
    """

    bands: tuple[float, ...] | tuple[tuple[float, ...], ...] = PSA_BANDS
    block_size: int = 128
    tile: int | tuple[int, ...] | str | None = "auto"
    pool_similarity: float | None = None
    similarity_guard: float | None = None
    backend: str = "auto"
    roles: frozenset[str] = field(default=_ROLES)

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "roles",
            _check_common(self.name, self.roles, self.backend, self.block_size, self.tile, self.similarity_guard),
        )
        if self.pool_similarity is not None:
            check_number(
                self.name,
                "pool_similarity",
                self.pool_similarity,
                low=-1.0,
                high=1.0,
                example=0.9,
                meaning="a cosine similarity",
            )
        bands_error = ValueError(
            f"{self.name}: bands are {len(PYRAMID_LEVELS)} non-decreasing fractions in [0, 1] (cumulative, for "
            f"pooling {PYRAMID_LEVELS}), or one such tuple per head; got {given(self.bands)}; e.g. bands={PSA_BANDS}"
        )
        if not isinstance(self.bands, (tuple, list)) or not self.bands:
            raise bands_error
        per_head = isinstance(self.bands[0], (tuple, list))
        if per_head and not all(isinstance(r, (tuple, list)) for r in self.bands):
            raise bands_error
        rows = [tuple(r) for r in self.bands] if per_head else [tuple(self.bands)]
        for row in rows:
            ok = len(row) == len(PYRAMID_LEVELS) and all(
                isinstance(e, (int, float)) and not isinstance(e, bool) and 0.0 <= e <= 1.0 for e in row
            )
            if not ok or any(a > b for a, b in zip(row, row[1:])):
                raise bands_error
        rows = [tuple(float(e) for e in r) for r in rows]
        object.__setattr__(self, "bands", tuple(rows) if per_head else rows[0])

    def validate(self, ctx: AttentionContext) -> None:
        _validate_tile(self.name, self.tile, self.block_size, ctx)

    def levels(self, qk: Tensor, kk: Tensor, ko: KernelOrder, scale: float, bands: Tensor) -> Tensor:
        """Pooling level (0 = skip, 1, 2, 4, 8) of every visual block pair ``(H, nvb, nvb)`` of one batch entry."""
        probs, forced, k_sim = _score(
            qk, kk, ko, scale, self.similarity_guard, k_similarity=self.pool_similarity is not None
        )
        nvb = probs.shape[-1]
        clean = ~(ko.has_pad | ko.has_text)[:nvb].to(probs.device)
        poolable = (~ko.has_text[:nvb].to(probs.device)).view(-1, 1) & clean.view(1, -1)
        if self.pool_similarity is not None:
            poolable = poolable & (k_sim >= self.pool_similarity).unsqueeze(-2)
        levels = pyramid_levels(probs, forced, bands.to(probs.device), poolable)
        for level in PYRAMID_LEVELS[1:]:  # blocks of a size the level does not divide use the next finer level
            if ko.block_size % level:
                finer = max(l for l in PYRAMID_LEVELS if l < level and ko.block_size % l == 0)
                levels = torch.where(levels == level, finer, levels)
        return levels

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        _check_call(self.name, ctx)
        paddings = text_padding_per_batch(ctx.attn_mask, ctx.q_layout, q.shape[0], ctx.layer)
        heads = q.shape[1]
        bands = _per_head(self.bands, ctx, heads, self.name, "bands")
        scale = _scale(ctx, q)
        if k.shape[1] != heads:
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
        out = torch.empty_like(q)
        densities, select_s, attend_s = [], 0.0, 0.0
        for rows, pad in zip(_rows(q.shape[0]), paddings):
            start = time.perf_counter()
            ko = block_order(ctx.q_layout, _tile_for(self.tile, ctx.q_layout.grid), self.block_size, pad)
            gather = ko.gather.to(q.device)
            qk, kk, vk = (x[rows].index_select(-2, gather) for x in (q, k, v))
            levels = self.levels(qk[0], kk[0], ko, scale, bands)
            block, nvb = ko.block_size, levels.shape[-1]
            masks = {1: selection_block_mask(ko, levels == 1, q.device)[0]}
            for level in PYRAMID_LEVELS[1:]:
                chosen = levels == level
                if bool(chosen.any()):
                    relation = torch.zeros(heads, ko.num_blocks, nvb, dtype=torch.bool)
                    relation[:, :nvb] = chosen.cpu()
                    masks[level] = relation_block_mask(
                        relation, relation, (block, block // level), (ko.length, nvb * block // level), _everything
                    )
            densities.append(_pyramid_density(levels, ko))
            mid = time.perf_counter()
            parts = []
            for level, mask in masks.items():
                if level == 1:
                    o, l = kernels.attention(qk, kk, vk, mask, scale=scale, backend=self.backend)
                else:
                    kl, vl = (_pool_sequence(x, nvb * block, level) for x in (kk, vk))
                    o, l = kernels.attention(qk, kl, vl, mask, scale=scale, backend=self.backend)
                    l = l + math.log(level)
                parts.append((o, l))
            out[rows] = _merge_lse(parts, q.dtype).index_select(-2, ko.scatter.to(q.device))
            select_s += mid - start
            attend_s += time.perf_counter() - mid
        ctx.report(density=sum(densities) / len(densities), selection_seconds=select_s, attention_seconds=attend_s)
        return _finite_or_report(out, q, k, v, ctx, self.name)


def _everything(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return torch.ones((), dtype=torch.bool, device=q_idx.device)


def _pyramid_density(levels: Tensor, ko: KernelOrder) -> float:
    """Computed (query, key) pairs over real pairs: text rows/columns dense, a pooled block costs 1/level."""
    block, length = ko.block_size, ko.length
    per_block = torch.zeros(ko.num_blocks).index_add_(0, torch.arange(length) // block, ko.valid.float())
    nvb = levels.shape[-1]
    cost = torch.where(levels > 0, 1.0 / levels.clamp(min=1).float(), 0.0).cpu()  # (H, nvb, nvb)
    work = torch.zeros(levels.shape[0], ko.num_blocks, ko.num_blocks)
    work[:, :nvb, :nvb] = cost
    text = ko.has_text
    work[:, text, :] = 1.0
    work[:, :, text] = 1.0
    pairs = (per_block.view(1, -1, 1) * work * per_block.view(1, 1, -1)).sum((-1, -2)).mean()
    real = float(ko.valid.sum())
    return float(pairs) / max(real * real, 1.0)
