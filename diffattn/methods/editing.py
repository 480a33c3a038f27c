"""Editing methods: a source and a target branch run in one batch (``ctx.branches`` names each entry; see
:func:`diffattn.editing.edit`), and the method makes the target borrow from the source inside attention."""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ..context import AttentionContext
from ..errors import LayoutError
from .base import AttentionMethod, check_roles

__all__ = [
    "AttentiveEraser",
    "CrossMapRecorder",
    "LocalBlend",
    "MutualSelfAttention",
    "PromptToPrompt",
    "source_rows",
    "BlendStore",
]

_SELF_AND_JOINT = frozenset({"self", "joint"})


def source_rows(ctx: AttentionContext, batch: int, source: str, target: str) -> Tensor | None:
    """For every batch entry, the entry whose keys/values it reads: a target entry reads the source entry at the same
    place in the same CFG half (same role, same copy index); every other entry reads itself. None without a target."""
    branches = ctx.branches
    if branches is None or len(branches) != batch:
        raise LayoutError(
            f"{ctx.layer}: an editing method needs the branch of each batch entry (source / target), but this call "
            f"declares {branches}. Run it through diffattn.editing.edit(pipe, source=..., target=..., method=...)"
        )
    roles = ctx.batch_roles if ctx.batch_roles is not None and len(ctx.batch_roles) == batch else ("?",) * batch
    index = list(range(batch))
    found = False
    for role in dict.fromkeys(roles):
        members = [i for i in range(batch) if roles[i] == role]
        sources = [i for i in members if branches[i] == source]
        targets = [i for i in members if branches[i] == target]
        if targets and len(sources) != len(targets):
            raise LayoutError(
                f"{ctx.layer}: {len(targets)} {target} entries but {len(sources)} {source} entries in "
                f"the {role} entries of this call; edit one source per target"
            )
        for s, t in zip(sources, targets):
            index[t] = s
            found = True
    return torch.tensor(index) if found else None


