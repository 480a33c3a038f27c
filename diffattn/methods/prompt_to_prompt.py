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
from ..errors import LayoutError, MethodConfigError
from .base import AttentionMethod
from .checks import check_int, check_roles_arg, check_str, given
from .edit_branches import require_step, source_rows
from .edit_maps import BLEND_STORE, _entry_mask, _probs, _record_maps
from .local_blend import LocalBlend
from .token_align import REFINE_MAP

__all__ = ["PromptToPrompt", "MODES", "ROUNDINGS", "REWEIGHT_STEPS"]

#: ``mode``: word swap (token j reads token j) or refinement (aligned tokens; new tokens keep their maps).
MODES = ("replace", "refine")
#: ``rounding`` of the replace windows: diffattn's ``ceil(f * n)`` or the authors' ``int(c * (n + 1))`` /
#: ``int(s * n)``.
ROUNDINGS = ("ceil", "authors")
#: ``reweight_steps``: every step, or the steps of the cross-attention replace window (the authors').
REWEIGHT_STEPS = ("all", "cross_replace")


@dataclass(frozen=True)
class PromptToPrompt(AttentionMethod):
    """Prompt-to-Prompt's attention control between a source and a target prompt, on the conditional entries of the
    target branch (the unconditional half and the source are untouched).

    - **Replace** (``cross_replace``, ``mode="replace"``, word swap): on the first steps of the ``n`` that run (see
      ``rounding``) the target's cross-attention maps are the source's (its values are its own), so a swapped word
      takes the old word's place and layout. The prompts must have equal token counts (token j reads token j);
      :func:`diffattn.editing.edit` refuses others and names ``mode="refine"``.
    - **Refine** (``mode="refine"``, adding or removing words: "a red circle" -> "a big red circle"): in the same
      window each target token paired with a source token by
      :func:`~diffattn.methods.token_align.align_tokens` (an alignment of the two token sequences keeping the most
      equal tokens in order) takes that source token's map; a new token keeps its own (the paper's refinement).
      The pairing is made by :func:`diffattn.editing.edit` from the prompts.
    - **Self-attention injection** (``self_replace``): on the first steps (see ``rounding``) the target's
      self-attention maps are the source's, on layers with at most ``self_max_tokens`` queries (P2P: 16 x 16).
    - **Re-weight** (``reweight``): ``((token_index, weight), ...)`` multiplies the target's cross-attention map of
      those tokens (after any replace) on every step (``reweight_steps="all"``), or, as the authors' code does, only
      on the steps of the cross-attention replace window (``reweight_steps="cross_replace"``: after the window the
      target uses its own map unscaled; with ``cross_replace=0`` nothing is re-weighted); indices count the tokens
      of the target prompt as the text sequence the model attends to holds them (>= 0, below the prompt's token
      count; weights finite; :func:`diffattn.editing.token_indices` finds a word's).
    - **Rounding** of the windows (``rounding``): ``"ceil"`` (default) replaces cross- and self-attention on the
      steps ``i < ceil(f * n)``; ``"authors"`` as the authors' code: cross-attention on ``i < int(cross_replace *
      (n + 1))`` (their schedule has n + 1 rows) and self-attention on ``i < int(self_replace * n)`` (Python's float
      product, truncated). At 0.35 of 10 steps: ``"ceil"`` steps 0-3, ``"authors"`` 0-2.
    - Joint attention (SD3, Flux): the "cross-attention map" is the image-query x text-key block of the joint map
      and the self-attention map the image x image block; a replaced block keeps the target's mass per row and takes
      the source's distribution inside it (refine: the mix of paired source columns and own columns), so rows stay
      normalised; text rows are untouched.

    The maps are computed explicitly for the target's edited rows (row blocks, never the whole batch at once); other
    rows go through ``ctx.dense`` (a kernel-level method under it still runs for them).
    - **LocalBlend** (``local_blend=LocalBlend(words=...)``): only the region of those words may change; see
      :class:`LocalBlend` (run through :func:`diffattn.editing.edit`). Tested on SD1.5, SDXL, SD3 and Flux tiny
      pipelines.

    The authors' rules in full: ``PromptToPrompt(rounding="authors", reweight_steps="cross_replace")``
    (``docs/deviations.md``).
    """

    cross_replace: float = 0.8
    self_replace: float = 0.4
    self_max_tokens: int = 256
    reweight: tuple[tuple[int, float], ...] = ()
    local_blend: LocalBlend | None = None
    mode: str = "replace"
    rounding: str = "ceil"
    reweight_steps: str = "all"
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
        check_str(self.name, "mode", self.mode, choices=MODES, example="refine")
        check_str(self.name, "rounding", self.rounding, choices=ROUNDINGS, example="authors")
        check_str(self.name, "reweight_steps", self.reweight_steps, choices=REWEIGHT_STEPS, example="cross_replace")
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

    def replace_steps(self, num_steps: int, kind: str) -> int:
        """How many of the first steps replace attention maps of ``kind`` (``"cross"`` / ``"self"``) in a loop of
        ``num_steps`` steps: steps ``0 .. replace_steps - 1`` do (see ``rounding``)."""
        fraction = self.cross_replace if kind == "cross" else self.self_replace
        if self.rounding == "authors":
            rows = num_steps + 1 if kind == "cross" else num_steps  # their cross schedule has n + 1 rows
            return min(int(fraction * rows), num_steps)
        return math.ceil(fraction * num_steps - 1e-9) if fraction > 0.0 else 0

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        step, num_steps = require_step(ctx, self.name)
        visual = ctx.q_layout.num_visual
        replace_self = (
            ctx.role != "cross" and visual <= self.self_max_tokens and step < self.replace_steps(num_steps, "self")
        )
        in_cross_window = step < self.replace_steps(num_steps, "cross")
        replace_cross = ctx.role != "self" and in_cross_window
        reweight = self.reweight if ctx.role != "self" else ()
        if self.reweight_steps == "cross_replace" and not in_cross_window:
            reweight = ()  # the authors re-weight inside the replace schedule only
        out = ctx.dense(q, k, v)
        store = BLEND_STORE.get() if ctx.role != "self" else None
        if store is not None:
            _record_maps(q, k, ctx, store)
        if not (replace_self or replace_cross or reweight):
            return out
        index = source_rows(ctx, q.shape[0], self.source, self.target, self.name)
        tokens = self._refine_tokens(ctx, q.device) if replace_cross and self.mode == "refine" else None
        roles = ctx.batch_roles  # source_rows checked that they are known
        scale = ctx.scale if ctx.scale is not None else q.shape[-1] ** -0.5
        out = out.clone()
        for t, s in enumerate(index.tolist()):
            if s == t or roles[t] != "cond":
                continue
            p = _probs(q[t], k[t], scale, _entry_mask(ctx.attn_mask, t))
            if replace_self or replace_cross:
                p = self._replace(
                    p,
                    _probs(q[s], k[s], scale, _entry_mask(ctx.attn_mask, s)),
                    ctx,
                    replace_self,
                    replace_cross,
                    tokens,
                )
            for token, weight in reweight:  # validate() checked that the tokens are text tokens of this layer
                column = token if ctx.role == "cross" else ctx.q_layout.text_start + token
                rows = slice(None) if ctx.role == "cross" else ctx.q_layout.visual_slice
                p[:, rows, column] *= weight
            out[t] = torch.matmul(p, v[t].float()).to(out.dtype)
        return out

    def _refine_tokens(self, ctx: AttentionContext, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(index, alpha)`` of the running edit's token pairing over this layer's text keys."""
        pairing = REFINE_MAP.get()
        if pairing is None:
            raise LayoutError(
                f"{self.name} on {ctx.layer}: mode='refine' needs the pairing of the target's tokens with the "
                "source's, made from the prompts by diffattn.editing.edit(pipe, source=..., target=..., "
                "method=PromptToPrompt(mode='refine')); run it through edit(), or set "
                "diffattn.methods.token_align.REFINE_MAP (diffattn.editing.refine_map(pipe, source, target))"
            )
        return pairing.tensors(ctx.kv_layout.text_len, device)

    @staticmethod
    def _replace(
        p_t: Tensor,
        p_s: Tensor,
        ctx: AttentionContext,
        replace_self: bool,
        replace_cross: bool,
        tokens: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """The target's maps with the source's where asked. ``tokens`` (refine): ``(index, alpha)``, the text
        columns take the source's column ``index`` where ``alpha`` is 1 and keep their own where it is 0. Joint
        maps: for image rows, a replaced key block (text keys: cross; image keys: self) keeps the target's mass on
        it, spread as the source spreads it."""
        if ctx.role != "joint":
            if ctx.role == "cross" and replace_cross and tokens is not None:
                index, alpha = tokens
                return p_s[..., index] * alpha + p_t * (1 - alpha)
            return p_s.clone()
        layout = ctx.q_layout
        rows = layout.visual_slice
        p = p_t.clone()
        for replace, keys in ((replace_cross, layout.text_slice), (replace_self, layout.visual_slice)):
            if replace:
                block_t, block_s = p_t[:, rows, keys], p_s[:, rows, keys]
                if tokens is not None and keys == layout.text_slice:
                    index, alpha = tokens
                    block_s = block_s[..., index] * alpha + block_t * (1 - alpha)
                mass = block_t.sum(-1, keepdim=True)
                p[:, rows, keys] = block_s / block_s.sum(-1, keepdim=True).clamp_min(1e-30) * mass
        return p
