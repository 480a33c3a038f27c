"""Prompt-to-Prompt's attention control (:class:`PromptToPrompt`): a source and a target branch run in one batch
(``ctx.branches`` names each entry; see :func:`diffattn.editing.edit`), and the target takes the source's attention
maps."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ..context import AttentionContext
from ..errors import LayoutError
from .base import AttentionMethod
from .checks import check_int, check_roles_arg, check_str, given
from .edit_branches import source_rows
from .edit_maps import BLEND_STORE, _entry_mask, _probs, _record_maps
from .local_blend import LocalBlend

__all__ = ["PromptToPrompt"]


@dataclass(frozen=True)
class PromptToPrompt(AttentionMethod):
    """Prompt-to-Prompt's attention control between a source and a target prompt of equal token count, on the
    conditional entries of the target branch (the unconditional half and the source are untouched).

    - **Replace** (``cross_replace``): for the first ``ceil(cross_replace * n)`` of the ``n`` steps that run, the
      target's cross-attention maps are the source's (its values are its own), so a swapped word takes the old
      word's place and layout.
    - **Self-attention injection** (``self_replace``): for the first ``ceil(self_replace * n)`` steps, the target's
      self-attention maps are the source's, on layers with at most ``self_max_tokens`` queries (P2P: 16 x 16).
    - **Re-weight** (``reweight``): ``((token_index, weight), ...)`` multiplies the target's cross-attention map of
      those tokens (after any replace), on every step; indices count the tokenizer's tokens, BOS = 0
      (:func:`diffattn.editing.token_indices` finds a word's).
    - Joint attention (SD3, Flux): the "cross-attention map" is the image-query x text-key block of the joint map
      and the self-attention map the image x image block; a replaced block keeps the target's mass per row and takes
      the source's distribution inside it, so rows stay normalised; text rows are untouched.

    The maps are computed explicitly for the target's edited rows (row blocks, never the whole batch at once); other
    rows go through ``ctx.dense`` (a kernel-level method under it still runs for them).
    - **LocalBlend** (``local_blend=LocalBlend(words=...)``): only the region of those words may change; see
      :class:`LocalBlend` (run through :func:`diffattn.editing.edit`). Tested on SD1.5, SDXL, SD3 and Flux tiny
      pipelines.
    """

    cross_replace: float = 0.8
    self_replace: float = 0.4
    self_max_tokens: int = 256
    reweight: tuple[tuple[int, float], ...] = ()
    local_blend: LocalBlend | None = None
    source: str = "source"
    target: str = "target"
    roles: frozenset[str] = field(default=frozenset({"self", "cross", "joint"}))
    stack_level: ClassVar[int] = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "roles", check_roles_arg(self.roles, self.name))
        check_int(self.name, "self_max_tokens", self.self_max_tokens, minimum=0, example=256, meaning="a query count")
        for name in ("source", "target"):
            check_str(self.name, name, getattr(self, name), example=name)
        if self.local_blend is not None and not isinstance(self.local_blend, LocalBlend):
            raise TypeError(
                f"{self.name}: local_blend must be a LocalBlend or None, got {given(self.local_blend)}; e.g. "
                "local_blend=LocalBlend(words=('circle', 'square'))"
            )
        pairs = self.reweight if isinstance(self.reweight, (tuple, list)) else None
        if pairs is None or not all(
            isinstance(p, (tuple, list))
            and len(p) == 2
            and isinstance(p[0], numbers.Integral)
            and not isinstance(p[0], bool)
            and p[0] >= 0
            and isinstance(p[1], numbers.Real)
            and not isinstance(p[1], bool)
            and math.isfinite(p[1])
            for p in pairs
        ):
            raise TypeError(
                f"{self.name}: reweight is a tuple of (token index >= 0, finite weight) pairs, got "
                f"{given(self.reweight)}; e.g. reweight=((3, 2.0),) (diffattn.editing.token_indices finds a word's)"
            )
        for name in ("cross_replace", "self_replace"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{self.name}: {name} is a fraction of the steps in [0, 1], got {value!r}")
        object.__setattr__(self, "reweight", tuple((int(i), float(w)) for i, w in self.reweight))

    def _active(self, fraction: float, ctx: AttentionContext) -> bool:
        if fraction == 0.0:
            return False
        if ctx.step is None or ctx.num_steps is None:
            raise LayoutError(
                f"{self.name} on {ctx.layer}: the replace fractions need the denoising step; run it "
                "through a pipeline (diffattn.editing.edit) or inside diffattn.denoising_step(i, n)"
            )
        return ctx.step < math.ceil(fraction * ctx.num_steps - 1e-9)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        visual = ctx.q_layout.num_visual
        replace_self = ctx.role != "cross" and visual <= self.self_max_tokens and self._active(self.self_replace, ctx)
        replace_cross = ctx.role != "self" and self._active(self.cross_replace, ctx)
        reweight = self.reweight if ctx.role != "self" else ()
        out = ctx.dense(q, k, v)
        store = BLEND_STORE.get() if ctx.role != "self" else None
        if store is not None:
            _record_maps(q, k, ctx, store)
        if not (replace_self or replace_cross or reweight):
            return out
        index = source_rows(ctx, q.shape[0], self.source, self.target)
        if index is None:
            return out
        roles = ctx.batch_roles or ("cond",) * q.shape[0]
        scale = ctx.scale if ctx.scale is not None else q.shape[-1] ** -0.5
        out = out.clone()
        for t, s in enumerate(index.tolist()):
            if s == t or roles[t] != "cond":
                continue
            p = _probs(q[t], k[t], scale, _entry_mask(ctx.attn_mask, t))
            if replace_self or replace_cross:
                p = self._replace(
                    p, _probs(q[s], k[s], scale, _entry_mask(ctx.attn_mask, s)), ctx, replace_self, replace_cross
                )
            for token, weight in reweight:
                column = token if ctx.role == "cross" else ctx.q_layout.text_start + token
                if token < ctx.kv_layout.text_len:
                    rows = slice(None) if ctx.role == "cross" else ctx.q_layout.visual_slice
                    p[:, rows, column] *= weight
            out[t] = torch.matmul(p, v[t].float()).to(out.dtype)
        return out

    @staticmethod
    def _replace(p_t: Tensor, p_s: Tensor, ctx: AttentionContext, replace_self: bool, replace_cross: bool) -> Tensor:
        """The target's maps with the source's where asked. Joint maps: for image rows, a replaced key block (text
        keys: cross; image keys: self) keeps the target's mass on it, spread as the source spreads it."""
        if ctx.role != "joint":
            return p_s.clone()
        layout = ctx.q_layout
        rows = layout.visual_slice
        p = p_t.clone()
        for replace, keys in ((replace_cross, layout.text_slice), (replace_self, layout.visual_slice)):
            if replace:
                block_t, block_s = p_t[:, rows, keys], p_s[:, rows, keys]
                mass = block_t.sum(-1, keepdim=True)
                p[:, rows, keys] = block_s / block_s.sum(-1, keepdim=True).clamp_min(1e-30) * mass
        return p