@dataclass(frozen=True)
class MutualSelfAttention(AttentionMethod):
    """MasaCtrl's mutual self-attention: from ``start_step`` on, the target branch's self-attention queries the
    source branch's keys and values (per CFG half), so the target keeps the source's content and identity while its
    prompt changes layout or pose; the source reconstructs itself exactly.

    Layers are chosen with ``layers=`` (MasaCtrl: SD's decoder self-attention, ``up_blocks``; the default of
    :func:`diffattn.editing.edit` for UNets; the later half of the blocks for transformers). On joint attention
    (SD3, Flux) only the visual keys/values are taken from the source: the target's text tokens still condition it.
    Runs on SD1.5, SDXL, SD3 and Flux (tested); any model with self- or joint-attention works the same way.

    **Mask-guided** (``mask_source``, ``mask_target``: H x W, True on the object, any resolution, nearest-resized to
    each layer's grid): the target's queries inside ``mask_target`` read only the source's object keys, the others
    only its background keys (``fg * m_t + bg * (1 - m_t)``), so object and background do not mix.
    **Automatic masks** (``mask_words``, as MasaCtrl's auto variant): the masks come from the cross-attention maps of
    those words in each prompt (or ``(source_words, target_words)``), summed over layers of at most 16 x 16 queries
    and the steps so far, min-max normalised and thresholded at ``mask_threshold``; run through
    :func:`diffattn.editing.edit`, which records the maps.
    """

    start_step: int = 4
    mask_source: Tensor | None = field(default=None, compare=False, repr=False)
    mask_target: Tensor | None = field(default=None, compare=False, repr=False)
    mask_words: tuple[str, ...] | tuple[tuple[str, ...], tuple[str, ...]] = ()
    mask_threshold: float = 0.1
    source: str = "source"
    target: str = "target"
    roles: frozenset[str] = field(default=_SELF_AND_JOINT)
    stack_level: ClassVar[int] = 1
    later_layers_only: ClassVar[bool] = True  # diffattn.editing.edit's default layers: the decoder / later blocks

    def __post_init__(self) -> None:
        object.__setattr__(self, "roles", check_roles(self.roles, self.name, _SELF_AND_JOINT))
        if isinstance(self.start_step, bool) or not isinstance(self.start_step, int) or self.start_step < 0:
            raise ValueError(f"{self.name}: start_step must be an int >= 0, got {self.start_step!r}")
        if self.mask_words and self.mask_source is not None:
            raise ValueError(
                f"{self.name}: give masks (mask_source, mask_target) or mask_words (masks from "
                "cross-attention), not both"
            )
        if not 0.0 < self.mask_threshold < 1.0:
            raise ValueError(f"{self.name}: mask_threshold must be in (0, 1), got {self.mask_threshold}")
        if (self.mask_source is None) != (self.mask_target is None):
            raise ValueError(
                f"{self.name}: the mask-guided variant needs both mask_source and mask_target (H x W, "
                "True on the object in the source and where it goes in the target); give both or none"
            )
        for name in ("mask_source", "mask_target"):
            mask = getattr(self, name)
            if mask is not None:
                mask = torch.as_tensor(mask)
                if mask.ndim != 2:
                    raise ValueError(f"{self.name}: {name} must be a 2-D (H x W) mask, got shape {tuple(mask.shape)}")
                object.__setattr__(self, name, mask.bool())

    def _grid_mask(self, mask: Tensor, grid: tuple[int, ...]) -> Tensor:
        """``mask`` nearest-resized to the layer's grid (MasaCtrl's rule), flattened row-major."""
        return (
            torch.nn.functional.interpolate(mask.float()[None, None], size=tuple(grid), mode="nearest")[0, 0].flatten()
            > 0.5
        )

    def _masked(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        ctx: AttentionContext,
        index: Tensor,
        out: Tensor,
        mask_source: Tensor,
        mask_target: Tensor,
        targets: list[int] | None = None,
    ) -> Tensor:
        """Mask-guided MasaCtrl for the target rows: ``fg * m_t + bg * (1 - m_t)``, fg attending to the source's keys
        inside its object mask, bg to those outside (text keys of joint attention stay visible to both). A mask
        that leaves fg or bg without keys gives that part the unmasked source keys."""
        grid = ctx.kv_layout.grid
        if len(grid) != 2:
            raise LayoutError(
                f"{self.name} on {ctx.layer}: the mask-guided variant needs a 2-D token grid, got "
                f"{ctx.kv_layout.describe()}"
            )
        inside_s = self._grid_mask(mask_source, grid).to(q.device)
        inside_t = self._grid_mask(mask_target, ctx.q_layout.grid).to(q.device)
        keys_fg = torch.ones(k.shape[-2], dtype=torch.bool, device=q.device)
        keys_bg = keys_fg.clone()
        visual = ctx.kv_layout.visual_slice if ctx.role == "joint" else slice(None)
        keys_fg[visual], keys_bg[visual] = inside_s, ~inside_s
        if targets is None:
            targets = [t for t, s in enumerate(index.tolist()) if s != t]
        rows = torch.tensor(targets, device=q.device)
        qt, kt, vt = q.index_select(0, rows), k.index_select(0, rows), v.index_select(0, rows)

        def part(allowed: Tensor) -> Tensor:
            if not bool(allowed[visual].any()):
                allowed = torch.ones_like(allowed)
            return torch.nn.functional.scaled_dot_product_attention(
                qt, kt, vt, attn_mask=allowed[None, None, None, :], scale=ctx.scale
            )

        fg, bg = part(keys_fg), part(keys_bg)
        m = torch.zeros(q.shape[-2], dtype=fg.dtype, device=q.device)
        if ctx.role == "joint":
            m[ctx.q_layout.visual_slice] = inside_t.to(fg.dtype)
            composed = fg * m[:, None] + bg * (1 - m[:, None])
            text = ctx.q_layout.text_slice
            composed[:, :, text] = out.index_select(0, rows)[:, :, text]  # text rows: the plain mutual attention
        else:
            m[:] = inside_t.to(fg.dtype)
            composed = fg * m[:, None] + bg * (1 - m[:, None])
        out = out.clone()
        out[rows] = composed.to(out.dtype)
        return out

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        if ctx.step is not None and ctx.step < self.start_step:
            return ctx.dense(q, k, v)
        index = source_rows(ctx, q.shape[0], self.source, self.target)
        if index is None:
            return ctx.dense(q, k, v)
        index = index.to(k.device)
        if ctx.role == "joint":  # target text keys stay the target's; its image keys/values are the source's
            visual = ctx.kv_layout.visual_slice
            k, v = k.clone(), v.clone()
            k[:, :, visual] = k.index_select(0, index)[:, :, visual]
            v[:, :, visual] = v.index_select(0, index)[:, :, visual]
        else:
            k, v = k.index_select(0, index), v.index_select(0, index)
        out = ctx.dense(q, k, v)
        if self.mask_source is not None:
            return self._masked(q, k, v, ctx, index, out, self.mask_source, self.mask_target)
        if self.mask_words:
            return self._auto_masked(q, k, v, ctx, index, out)
        return out

    def _auto_masked(
        self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext, index: Tensor, out: Tensor
    ) -> Tensor:
        """MasaCtrl's automatic masks: each copy's source and target masks from the ``mask_words``' cross-attention
        maps recorded so far (min-max normalised, thresholded); no maps yet: plain mutual attention."""
        store = CROSS_MAPS.get()
        if store is None:
            raise LayoutError(
                f"{self.name} on {ctx.layer}: mask_words needs the cross-attention maps that "
                "diffattn.editing.edit records; run it through edit()"
            )
        roles = (
            ctx.batch_roles
            if ctx.batch_roles is not None and len(ctx.batch_roles) == q.shape[0]
            else ("?",) * q.shape[0]
        )
        ordinal: dict[tuple[str, str], int] = {}
        by_copy: dict[int, list[int]] = {}
        for t, s in enumerate(index.tolist()):
            key = (roles[t], ctx.branches[t])
            copy = ordinal.get(key, 0)
            ordinal[key] = copy + 1
            if s != t:
                by_copy.setdefault(copy, []).append(t)
        for copy, rows in by_copy.items():
            mask_s = store.branch_mask(self.source, copy, self.mask_threshold)
            mask_t = store.branch_mask(self.target, copy, self.mask_threshold)
            if mask_s is not None and mask_t is not None:
                out = self._masked(q, k, v, ctx, index, out, mask_s, mask_t, rows)
        return out


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


