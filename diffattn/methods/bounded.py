"""Bounded attention (*Be Yourself: Bounded Attention for Multi-Subject T2I*): boxes and subject words; cross- and
self-attention are masked so that subjects do not leak into each other. The paper's latent update of the early steps
is :func:`diffattn.editing.layout`'s part (it needs gradients through the model); this module holds the masks and the
attention-mass loss terms that update reads.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import numbers
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ..context import AttentionContext
from .base import AttentionMethod
from .checks import check_bool, check_int_tuple, check_optional_int, check_roles_arg, given
from .edit_branches import require_roles, require_step

__all__ = [
    "BoundedAttention",
    "Box",
    "box_masks",
    "LossCollector",
    "MaskRefiner",
    "kmeans",
    "assign_clusters",
    "fix_empty_masks",
]

Box = tuple[float, float, float, float]


def _check_box(box: Sequence[float], owner: str) -> Box:
    try:
        values = [] if isinstance(box, (str, bytes)) else list(box)
    except TypeError:
        values = []
    if len(values) != 4 or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
        raise ValueError(
            f"{owner}: each of the boxes is four numbers (x0, y0, x1, y1) in [0, 1], origin top-left, e.g. "
            f"(0.0, 0.0, 0.5, 1.0); got {given(box)}"
        )
    x0, y0, x1, y1 = (float(v) for v in values)
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        raise ValueError(
            f"{owner}: box {box!r} must have 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 "
            "(fractions of the image, origin top-left)"
        )
    return (x0, y0, x1, y1)


def box_masks(boxes: Sequence[Box], grid: tuple[int, int], *, faithful: bool = False) -> Tensor:
    """``(tokens, subjects)`` membership of a row-major ``(h, w)`` token grid: rows ``round(y0 h):round(y1 h)``,
    columns ``round(x0 w):round(x1 w)`` (x -> columns, y -> rows); a box covers at least one cell at any grid
    (``faithful``: the authors' rounding alone, where a box thinner than half a cell covers none)."""
    h, w = grid
    out = torch.zeros(h, w, len(boxes), dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if faithful:
            out[round(y0 * h) : round(y1 * h), round(x0 * w) : round(x1 * w), i] = True
            continue
        r0, c0 = min(round(y0 * h), h - 1), min(round(x0 * w), w - 1)
        r1, c1 = max(round(y1 * h), r0 + 1), max(round(x1 * w), c0 + 1)
        out[r0:r1, c0:c1, i] = True
    return out.reshape(h * w, len(boxes))


def _self_allowed(members: Tensor) -> Tensor:
    """(q, k) blocked iff both lie in subject regions and share no subject: subject queries see their own subject
    and the background, background queries see everything."""
    share = (members.float() @ members.float().T) > 0
    inside = members.any(1)
    return ~(inside[:, None] & inside[None, :]) | share


class LossCollector:
    """Collects, per loss layer, the attention mass on each subject inside its box (``fg``) and on the background
    (``bg``), with gradients, while :func:`diffattn.editing.layout` runs its guidance passes."""

    def __init__(self, layers: Sequence[str]) -> None:
        self.layers = frozenset(layers)
        self.cross: list[tuple[Tensor, Tensor]] = []
        self.self_: list[tuple[Tensor, Tensor]] = []

    def wants(self, layer: str) -> bool:
        return layer in self.layers

    def loss(self, subjects: int, cross_weight: float, self_weight: float) -> tuple[Tensor, float]:
        """``L = cross_weight * sum_k (1 - IoU_k)^2 + self_weight * (same over self-attention)``, IoU_k = fg / (fg +
        K bg) of the layer-averaged masses; also the per-subject mean (the paper's stopping value)."""
        total, terms = None, 0
        for values, weight in ((self.cross, cross_weight), (self.self_, self_weight)):
            if not values:
                continue
            fg = torch.stack([f for f, _ in values]).mean(0)
            bg = torch.stack([b for _, b in values]).mean(0)
            part = ((1 - fg / (fg + subjects * bg).clamp_min(1e-12)) ** 2).sum() * weight
            total = part if total is None else total + part
            terms = max(terms, fg.numel())
        if total is None:
            raise RuntimeError(
                "bounded attention collected no attention maps: the loss layers "
                f"{sorted(self.layers)} did not run; pick layers that the model calls"
            )
        return total, float(total.detach()) / max(terms, 1)


_COLLECTOR: contextvars.ContextVar[LossCollector | None] = contextvars.ContextVar("diffattn_bounded", default=None)


def kmeans(
    points: Tensor,
    k: int,
    *,
    generator: torch.Generator,
    init: Tensor | None = None,
    restarts: int = 10,
    iterations: int = 30,
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means (k-means++ seeding, best of ``restarts`` by inertia; one run from ``init`` when given).
    Returns (labels ``(n,)``, centres ``(k, d)``)."""
    points = points.float()
    n = points.shape[0]
    k = min(k, n)
    best: tuple[float, Tensor, Tensor] | None = None
    for _ in range(1 if init is not None else restarts):
        if init is not None:
            centres = init.clone()
        else:
            centres = points[torch.randint(n, (1,), generator=generator)]
            while centres.shape[0] < k:
                d2 = torch.cdist(points, centres).min(1).values ** 2
                pick = torch.multinomial(d2 / d2.sum() if d2.sum() > 0 else torch.ones(n), 1, generator=generator)
                centres = torch.cat([centres, points[pick]])
        for _ in range(iterations):
            labels = torch.cdist(points, centres).argmin(1)
            moved = torch.stack(
                [points[labels == j].mean(0) if bool((labels == j).any()) else centres[j] for j in range(k)]
            )
            if torch.allclose(moved, centres):
                break
            centres = moved
        labels = torch.cdist(points, centres).argmin(1)
        inertia = float(((points - centres[labels]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, labels, centres)
    assert best is not None
    return best[1], best[2]


#: The authors' guard against dividing by zero in their map normalisations.
AUTHORS_EPSILON = 1e-5


def assign_clusters(labels: Tensor, cross: Tensor, clusters: int, threshold: float) -> Tensor:
    """The authors' cluster assignment: ``cross`` ``(n, subjects)`` soft subject maps, ``labels`` ``(n,)`` cluster of
    each pixel. Each cluster goes to the subject with the largest ``sum(cross * cluster) / min(area of cross, area of
    cluster)``; its pixels join that subject's mask when that score is ``>= threshold``. Returns ``(n, subjects)``
    bool."""
    members = torch.stack([labels == j for j in range(clusters)], 1).float()  # (n, c)
    overlap = cross.float().T @ members  # (s, c)
    smaller = torch.minimum(cross.float().sum(0)[:, None], members.sum(0)[None, :]).clamp_min(1e-12)
    score, subject = (overlap / smaller).max(0)  # per cluster
    pixel_subject, pixel_score = subject[labels], score[labels]
    masks = pixel_subject[:, None] == torch.arange(cross.shape[1])[None, :]
    return masks & (pixel_score >= threshold)[:, None]


def fix_empty_masks(masks: Tensor, boxes: Tensor) -> Tensor:
    """The authors' repair of an empty subject mask (``(n, subjects)`` bool): in subject order, an empty subject
    gets its box and that box is taken away from every other subject."""
    masks = masks.clone()
    for j in range(masks.shape[1]):
        if not bool(masks[:, j].any()):
            masks &= ~boxes[:, j : j + 1]
            masks[:, j] = boxes[:, j]
    return masks


class MaskRefiner:
    """Bounded attention's mask refinement (run by :func:`diffattn.editing.layout`): on ``steps``, the conditional
    self-attention maps and each subject's leading-token cross-attention map of ``layers`` (one grid) are averaged;
    after the step, k-means (``clusters_per_box`` x boxes clusters, warm-started after the first time) splits the
    pixels by their self-attention rows, and each cluster goes to the subject whose thresholded, min-max normalised
    cross map it overlaps most (intersection / smaller area >= ``score_threshold``; otherwise background). A subject
    that gets no cluster keeps its box. The masks then replace the boxes at every layer (nearest-exact resize).

    ``steps``: the step indices, or a function of the number of steps the running call makes (``ctx.num_steps``,
    which must then be known) that gives them — e.g. fractions of the steps that Heun's 2n - 1 calls or a
    pipeline's own default step count turn into indices.

    ``faithful``: the authors' rules (omer11a/bounded-attention, ``BoundedAttention._build_self_masks``): the maps of
    ``layers`` are averaged over every step from the first (guidance passes excluded); ``steps`` are the steps
    *before* which the masks are rebuilt, from the maps of all the steps before; each self-attention column is
    divided by its maximum before k-means (100 restarts the first time, then warm-started); each subject's cross map
    (bilinear, antialiased, to the self-attention grid) is divided by its maximum, passed through
    ``sigmoid(10 (x - cross_threshold))``, min-max normalised and multiplied by the subject's current mask (its box
    before the first refinement); clusters go to subjects by :func:`assign_clusters`; an empty subject gets its box,
    taken from the others (:func:`fix_empty_masks`)."""

    def __init__(
        self,
        method: BoundedAttention,
        layers: Sequence[str],
        steps: Sequence[int] | Callable[[int], Collection[int]],
        *,
        clusters_per_box: int = 3,
        cross_threshold: float = 0.2,
        score_threshold: float = 0.2,
        seed: int = 0,
        faithful: bool = False,
    ) -> None:
        self.method = method
        self.layers = frozenset(layers)
        self.steps = steps if callable(steps) else frozenset(steps)
        self._steps_of: tuple[int, frozenset[int]] | None = None  # (num_steps, its step indices)
        self.clusters = clusters_per_box * len(method.boxes)
        self.cross_threshold = cross_threshold
        self.score_threshold = score_threshold
        self.faithful = faithful
        self.generator = torch.Generator().manual_seed(seed)
        self.centres: Tensor | None = None
        self.masks: Tensor | None = None  # (h * w, subjects) at self.grid
        self.grid: tuple[int, int] | None = None
        self.cross_grid: tuple[int, int] | None = None
        self._self: list[Tensor] = []
        self._cross: list[Tensor] = []
        self._sums: dict[str, tuple[Tensor, int]] = {}  # faithful: running sums of the maps since the first step
        self._num_steps = 0  # the running call's step count, as its attention calls report it
        self.refreshed = 0

    def _step_set(self, num_steps: int) -> frozenset[int]:
        if not callable(self.steps):
            return self.steps
        if self._steps_of is None or self._steps_of[0] != num_steps:
            self._steps_of = (num_steps, frozenset(self.steps(num_steps)))
        return self._steps_of[1]

    def wants(self, ctx: AttentionContext) -> bool:
        if ctx.layer not in self.layers or len(ctx.q_layout.grid) != 2:
            return False
        step, num_steps = require_step(ctx, "bounded attention's mask refinement")
        self._num_steps = num_steps
        return self.faithful or step in self._step_set(num_steps)

    def record(self, probs: Tensor, ctx: AttentionContext, cond: list[int]) -> None:
        """``probs``: ``(batch, heads, Sq, Skv)`` of this call (image rows and their keys only for joint maps)."""
        grid = (int(ctx.q_layout.grid[0]), int(ctx.q_layout.grid[1]))
        mean = probs[cond].float().mean((0, 1)).detach()
        if ctx.role == "self":
            self.grid, key, value, into = grid, "self", mean, self._self
        else:
            self.cross_grid = grid
            self.grid = self.grid or grid
            leading = [group[-1] for group in self.method.subject_tokens]
            key, value, into = "cross", mean[:, [t if t < mean.shape[-1] else 0 for t in leading]], self._cross
        if not self.faithful:
            into.append(value)
            return
        total, count = self._sums.get(key, (torch.zeros_like(value), 0))
        if total.shape != value.shape:
            raise ValueError(
                f"bounded attention's mask refinement: the refinement layers {sorted(self.layers)} have maps of "
                f"more than one grid ({tuple(total.shape)} and {tuple(value.shape)}); pick layers of one grid"
            )
        self._sums[key] = (total + value, count + 1)

    def after_step(self, step: int) -> None:
        """What :func:`diffattn.editing.layout` runs after each step: cluster the maps recorded since the last
        refresh (``faithful``: rebuild the masks when the next step is one of ``steps``, counted in the steps of
        the running call that the recorded maps reported)."""
        if not self.faithful:
            self.refresh()
        elif "self" in self._sums and "cross" in self._sums and step + 1 in self._step_set(self._num_steps):
            self._rebuild()

    def refresh(self) -> None:
        """Cluster the maps recorded since the last refresh (nothing recorded: keep the current masks)."""
        if self.faithful:
            raise RuntimeError("the faithful MaskRefiner rebuilds its masks in after_step(step, num_steps)")
        if not self._self or not self._cross:
            self._self.clear()
            self._cross.clear()
            return
        sa = torch.stack(self._self).mean(0)
        ca = torch.stack(self._cross).mean(0)  # (n, subjects)
        self._self.clear()
        self._cross.clear()
        labels, self.centres = kmeans(sa, self.clusters, generator=self.generator, init=self.centres)
        lo, hi = ca.min(0).values, ca.max(0).values
        cross = (ca - lo) / (hi - lo).clamp_min(1e-12) > self.cross_threshold
        boxes = box_masks(self.method.boxes, self.grid)
        masks = torch.zeros_like(boxes)
        for j in range(int(labels.max()) + 1):
            cluster = labels == j
            if not bool(cluster.any()):
                continue
            overlap = (cluster[:, None] & cross).sum(0).float()
            scores = overlap / torch.minimum(cluster.sum().float(), cross.sum(0).float()).clamp_min(1)
            best = int(scores.argmax())
            if float(scores[best]) >= self.score_threshold:
                masks[:, best] |= cluster
        empty = ~masks.any(0)
        masks[:, empty] = boxes[:, empty]
        self.masks = masks
        self.refreshed += 1

    def _rebuild(self) -> None:
        """The authors' mask building from the running means (see the class docstring)."""
        total, count = self._sums["self"]
        sa = total / count
        sa = sa / (sa.max(0, keepdim=True).values + AUTHORS_EPSILON)
        restarts = 1 if self.centres is not None else 100
        labels, self.centres = kmeans(sa, self.clusters, generator=self.generator, init=self.centres, restarts=restarts)
        total, count = self._sums["cross"]
        ca = total / count  # (n_cross, subjects)
        if self.cross_grid != self.grid:
            planes = ca.T.reshape(1, -1, *self.cross_grid)
            planes = torch.nn.functional.interpolate(planes, size=self.grid, mode="bilinear", antialias=True)
            ca = planes[0].reshape(ca.shape[1], -1).T
        ca = ca / (ca.max(0).values + AUTHORS_EPSILON)
        ca = torch.sigmoid(10 * (ca - self.cross_threshold))
        lo, hi = ca.min(0).values, ca.max(0).values
        ca = (ca - lo) / (hi - lo + AUTHORS_EPSILON)
        boxes = box_masks(self.method.boxes, self.grid, faithful=True)
        ca = ca * (self.masks if self.masks is not None else boxes).float()
        masks = assign_clusters(labels, ca, self.clusters, self.score_threshold)
        self.masks = fix_empty_masks(masks, boxes)
        self.refreshed += 1

    def members(self, grid: tuple[int, int]) -> Tensor | None:
        if self.masks is None or self.grid is None:
            return None
        if grid == self.grid:
            return self.masks
        planes = self.masks.T.reshape(1, -1, *self.grid).float()
        resized = torch.nn.functional.interpolate(planes, size=grid, mode="nearest-exact")[0] > 0.5
        return resized.reshape(resized.shape[0], -1).T


def _masked_probs(q: Tensor, k: Tensor, mask: Tensor, ctx: AttentionContext) -> Tensor:
    """Explicit (differentiable) softmax maps of this call under ``mask`` (bool: True = attend, or additive)."""
    scale = ctx.scale if ctx.scale is not None else q.shape[-1] ** -0.5
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min) if mask.dtype == torch.bool else logits + mask
    return logits.softmax(-1)


_REFINER: contextvars.ContextVar[MaskRefiner | None] = contextvars.ContextVar("diffattn_bounded_refine", default=None)


@dataclass(frozen=True)
class BoundedAttention(AttentionMethod):
    """Bounded attention's masks: ``boxes[i]`` (x0, y0, x1, y1 in [0, 1], origin top-left) holds subject ``i``,
    whose words are the text tokens ``subject_tokens[i]`` (indices into the text sequence the model attends to;
    :func:`diffattn.editing.layout` finds them from words).

    - **Cross-attention** (conditional entries only): every subject token and every ``filter_tokens`` token (the
      paper: determiners, conjunctions, numbers, prepositions, spatial words) is hidden from every pixel, then each
      subject's tokens are shown again inside its own box; with ``mask_eos`` the tokens from ``eos_token`` on (EOS
      and the padding after it, which carry the whole prompt) are hidden from background pixels.
    - **Self-attention** (all entries): a query and a key in the boxes of different subjects do not see each other;
      subject queries see their own subject and the background, background queries see everything.
    - **Joint attention** (SD3, Flux): image queries get the cross rule on the text keys and the self rule on the
      image keys; text queries are untouched.

    ``faithful``: the authors' rules where diffattn's differ (omer11a/bounded-attention; ``docs/deviations.md``):
    ``mask_eos`` hides the EOS token alone from the background (not the padding after it), boxes are rounded
    without the one-cell minimum (:func:`box_masks`), and the loss terms count the boxes, never refined masks.

    A row that the masks would leave empty (e.g. with no BOS token in the text) is left unmasked, never NaN. Runs on
    any model whose attention has a 2-D grid (SD1.5, SDXL, SD3, Flux tested); the latent update is
    :func:`diffattn.editing.layout`'s (UNets: SD1.5, SDXL), and so is the mask refinement by clustering
    self-attention (:class:`MaskRefiner`): until it runs, and without it, the boxes are the masks.
    """

    boxes: tuple[Box, ...] = ()
    subject_tokens: tuple[tuple[int, ...], ...] = ()
    filter_tokens: tuple[int, ...] = ()
    eos_token: int | None = None
    mask_eos: bool = True
    mask_cross: bool = True
    mask_self: bool = True
    faithful: bool = False
    roles: frozenset[str] = field(default=frozenset({"self", "cross", "joint"}))
    stack_level: ClassVar[int] = 1
    requires_roles: ClassVar[bool] = True  # the cross-attention masks act on the conditional entries

    def __post_init__(self) -> None:
        object.__setattr__(self, "roles", check_roles_arg(self.roles, self.name))
        for name, value in (("boxes", self.boxes), ("subject_tokens", self.subject_tokens)):
            if not isinstance(value, (tuple, list)):
                raise TypeError(
                    f"{self.name}: {name} is a tuple with one entry per subject, got {given(value)}; e.g. "
                    "boxes=((0.0, 0.0, 0.5, 1.0),), subject_tokens=((2,),)"
                )
        boxes = tuple(_check_box(b, self.name) for b in self.boxes)
        tokens = tuple(
            check_int_tuple(self.name, f"subject_tokens[{i}]", group, example=(2, 3))
            for i, group in enumerate(self.subject_tokens)
        )
        if not boxes:
            raise ValueError(f"{self.name}: give at least one box, e.g. boxes=((0.0, 0.0, 0.5, 1.0),)")
        if len(tokens) != len(boxes):
            raise ValueError(
                f"{self.name}: {len(boxes)} boxes but {len(tokens)} subject token groups; give one "
                "tuple of token indices per box (diffattn.editing.token_indices finds a word's)"
            )
        if any(not group or min(group) < 0 for group in tokens):
            raise ValueError(f"{self.name}: every subject needs token indices >= 0, got {tokens}")
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "subject_tokens", tokens)
        filters = check_int_tuple(self.name, "filter_tokens", self.filter_tokens, example=(1, 4))
        object.__setattr__(self, "filter_tokens", filters)
        eos = check_optional_int(self.name, "eos_token", self.eos_token, minimum=0, example=7, meaning="a text index")
        object.__setattr__(self, "eos_token", eos)
        for flag in ("mask_eos", "mask_cross", "mask_self", "faithful"):
            check_bool(self.name, flag, getattr(self, flag))

    # ---- masks -------------------------------------------------------------------------------------------
    def _members(self, ctx: AttentionContext) -> Tensor | None:
        grid = ctx.q_layout.grid
        if len(grid) != 2:
            return None
        refiner = _REFINER.get()
        refined = refiner.members((int(grid[0]), int(grid[1]))) if refiner is not None else None
        return refined if refined is not None else self.box_members((int(grid[0]), int(grid[1])))

    def box_members(self, grid: tuple[int, int]) -> Tensor:
        """``(tokens, subjects)``: the boxes on ``grid`` (the authors' rounding when ``faithful``)."""
        return box_masks(self.boxes, grid, faithful=self.faithful)

    def cross_allowed(self, members: Tensor, text_len: int, *, background: bool = False) -> Tensor:
        """``(pixels, text_len)`` bool: what each pixel may see among the text tokens (conditional entries).
        ``background=True`` (the guidance passes) shows subject tokens in the background too and keeps EOS."""
        allowed = torch.ones(members.shape[0], text_len, dtype=torch.bool)
        if not self.mask_cross:
            return allowed
        hidden = [t for group in self.subject_tokens for t in group] + list(self.filter_tokens)
        allowed[:, [t for t in hidden if t < text_len]] = False
        outside = ~members.any(1)
        for i, group in enumerate(self.subject_tokens):
            rows = members[:, i] | outside if background else members[:, i]
            cols = [t for t in group if t < text_len]
            allowed[rows.nonzero()[:, 0][:, None], torch.tensor(cols, dtype=torch.long)[None, :]] = True
        if self.mask_eos and not background and self.eos_token is not None and self.eos_token < text_len:
            hidden_eos = slice(self.eos_token, self.eos_token + 1) if self.faithful else slice(self.eos_token, None)
            allowed[outside, hidden_eos] = False
        return allowed

    def self_allowed(self, members: Tensor) -> Tensor:
        if not self.mask_self:
            return torch.ones(members.shape[0], members.shape[0], dtype=torch.bool)
        return _self_allowed(members)

    def masks(self, ctx: AttentionContext, batch: int, *, background: bool = False) -> Tensor | None:
        """The ``(batch, 1, Sq, Skv)`` boolean mask of this call (True = attend), or None where nothing is masked."""
        members = self._members(ctx)
        if members is None:
            return None
        sq, skv = ctx.q_layout.num_tokens, ctx.kv_layout.num_tokens
        out = torch.ones(batch, 1, sq, skv, dtype=torch.bool)
        if ctx.role == "self":
            out[:] = self.self_allowed(members)
        elif ctx.role == "cross":
            roles = require_roles(ctx, batch, self.name)
            cond = [i for i, r in enumerate(roles) if r == "cond"]
            out[cond, 0] = self.cross_allowed(members, skv, background=background)
        else:  # joint: image rows only
            layout = ctx.q_layout
            rows, text, image = layout.visual_slice, layout.text_slice, layout.visual_slice
            roles = require_roles(ctx, batch, self.name)
            cond = [i for i, r in enumerate(roles) if r == "cond"]
            block = out[:, 0, rows]
            block[:, :, image] = self.self_allowed(members)
            out[:, 0, rows] = block
            block = out[cond, 0, rows]
            block[:, :, text] = self.cross_allowed(members, layout.text_len, background=background)
            out[cond, 0, rows] = block
        empty = ~out.any(-1, keepdim=True)
        return out | empty  # never an empty row

    # ---- attention -------------------------------------------------------------------------------------------
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        collector = _COLLECTOR.get()
        guiding = collector is not None
        mask = self.masks(ctx, q.shape[0], background=guiding)
        if mask is None:
            return ctx.dense(q, k, v)
        mask = mask.to(q.device)
        if ctx.attn_mask is not None:
            given = ctx.attn_mask
            mask = (
                mask & given
                if given.dtype == torch.bool
                else torch.where(mask, given.to(q.dtype), torch.finfo(q.dtype).min)
            )
        if guiding and collector.wants(ctx.layer):
            return self._collect(q, k, v, mask, ctx, collector)
        refiner = _REFINER.get()
        if not guiding and refiner is not None and refiner.wants(ctx):
            return self._refine_record(q, k, v, mask, ctx, refiner)
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=ctx.scale, enable_gqa=ctx.enable_gqa
        )

    def _refine_record(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, ctx: AttentionContext, refiner: MaskRefiner
    ) -> Tensor:
        probs = _masked_probs(q, k, mask, ctx)
        roles = require_roles(ctx, q.shape[0], "bounded attention's mask refinement")
        cond = [i for i, r in enumerate(roles) if r == "cond"]
        layout = ctx.q_layout
        if ctx.role == "joint":
            rows = layout.visual_slice
            refiner.record(probs[:, :, rows, layout.visual_slice], dataclasses.replace(ctx, role="self"), cond)
            refiner.record(probs[:, :, rows, layout.text_slice], ctx, cond)
        else:
            refiner.record(probs, ctx, cond)
        return torch.matmul(probs, v)

    def _collect(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, ctx: AttentionContext, collector: LossCollector
    ) -> Tensor:
        """Explicit masked attention (differentiable) that also records the loss terms of the conditional rows."""
        probs = _masked_probs(q, k, mask, ctx)
        grid = (int(ctx.q_layout.grid[0]), int(ctx.q_layout.grid[1]))
        members = (self.box_members(grid) if self.faithful else self._members(ctx)).to(q.device)
        inside, outside = members.T.float(), (~members.any(1)).float()  # (subjects, Sq), (Sq,)
        layout = ctx.q_layout
        rows = layout.visual_slice if ctx.role == "joint" else slice(None)
        if ctx.role in ("cross", "joint"):
            offset = layout.text_start if ctx.role == "joint" else 0
            keys = torch.zeros(len(self.boxes), probs.shape[-1], device=q.device)
            for i, group in enumerate(self.subject_tokens):
                picked = [offset + t for t in (*group, self.eos_token if self.eos_token is not None else group[0])]
                keys[i, picked] = 1.0
            self._record(probs[..., rows, :], keys, inside, outside, collector.cross)
        if ctx.role in ("self", "joint"):
            keys = torch.zeros(len(self.boxes), probs.shape[-1], device=q.device)
            keys[:, layout.visual_slice if ctx.role == "joint" else slice(None)] = inside
            self._record(probs[..., rows, :], keys, inside, outside, collector.self_)
        return torch.matmul(probs, v)

    @staticmethod
    def _record(probs: Tensor, keys: Tensor, inside: Tensor, outside: Tensor, into: list) -> None:
        mass = torch.einsum("bhqk,sk->bsq", probs, keys)  # per subject, per query: mass on the subject's keys
        into.append((torch.einsum("bsq,sq->s", mass, inside), torch.einsum("bsq,q->s", mass, outside)))
