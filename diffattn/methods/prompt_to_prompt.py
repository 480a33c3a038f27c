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
from ..errors import MethodConfigError
from .base import AttentionMethod
from .checks import check_int, check_roles_arg, check_str, given
from .edit_branches import require_step, source_rows
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
      those tokens (after any replace), on every step; indices count the tokens of the target prompt as the text
      sequence the model attends to holds them (>= 0, below the prompt's token count; weights finite;
      :func:`diffattn.editing.token_indices` finds a word's).
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
    requires_step: ClassVar[bool] = True  # the replace windows are fractions of the steps that run
    requires_roles: ClassVar[bool] = True  # edits the conditional target entries only

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
            and isinstance(p[1], numbers.Real)
            and not isinstance(p[1], bool)
            for p in pairs
        ):
            raise TypeError(
                f"{self.name}: reweight is a tuple of (token index, weight) pairs, got {given(self.reweight)}; e.g. "
                "reweight=((3, 2.0),) (diffattn.editing.token_indices finds a word's)"
            )
        for name in ("cross_replace", "self_replace"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{self.name}: {name} is a fraction of the steps in [0, 1], got {value!r}")
        reweight = []
        for index, weight in self.reweight:
            if index < 0:
                raise ValueError(
                    f"{self.name}: reweight token index {index!r} must be an int >= 0 (the target prompt's tokens "
                    "counted from 0; diffattn.editing.token_indices(pipe, prompt, word) finds a word's)"
                )
            if not math.isfinite(float(weight)):
                raise ValueError(f"{self.name}: reweight weight {weight!r} of token {index} must be finite")
            reweight.append((int(index), float(weight)))
        object.__setattr__(self, "reweight", tuple(reweight))

    def validate(self, ctx: AttentionContext) -> None:
        """Re-weighted tokens must be text tokens of the layer (cross- and joint-attention)."""
        if not self.reweight or ctx.role == "self":
            return
        text = ctx.kv_layout.text_len
        outside = sorted({i for i, _ in self.reweight if i >= text})
        if outside:
            raise MethodConfigError(
                f"{self.name} on {ctx.layer}: reweight token indices {outside} are beyond the {text} text tokens of "
                "this layer; give indices of the target prompt's tokens (diffattn.editing.token_indices)"
            )

    def _active(self, fraction: float, step: int, num_steps: int) -> bool:
        return fraction > 0.0 and step < math.ceil(fraction * num_steps - 1e-9)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        step, num_steps = require_step(ctx, self.name)
        visual = ctx.q_layout.num_visual
        replace_self = (
            ctx.role != "cross" and visual <= self.self_max_tokens and self._active(self.self_replace, step, num_steps)
        )
        replace_cross = ctx.role != "self" and self._active(self.cross_replace, step, num_steps)
        reweight = self.reweight if ctx.role != "self" else ()
        out = ctx.dense(q, k, v)
        store = BLEND_STORE.get() if ctx.role != "self" else None
        if store is not None:
            _record_maps(q, k, ctx, store)
        if not (replace_self or replace_cross or reweight):
            return out
        index = source_rows(ctx, q.shape[0], self.source, self.target, self.name)
        roles = ctx.batch_roles  # source_rows checked that they are known
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
            for token, weight in reweight:  # validate() checked that the tokens are text tokens of this layer
                column = token if ctx.role == "cross" else ctx.q_layout.text_start + token
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
