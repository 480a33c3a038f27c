"""MasaCtrl's mutual self-attention (:class:`MutualSelfAttention`): a source and a target branch run in one batch
(``ctx.branches`` names each entry; see :func:`diffattn.editing.edit`), and the target's self-attention reads the
source's keys and values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ..context import AttentionContext
from ..errors import LayoutError
from .base import AttentionMethod
from .checks import check_bool, check_int, check_number, check_roles_arg, check_str, given
from .edit_branches import require_step, source_rows
from .edit_maps import CROSS_MAPS
from .edit_masks import MASK_THRESHOLD, object_mask
from .local_blend import WordSpec, word_spec

__all__ = ["MutualSelfAttention"]


_SELF_AND_JOINT = frozenset({"self", "joint"})


@dataclass(frozen=True)
class MutualSelfAttention(AttentionMethod):
    """MasaCtrl's mutual self-attention: from ``start_step`` on, the target branch's self-attention queries the
    source branch's keys and values (per CFG half), so the target keeps the source's content and identity while its
    prompt changes layout or pose; the source reconstructs itself exactly.

    Layers are chosen with ``layers=`` (MasaCtrl: SD's decoder self-attention, ``up_blocks``; the default of
    :func:`diffattn.editing.edit` for UNets; the later half of the blocks for transformers). On joint attention
    (SD3, Flux) only the visual keys/values are taken from the source: the target's text tokens still condition it.
    Runs on SD1.5, SDXL, SD3 and Flux (tested); any model with self- or joint-attention works the same way.

    **Mask-guided** (``mask_source``, ``mask_target``: H x W, True on the object, or numbers with the object at values
    >= 0.5; any resolution, nearest-resized to each layer's grid): the target's queries inside ``mask_target`` read
    only the source's object keys, the others only its background keys (``fg * m_t + bg * (1 - m_t)``), so object
    and background do not mix.
    **Automatic masks** (``mask_words``, as MasaCtrl's auto variant): the masks come from the cross-attention maps of
    those words in each prompt (a plain string is one word; or ``(source_words, target_words)``: each prompt needs
    one of its words), summed over layers of at most ``mask_max_tokens`` queries (16 x 16) and the steps so far,
    min-max normalised and thresholded at ``mask_threshold``; run through :func:`diffattn.editing.edit`, which
    records the maps.

    ``start_step`` counts the steps of the running call, which must be known (a pipeline's loop, or
    :func:`diffattn.denoising_step`): an unknown step raises, it is never taken as a step past ``start_step``.

    ``start_layer`` (the authors' layer counting): the self-attention layers it acts on are counted in the order
    the denoiser runs them (UNets: down, mid, up blocks; SD1.5 has 16, one per transformer block) and it acts from
    number ``start_layer`` (0-based) on; MasaCtrl's default is 10 (SD1.5: ``up_blocks.2``-``3``). Applied by
    :func:`diffattn.editing.edit`, which chooses the layers (with :func:`diffattn.apply` pass
    ``layers=diffattn.editing.masactrl_layers(model, method)``); ``None`` (default): edit()'s default layers (a
    UNet's whole decoder). It cannot be combined with ``layers=``.

    ``faithful=True``: the authors' automatic masks. Each mask comes from the current step's cross-attention maps
    of the layers that already ran in that step, those with exactly ``mask_max_tokens`` queries (16 x 16 on SD1.5,
    mid block included when it has that many): head means summed over the layers, the words' columns summed,
    min-max normalised, nearest-resized to the acting layer's own grid and thresholded ``>= mask_threshold``;
    before any such layer ran in a step the target attends to the source unmasked. The default (``False``) sums the
    maps of every layer with at most ``mask_max_tokens`` queries over the steps so far, bilinearly resized to the
    latent grid, thresholded ``> mask_threshold`` and nearest-resized to each layer.
    """

    start_step: int = 4
    mask_source: Tensor | None = field(default=None, compare=False, repr=False)
    mask_target: Tensor | None = field(default=None, compare=False, repr=False)
    mask_words: WordSpec = ()
    mask_threshold: float = 0.1
    mask_max_tokens: int = 256
    start_layer: int | None = None
    faithful: bool = False
    source: str = "source"
    target: str = "target"
    roles: frozenset[str] = field(default=_SELF_AND_JOINT)
    stack_level: ClassVar[int] = 1
    later_layers_only: ClassVar[bool] = True  # diffattn.editing.edit's default layers: the decoder / later blocks
    requires_step: ClassVar[bool] = True  # acts from start_step on
    requires_roles: ClassVar[bool] = True  # pairs each target entry with the source entry of its CFG half

    def __post_init__(self) -> None:
        object.__setattr__(self, "roles", check_roles_arg(self.roles, self.name, _SELF_AND_JOINT))
        check_number(
            self.name,
            "mask_threshold",
            self.mask_threshold,
            low=0.0,
            high=1.0,
            low_open=True,
            high_open=True,
            example=0.1,
        )
        for name in ("source", "target"):
            check_str(self.name, name, getattr(self, name), example=name)
        if self.start_layer is not None:
            check_int(self.name, "start_layer", self.start_layer, minimum=0, example=10, meaning="a layer number")
        check_bool(self.name, "faithful", self.faithful, "True: the authors' per-step automatic masks")
        check_int(self.name, "mask_max_tokens", self.mask_max_tokens, minimum=1, example=256, meaning="a query count")
        for name in ("mask_source", "mask_target"):
            mask = getattr(self, name)
            if mask is not None and not isinstance(mask, Tensor):
                try:
                    torch.as_tensor(mask)
                except (TypeError, ValueError, RuntimeError):
                    raise TypeError(
                        f"{self.name}: {name} is an H x W boolean mask (tensor or array), got {given(mask)}"
                    ) from None
        if isinstance(self.start_step, bool) or not isinstance(self.start_step, int) or self.start_step < 0:
            raise ValueError(f"{self.name}: start_step must be an int >= 0, got {self.start_step!r}")
        if self.mask_words != ():
            object.__setattr__(self, "mask_words", word_spec(self.mask_words, self.name, "mask_words"))
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
                object.__setattr__(self, name, object_mask(mask, f"{self.name}: {name}"))

    def _grid_mask(self, mask: Tensor, grid: tuple[int, ...]) -> Tensor:
        """``mask`` nearest-resized to the layer's grid (MasaCtrl's rule), flattened row-major."""
        return (
            torch.nn.functional.interpolate(mask.float()[None, None], size=tuple(grid), mode="nearest")[0, 0].flatten()
            >= MASK_THRESHOLD
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
        step, _ = require_step(ctx, self.name)
        if step < self.start_step:
            return ctx.dense(q, k, v)
        index = source_rows(ctx, q.shape[0], self.source, self.target, self.name).to(k.device)
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
        maps recorded so far (min-max normalised, thresholded); no maps yet (before the first step's have been
        recorded): plain mutual attention."""
        store = CROSS_MAPS.get()
        if store is None:
            raise LayoutError(
                f"{self.name} on {ctx.layer}: mask_words needs the cross-attention maps that "
                "diffattn.editing.edit records; run it through edit()"
            )
        roles = ctx.batch_roles  # source_rows checked that they are known
        ordinal: dict[tuple[str, str], int] = {}
        by_copy: dict[int, list[int]] = {}
        for t, s in enumerate(index.tolist()):
            key = (roles[t], ctx.branches[t])
            copy = ordinal.get(key, 0)
            ordinal[key] = copy + 1
            if s != t:
                by_copy.setdefault(copy, []).append(t)
        for copy, rows in by_copy.items():
            mask_s = store.branch_mask(self.source, copy, self.mask_threshold, ctx.step)
            mask_t = store.branch_mask(self.target, copy, self.mask_threshold, ctx.step)
            if mask_s is not None and mask_t is not None:
                out = self._masked(q, k, v, ctx, index, out, mask_s, mask_t, rows)
            elif not store.recorded and store.first_step is not None and ctx.step > store.first_step:
                # a whole step ran and left no map
                raise store.no_maps_error(f"{self.name} (mask_words={self.mask_words})")
        return out
