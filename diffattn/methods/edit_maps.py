"""The cross-attention maps an edit records: :class:`BlendStore` sums them per (branch, copy) on the latent grid;
``BLEND_STORE`` holds the one Prompt-to-Prompt's :class:`~diffattn.methods.local_blend.LocalBlend` reads and
``CROSS_MAPS`` the one mask-guided MasaCtrl's automatic masks read (both set by :func:`diffattn.editing.edit`), and
:class:`CrossMapRecorder` fills ``CROSS_MAPS`` on every layer."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ..context import AttentionContext
from ..errors import LayoutError
from .base import AttentionMethod
from .edit_branches import require_roles
from .local_blend import LocalBlend

__all__ = ["BlendStore", "BLEND_RULES", "BLEND_STORE", "CROSS_MAPS", "CrossMapRecorder"]


def _probs(q: Tensor, k: Tensor, scale: float, mask: Tensor | None) -> Tensor:
    """Softmax attention maps ``(H, Sq, Skv)`` of one batch entry, in float32."""
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
    return logits.softmax(-1)


def _entry_mask(mask: Tensor | None, row: int) -> Tensor | None:
    if mask is None:
        return None
    return mask[row] if mask.ndim == 4 and mask.shape[0] > 1 else (mask[0] if mask.ndim == 4 else mask)


#: How a :class:`BlendStore` gathers and thresholds its maps: diffattn's rule (every layer with at most
#: ``max_tokens`` queries, resized to the latents and summed over the steps), Prompt-to-Prompt's authors' LocalBlend
#: (layers with exactly ``max_tokens`` queries outside the mid block, at their grid, summed over the steps) or
#: MasaCtrl's authors' automatic masks (layers with exactly ``max_tokens`` queries, the current step only).
BLEND_RULES = ("diffattn", "prompt-to-prompt", "masactrl")


class BlendStore:
    """The blend words' cross-attention maps of one :func:`diffattn.editing.edit` call per (branch, copy) of the
    conditional entries, gathered by ``rule`` (:data:`BLEND_RULES`; default: the authors' Prompt-to-Prompt rule when
    ``blend.faithful``, else diffattn's)."""

    def __init__(
        self, tokens: dict[str, tuple[int, ...]], grid: tuple[int, int], blend: LocalBlend, rule: str | None = None
    ) -> None:
        self.tokens = tokens  # branch -> its blend token indices
        self.grid = grid
        self.blend = blend
        self.rule = rule if rule is not None else ("prompt-to-prompt" if blend.faithful else "diffattn")
        if self.rule not in BLEND_RULES:
            raise ValueError(f"BlendStore: rule is one of {BLEND_RULES}, got {self.rule!r}")
        self.maps: dict[tuple[str, int], Tensor] = {}
        self.maps_step: int | None = None  # MasaCtrl's rule: the step the maps are of
        self.recorded = False  # a map was recorded at some step
        # what the recording calls saw: the loop's length (the running call's, for LocalBlend's start), the first
        # step and the image query counts of the layers (to say why no map was recorded)
        self.num_steps: int | None = None
        self.first_step: int | None = None
        self.query_counts: set[int] = set()

    @property
    def fewest_queries(self) -> int | None:
        return min(self.query_counts) if self.query_counts else None

    def entries(self, ctx: AttentionContext, batch: int) -> list[tuple[int, str, int]]:
        """(batch entry, branch, copy index) of the conditional entries whose branch has blend words."""
        branches = ctx.branches or ()
        roles = require_roles(ctx, batch, "recording the cross-attention maps of an edit's words")
        self.num_steps = ctx.num_steps
        if ctx.step is not None and (self.first_step is None or ctx.step < self.first_step):
            self.first_step = ctx.step
        self.query_counts.add(ctx.q_layout.num_visual)
        seen: dict[str, int] = {}
        out = []
        for i in range(min(batch, len(branches))):
            if roles[i] != "cond" or branches[i] not in self.tokens:
                continue
            copy = seen.get(branches[i], 0)
            seen[branches[i]] = copy + 1
            out.append((i, branches[i], copy))
        return out

    def add(
        self,
        branch: str,
        copy: int,
        probs: Tensor,
        q_grid: tuple[int, ...],
        layer: str | None = None,
        step: int | None = None,
    ) -> None:
        """``probs``: ``(heads, queries, text)`` of one entry's image rows over the text keys of layer ``layer`` at
        step ``step``."""
        if len(q_grid) != 2:
            raise LayoutError(
                f"BlendStore: word maps are 2-D (an image's latent grid), but layer {layer} has the token grid "
                f"{tuple(q_grid)} (a video's frames x rows x columns); LocalBlend and MasaCtrl's automatic masks run "
                "on image models only"
            )
        tokens = [t for t in self.tokens[branch] if t < probs.shape[-1]]
        if not tokens:
            return
        if self.rule == "diffattn":
            if probs.shape[1] > self.blend.max_tokens:
                return
            heat = probs[..., tokens].sum(-1).sum(0).reshape(1, 1, *q_grid).float()
            heat = torch.nn.functional.interpolate(heat, size=self.grid, mode="bilinear", align_corners=False)[0, 0]
        else:  # the authors': one resolution, maps at their own grid, head means
            if probs.shape[1] != self.blend.max_tokens:
                return
            if self.rule == "prompt-to-prompt" and layer is not None and "mid_block" in layer.split("."):
                return
            heat = probs[..., tokens].sum(-1).float().mean(0).reshape(*q_grid)
            if self.rule == "masactrl" and step != self.maps_step:  # the current step's maps only
                self.maps, self.maps_step = {}, step
        key = (branch, copy)
        previous = self.maps.get(key)
        if previous is not None and previous.shape != heat.shape:
            raise LayoutError(
                f"BlendStore: layers with {self.blend.max_tokens} queries have grids {tuple(previous.shape)} and "
                f"{tuple(heat.shape)}; the authors' rule needs one grid"
            )
        self.maps[key] = heat.detach().cpu() if previous is None else previous + heat.detach().cpu()
        self.recorded = True

    def branch_mask(self, branch: str, copy: int, threshold: float, step: int | None = None) -> Tensor | None:
        """One branch's map, min-max normalised and thresholded (MasaCtrl's automatic mask), or None. diffattn's
        rule: ``> threshold`` on the latent grid; MasaCtrl's authors' rule: ``>= threshold`` on the maps' own grid,
        None unless the maps are of step ``step``."""
        heat = self.maps.get((branch, copy))
        if heat is None or (self.rule == "masactrl" and self.maps_step != step):
            return None
        lo, hi = heat.min(), heat.max()
        if self.rule == "masactrl":
            return (heat - lo) / (hi - lo) >= threshold
        return (heat - lo) / (hi - lo).clamp_min(1e-12) > threshold

    def mask(self, copy: int) -> Tensor | None:
        """The union over the branches of copy ``copy`` of their max-pooled, max-normalised, thresholded maps
        (``(h, w)`` bool on the latent grid); None before any map was recorded. diffattn's rule pools on the latent
        grid; the authors' (Prompt-to-Prompt) pools at the maps' grid, then upsamples nearest."""
        found = [heat for (_, c), heat in self.maps.items() if c == copy]
        if not found:
            return None
        out = torch.zeros(self.grid, dtype=torch.bool)
        for heat in found:
            pooled = torch.nn.functional.max_pool2d(heat[None, None], 3, stride=1, padding=1)
            if self.rule != "diffattn":
                pooled = torch.nn.functional.interpolate(pooled, size=self.grid, mode="nearest")
            pooled = pooled[0, 0]
            out |= pooled / pooled.max().clamp_min(1e-12) > self.blend.threshold
        return out

    def no_maps_error(self, owner: str) -> LayoutError:
        """The error for a store that recorded no map of its words although the layers ran."""
        words = {branch: tokens for branch, tokens in self.tokens.items() if tokens}
        if self.rule != "diffattn":
            return LayoutError(
                f"{owner}: no cross-attention map of the words (tokens {words}) was recorded: the authors' rule "
                f"(faithful=True) records the layers with exactly max_tokens={self.blend.max_tokens} image queries"
                f"{' outside the mid block' if self.rule == 'prompt-to-prompt' else ''}, and this call's layers "
                f"have {sorted(self.query_counts)}. Set it to one of them: LocalBlend(max_tokens=...), "
                "MutualSelfAttention(mask_max_tokens=...)"
            )
        return LayoutError(
            f"{owner}: no cross-attention map of the words (tokens {words}) was recorded: the layers it records "
            f"are those with at most max_tokens={self.blend.max_tokens} image queries, and the fewest this call's "
            f"layers have is {self.fewest_queries}. Raise the limit: LocalBlend(max_tokens=...), "
            "MutualSelfAttention(mask_max_tokens=...)"
        )


BLEND_STORE: contextvars.ContextVar[BlendStore | None] = contextvars.ContextVar("diffattn_blend", default=None)


CROSS_MAPS: contextvars.ContextVar[BlendStore | None] = contextvars.ContextVar("diffattn_cross_maps", default=None)


@dataclass(frozen=True)
class CrossMapRecorder(AttentionMethod):
    """Records the cross-attention maps that mask-guided MasaCtrl's automatic masks are made from (into the store
    :func:`diffattn.editing.edit` sets); attention itself is unchanged."""

    roles: frozenset[str] = field(default=frozenset({"cross", "joint"}))
    stack_level: ClassVar[int] = 1
    requires_roles: ClassVar[bool] = True  # records the conditional entries' maps

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        store = CROSS_MAPS.get()
        if store is not None:
            _record_maps(q, k, ctx, store)
        return ctx.dense(q, k, v)


def _record_maps(q: Tensor, k: Tensor, ctx: AttentionContext, store: BlendStore) -> None:
    """The image rows' maps over the text keys of the conditional entries whose words are known (plain maps)."""
    scale = ctx.scale if ctx.scale is not None else q.shape[-1] ** -0.5
    layout = ctx.q_layout
    for entry, branch, copy in store.entries(ctx, q.shape[0]):
        p = _probs(q[entry], k[entry], scale, _entry_mask(ctx.attn_mask, entry))
        if ctx.role == "joint":
            p = p[:, layout.visual_slice, layout.text_slice]
        store.add(branch, copy, p, layout.grid, layer=ctx.layer, step=ctx.step)