@dataclass(frozen=True)
class LocalBlend:
    """Prompt-to-Prompt's local blending: the cross-attention maps of ``words`` (in the source and in the target
    prompt: a word found in either counts; or ``(source_words, target_words)``) are summed over heads, layers with at
    most ``max_tokens`` queries and the steps so far, max-pooled 3 x 3, resized to the latents, max-normalised and
    thresholded at ``threshold``; the mask is the union of the source's and the target's. From ``start`` (fraction
    of the steps) on, after every step the target's latents become ``source + mask * (target - source)``: outside
    the mask they are the source's exactly. Run by :func:`diffattn.editing.edit` with a
    :class:`PromptToPrompt` whose ``local_blend`` is set."""

    words: tuple[str, ...] | tuple[tuple[str, ...], tuple[str, ...]] = ()
    threshold: float = 0.3
    start: float = 0.2
    max_tokens: int = 256

    def __post_init__(self) -> None:
        if not self.words:
            raise ValueError(
                "LocalBlend: name the words whose region may change, e.g. LocalBlend(words=('circle', "
                "'square')) for 'a red circle' -> 'a red square'"
            )
        if not 0.0 < self.threshold < 1.0 or not 0.0 <= self.start <= 1.0:
            raise ValueError(f"LocalBlend: threshold in (0, 1) and start in [0, 1], got {self.threshold}, {self.start}")

    def split(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        if all(isinstance(w, str) for w in self.words):
            return tuple(self.words), tuple(self.words)  # type: ignore[arg-type]
        source, target = self.words  # type: ignore[misc]
        return tuple(source), tuple(target)


class BlendStore:
    """The blend words' cross-attention maps of one :func:`diffattn.editing.edit` call, summed on the latent grid per
    (branch, copy) of the conditional entries."""

    def __init__(self, tokens: dict[str, tuple[int, ...]], grid: tuple[int, int], blend: LocalBlend) -> None:
        self.tokens = tokens  # branch -> its blend token indices
        self.grid = grid
        self.blend = blend
        self.maps: dict[tuple[str, int], Tensor] = {}

    def entries(self, ctx: AttentionContext, batch: int) -> list[tuple[int, str, int]]:
        """(batch entry, branch, copy index) of the conditional entries whose branch has blend words."""
        branches = ctx.branches or ()
        roles = ctx.batch_roles if ctx.batch_roles is not None and len(ctx.batch_roles) == batch else ("cond",) * batch
        seen: dict[str, int] = {}
        out = []
        for i in range(min(batch, len(branches))):
            if roles[i] != "cond" or branches[i] not in self.tokens:
                continue
            copy = seen.get(branches[i], 0)
            seen[branches[i]] = copy + 1
            out.append((i, branches[i], copy))
        return out

    def add(self, branch: str, copy: int, probs: Tensor, q_grid: tuple[int, ...]) -> None:
        """``probs``: ``(heads, queries, text)`` of one entry's image rows over the text keys."""
        tokens = [t for t in self.tokens[branch] if t < probs.shape[-1]]
        if not tokens or len(q_grid) != 2 or probs.shape[1] > self.blend.max_tokens:
            return
        heat = probs[..., tokens].sum(-1).sum(0).reshape(1, 1, *q_grid).float()
        heat = torch.nn.functional.interpolate(heat, size=self.grid, mode="bilinear", align_corners=False)[0, 0]
        key = (branch, copy)
        self.maps[key] = self.maps.get(key, 0) + heat.detach().cpu()

    def branch_mask(self, branch: str, copy: int, threshold: float) -> Tensor | None:
        """One branch's map, min-max normalised and thresholded (MasaCtrl's automatic mask), or None."""
        heat = self.maps.get((branch, copy))
        if heat is None:
            return None
        lo, hi = heat.min(), heat.max()
        return (heat - lo) / (hi - lo).clamp_min(1e-12) > threshold

    def mask(self, copy: int) -> Tensor | None:
        """The union over the branches of copy ``copy`` of their max-pooled, max-normalised, thresholded maps
        (``(h, w)`` bool); None before any map was recorded."""
        found = [heat for (_, c), heat in self.maps.items() if c == copy]
        if not found:
            return None
        out = torch.zeros(self.grid, dtype=torch.bool)
        for heat in found:
            pooled = torch.nn.functional.max_pool2d(heat[None, None], 3, stride=1, padding=1)[0, 0]
            out |= pooled / pooled.max().clamp_min(1e-12) > self.blend.threshold
        return out


BLEND_STORE: contextvars.ContextVar[BlendStore | None] = contextvars.ContextVar("diffattn_blend", default=None)
CROSS_MAPS: contextvars.ContextVar[BlendStore | None] = contextvars.ContextVar("diffattn_cross_maps", default=None)


@dataclass(frozen=True)
class CrossMapRecorder(AttentionMethod):
    """Records the cross-attention maps that mask-guided MasaCtrl's automatic masks are made from (into the store
    :func:`diffattn.editing.edit` sets); attention itself is unchanged."""

    roles: frozenset[str] = field(default=frozenset({"cross", "joint"}))
    stack_level: ClassVar[int] = 1

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
        store.add(branch, copy, p, layout.grid)


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
        object.__setattr__(self, "roles", check_roles(self.roles, self.name))
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


@dataclass(frozen=True)
class AttentiveEraser(AttentionMethod):
    """Attentive Eraser's attention activation suppression (AAS), on the ``w`` branch of an erase batch (see
    :func:`diffattn.editing.erase`): every query's attention to the keys inside the object mask is removed, so the
    region is redrawn from the background; for the first ``ss_steps`` steps the queries inside the mask also see
    their logits scaled by ``ss_scale`` (similarity suppression: ``fg * m + bg * (1 - m)``). The mask is max-pooled
    to each layer's grid (a dilation, as the paper). A mask covering every key (or none) leaves the layer unchanged,
    so no row is ever fully masked. The ``wo`` branch is untouched. Self-attention of UNets (SD1.5 tested).
    """

    mask: Tensor | None = field(default=None, compare=False, repr=False)
    ss_steps: int = 9
    ss_scale: float = 0.3
    branch: str = "w"
    roles: frozenset[str] = field(default=frozenset({"self"}))
    stack_level: ClassVar[int] = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "roles", check_roles(self.roles, self.name, frozenset({"self"})))
        if not 0.0 < self.ss_scale <= 1.0:
            raise ValueError(f"{self.name}: ss_scale must be in (0, 1], got {self.ss_scale}")

    def with_mask(self, mask: object) -> AttentiveEraser:
        """This method with the object ``mask`` (H x W, True on the object, at any resolution)."""
        import dataclasses

        import numpy as np

        return dataclasses.replace(self, mask=torch.as_tensor(np.asarray(mask)).bool())

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        out = ctx.dense(q, k, v)
        if self.mask is None:
            raise LayoutError(
                f"{self.name} on {ctx.layer}: no object mask; use diffattn.editing.erase(pipe, image, "
                "mask) or AttentiveEraser().with_mask(mask)"
            )
        if ctx.branches is None:
            raise LayoutError(
                f"{self.name} on {ctx.layer}: needs the erase batch's branches ('wo', 'w'); use diffattn.editing.erase"
            )
        rows = [i for i, b in enumerate(ctx.branches) if b == self.branch]
        grid = ctx.kv_layout.grid
        if not rows or len(grid) != 2:
            return out
        pooled = torch.nn.functional.adaptive_max_pool2d(self.mask.float()[None, None], grid)[0, 0] > 0.5
        inside = pooled.flatten().to(q.device)
        if bool(inside.all()) or not bool(inside.any()):
            return out
        index = torch.tensor(rows, device=q.device)
        qw, kw, vw = (x.index_select(0, index) for x in (q, k, v))
        allowed = ~inside[None, None, None, :]  # every query: no key inside the object
        scale = ctx.scale
        bg = torch.nn.functional.scaled_dot_product_attention(qw, kw, vw, attn_mask=allowed, scale=scale)
        if ctx.step is not None and ctx.step < self.ss_steps:
            fg = torch.nn.functional.scaled_dot_product_attention(
                qw * self.ss_scale, kw, vw, attn_mask=allowed, scale=scale
            )
            m = inside[None, None, :, None].to(bg.dtype)
            bg = fg * m + bg * (1 - m)
        out = out.clone()
        out[index] = bg.to(out.dtype)
        return out
