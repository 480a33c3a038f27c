"""Perturbed-attention methods for guidance: PAG, SoftPAG and SEG.

Each acts only on the batch entries whose role is ``"perturbed"`` (the copies of the conditional entries that
:func:`diffattn.guidance.enable` appends to the batch); every other entry, and every head a method does not select,
gets the stock attention core unchanged (bitwise). They act on self-attention and on joint text + image attention,
never on cross-attention. Besides the attention change, each carries its guidance settings (``scale``,
``adaptive_scale``, ``layers``, ``heads``, ``steps``), which :func:`diffattn.guidance.enable` reads.

* :class:`PAG`: the perturbed self-attention map is the identity, so each token's output is its own value row. In
  joint attention (``joint="image"``, the PAG paper's and diffusers' SD3 definition) only the image -> image block
  is the identity: an image query attends to itself and to the text keys, text queries are unchanged.
  ``joint="full"`` makes every row one-hot (output = V for text tokens too), like diffusers' guider-based PAG.
* :class:`SoftPAG` (HeadHunter): the map is interpolated toward the PAG map, A' = (1 - u) A + u I.
* :class:`SEG` (smoothed energy guidance): the perturbed entries' visual queries are blurred by a Gaussian of
  ``sigma`` tokens over the token grid (every axis, frames included); ``sigma = inf`` gives the mean query. By
  default with the authors' kernel (``faithful=True``: ``ceil(6 sigma) + 1`` odd taps clamped to the map, whole-sample
  reflection; :func:`seg_blur_matrix`), else an untruncated Gaussian (:func:`gaussian_blur_matrix`).

``heads`` restricts the perturbation to chosen heads (HeadHunter's head-level guidance): ``None`` = all heads, a
sequence of head indices = those heads in every selected layer, or a mapping ``{layer pattern: head indices}``
whose patterns (matched like ``layers``) are then the selected layers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ..context import AttentionContext
from ..errors import LayerSelectionError, LayoutError
from ..schedule import StepSchedule, StepSpec, _component_regex
from .base import AttentionMethod, check_roles

__all__ = [
    "PerturbedAttention",
    "PAG",
    "SoftPAG",
    "SEG",
    "HeadSpec",
    "PERTURBED",
    "gaussian_blur_matrix",
    "seg_blur_matrix",
    "SEG_INF_BLUR_THRESHOLD",
]

#: The batch role of the entries a perturbed-attention method changes.
PERTURBED = "perturbed"

HeadSpec = Sequence[int] | Mapping[str, Sequence[int]] | None
_GUIDANCE_ROLES = frozenset({"self", "joint"})


def _normalise_heads(heads: HeadSpec, owner: str) -> tuple[int, ...] | tuple[tuple[str, tuple[int, ...]], ...] | None:
    def indices(value: object, where: str) -> tuple[int, ...]:
        if isinstance(value, int) and not isinstance(value, bool):
            value = (value,)
        try:
            out = tuple(value)  # type: ignore[arg-type]
        except TypeError:
            out = ()
        if not out or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in out):
            raise ValueError(f"{owner}: heads{where} must be non-empty head indices (ints >= 0), got {value!r}")
        return tuple(sorted(set(out)))

    if heads is None:
        return None
    if isinstance(heads, Mapping):
        if not heads:
            raise ValueError(f"{owner}: heads={{}} selects nothing; pass None for all heads")
        pairs = []
        for pattern, value in heads.items():
            if not isinstance(pattern, str):
                raise ValueError(f"{owner}: heads keys must be layer patterns (str), got {pattern!r}")
            _component_regex(pattern)  # validates the regex
            pairs.append((pattern, indices(value, f"[{pattern!r}]")))
        return tuple(pairs)
    return indices(heads, "")


@functools.lru_cache(maxsize=256)
def _layer_matches(pattern: str, layer: str) -> bool:
    return _component_regex(pattern).search(layer) is not None


@dataclass(frozen=True, kw_only=True)
class PerturbedAttention(AttentionMethod):
    """Base of the guidance methods: guidance settings plus "perturb the ``perturbed`` entries, leave the rest".

    ``scale``: guidance scale s of ``s * (cond - perturbed)`` (diffusers' ``pag_scale``); 0 disables the extra
    branch. ``adaptive_scale``: a of ``s_t = max(0, s - a * (1000 - t))`` on the 1000-step timestep scale
    (diffusers' ``pag_adaptive_scale``; 0 = constant s). ``layers``: anchored regexes over attention-module names
    (``None`` = the family's default, see :mod:`diffattn.guidance`). ``steps``: as in :func:`diffattn.apply`.
    """

    stack_level: ClassVar[int] = 0  # outermost: it expands the batch that the methods under it see
    expands_batch: ClassVar[bool] = True

    scale: float = 3.0
    adaptive_scale: float = 0.0
    layers: str | Sequence[str] | None = None
    heads: HeadSpec = None
    steps: StepSpec = None
    roles: frozenset[str] = field(default=_GUIDANCE_ROLES)

    def __post_init__(self) -> None:
        name = type(self).__name__
        for attr in ("scale", "adaptive_scale"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: {attr} must be a finite number >= 0, got {value!r}")
            object.__setattr__(self, attr, float(value))
        roles = check_roles(self.roles, name)
        if not roles <= _GUIDANCE_ROLES:
            raise ValueError(
                f"{name}: guidance perturbs self-attention and joint attention only (cross-attention is never "
                f"perturbed); roles must be a subset of {sorted(_GUIDANCE_ROLES)}, got {sorted(roles)}"
            )
        object.__setattr__(self, "roles", roles)
        layers = self.layers
        if layers is not None and not isinstance(layers, str):
            layers = tuple(layers)
        heads = _normalise_heads(self.heads, name)
        if heads is not None and isinstance(heads[0], tuple):
            if layers is not None:
                raise ValueError(
                    f"{name}: heads given per layer ({{pattern: heads}}) already choose the layers; leave layers=None"
                )
            layers = tuple(pattern for pattern, _ in heads)  # type: ignore[misc]
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "heads", heads)
        object.__setattr__(self, "steps", StepSchedule.parse(self.steps))

    # -- guidance settings ---------------------------------------------------------------------------------------
    def scale_at(self, timestep: float) -> float:
        """The guidance scale at timestep ``t`` (on the 1000-step scale): ``max(0, s - a (1000 - t))``."""
        if self.adaptive_scale > 0 and self.scale > 0:
            return max(0.0, self.scale - self.adaptive_scale * (1000.0 - timestep))
        return self.scale

    @property
    def perturbs(self) -> bool:
        """False when the perturbed branch would equal the conditional one by construction (nothing to run)."""
        return self.scale > 0

    def heads_for(self, layer: str) -> tuple[int, ...] | None:
        """Global head indices perturbed in ``layer``; ``None`` = all heads."""
        if self.heads is None or not isinstance(self.heads[0], tuple):
            return self.heads  # type: ignore[return-value]
        chosen: set[int] = set()
        for pattern, heads in self.heads:  # type: ignore[misc]
            if _layer_matches(pattern, layer):
                chosen.update(heads)
        return tuple(sorted(chosen))

    # -- the attention core ---------------------------------------------------------------------------------------
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        roles = ctx.batch_roles
        if roles is None or PERTURBED not in roles:
            return ctx.dense(q, k, v)
        if len(roles) != q.shape[0]:
            raise LayoutError(
                f"{ctx.layer}: the attention call has batch {q.shape[0]} but the batch roles are {roles}; "
                "guidance needs the pipeline's own batch layout"
            )
        rows = torch.tensor([i for i, r in enumerate(roles) if r == PERTURBED], device=q.device)
        heads = self._local_heads(ctx, q.shape[1])
        if heads is not None and heads.numel() == 0:
            return ctx.dense(q, k, v)
        return self._perturb(q, k, v, ctx, rows, heads)

    def _perturb(
        self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext, rows: Tensor, heads: Tensor | None
    ) -> Tensor:
        raise NotImplementedError

    def _local_heads(self, ctx: AttentionContext, num_heads: int) -> Tensor | None:
        """The selected heads as indices into this call's heads (under Ulysses a call holds a slice of them)."""
        wanted = self.heads_for(ctx.layer)
        if wanted is None:
            return None
        offset = getattr(ctx, "head_offset", 0)
        total = getattr(ctx, "total_heads", None) or num_heads
        if max(wanted) >= total:
            raise LayerSelectionError(
                f"{type(self).__name__}: head {max(wanted)} requested on {ctx.layer}, which has {total} heads"
            )
        local = [h - offset for h in wanted if offset <= h < offset + num_heads]
        return torch.tensor(local, dtype=torch.long)


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


def _replace(out: Tensor, new: Tensor, rows: Tensor, heads: Tensor | None) -> Tensor:
    """``out`` with entries ``rows`` (and only ``heads`` of them, if given) taken from ``new`` (which has ``rows``)."""
    out = out.clone()
    if heads is None:
        out[rows] = new
    else:
        heads = heads.to(out.device)
        out[rows[:, None], heads[None, :]] = new[:, heads]
    return out


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


@functools.lru_cache(maxsize=128)
def _blur_matrix_cpu(n: int, sigma: float) -> Tensor:
    if n == 1 or sigma >= 3.0 * n:  # the folded Gaussian is uniform to below float64 precision
        return torch.full((n, n), 1.0 / n, dtype=torch.float64)
    period = 2 * n
    radius = math.ceil(10.0 * sigma)  # weights beyond 10 sigma are below exp(-50)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    folded = torch.zeros(period, dtype=torch.float64).index_add_(0, offsets.long() % period, weights)
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    # Reflecting boundary (… 1 0 | 0 1 … n-1 | n-1 …): position i + d lands on j or on its mirror 2n - 1 - j.
    matrix = folded[(j - i) % period] + folded[(period - 1 - j - i) % period]
    return matrix / weights.sum()


def gaussian_blur_matrix(n: int, sigma: float) -> Tensor:
    """``(n, n)`` float64 matrix of a 1-D Gaussian blur of ``sigma`` samples with reflecting borders (rows sum to 1).

    Any ``sigma`` in ``[0, inf]`` is well defined: 0 is the identity, large ``sigma`` tends to (and from ``3 n`` on
    is) the uniform mean. Unlike a truncated kernel with reflect padding it works for any length, even 1.
    """
    if sigma == 0:
        return torch.eye(n, dtype=torch.float64)
    return _blur_matrix_cpu(n, float(sigma))


#: SEG's ``inf_blur_threshold``: with the authors' rule a sigma above it means the mean query (infinite blur).
SEG_INF_BLUR_THRESHOLD = 9999.0


def seg_kernel_size(sigma: float, n: int) -> int:
    """Taps of the authors' SEG kernel on an axis of ``n`` tokens: ``ceil(6 sigma)`` made odd (+1 if even), then
    clamped to ``n`` (odd n) or ``n + 1`` (even n), so the reflect padding of ``size // 2`` always fits."""
    size = math.ceil(6.0 * sigma)
    size = size + 1 - size % 2
    return min(size, n + 1 - n % 2)


@functools.lru_cache(maxsize=128)
def _seg_matrix_cpu(n: int, sigma: float) -> Tensor:
    size = seg_kernel_size(sigma, n)
    half = size // 2
    offsets = torch.arange(-half, half + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = weights / weights.sum()
    src = torch.arange(n)[:, None] + offsets.long()[None, :]  # (n, size) sample positions, reflected into range
    src = torch.where(src < 0, -src, torch.where(src > n - 1, 2 * (n - 1) - src, src))
    matrix = torch.zeros(n, n, dtype=torch.float64)
    return matrix.scatter_add_(1, src, weights.expand(n, size).contiguous())


def seg_blur_matrix(n: int, sigma: float) -> Tensor:
    """``(n, n)`` float64 matrix of SEG's own 1-D blur (SusungHong/SEG-SDXL ``gaussian_blur_2d``, one axis):
    a Gaussian of ``sigma`` truncated to :func:`seg_kernel_size` taps, normalised over those taps, with whole-sample
    reflection at the borders (``F.pad(mode="reflect")``: ... 2 1 | 0 1 ... n-1 | n-2 ...). ``sigma = 0`` is the
    identity; above :data:`SEG_INF_BLUR_THRESHOLD` the authors use the mean instead (see :func:`blur_tokens`)."""
    if sigma == 0 or n == 1:
        return torch.eye(n, dtype=torch.float64)
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"seg_blur_matrix: sigma must be finite and >= 0, got {sigma}")
    return _seg_matrix_cpu(n, float(sigma))


def blur_tokens(x: Tensor, grid: tuple[int, ...], sigma: float, faithful: bool = False) -> Tensor:
    """Blur ``x`` of shape ``(..., prod(grid), D)`` (raster order over ``grid``) along every grid axis.

    ``faithful``: SEG's own kernel (:func:`seg_blur_matrix`; sigma above :data:`SEG_INF_BLUR_THRESHOLD` = mean),
    else the untruncated Gaussian (:func:`gaussian_blur_matrix`; only ``inf`` = mean). Runs where ``x`` lives; the
    per-axis matrices are built once on the CPU in float64 and cast to ``x``'s dtype."""
    lead = x.shape[:-2]
    if math.isinf(sigma) or (faithful and sigma > SEG_INF_BLUR_THRESHOLD):
        return x.mean(dim=-2, keepdim=True).expand_as(x)
    y = x.reshape(*lead, *grid, x.shape[-1])
    for axis, n in enumerate(grid):
        if n == 1:
            continue
        dim = len(lead) + axis
        matrix = (seg_blur_matrix if faithful else gaussian_blur_matrix)(n, sigma)
        y = torch.matmul(matrix.to(device=x.device, dtype=x.dtype), y.movedim(dim, -2)).movedim(-2, dim)
    return y.reshape(x.shape)


@dataclass(frozen=True, kw_only=True)
class SEG(PerturbedAttention):
    """Smoothed energy guidance: the perturbed entries' visual queries are blurred by a Gaussian of ``sigma`` tokens
    over the token grid (every axis, video frames included; any aspect ratio). Keys, values and text queries are
    untouched. Attention logits are linear in the queries, so this blurs the attention energy along the query axis.
    ``sigma = inf`` (default, like SEG's 9999999) replaces every visual query by the mean query (uniform attention);
    ``sigma -> 0`` is the stock attention.

    ``faithful=True`` (default) blurs with the authors' kernel (SEG-SDXL's ``gaussian_blur_2d``, applied per axis):
    ``ceil(6 sigma) + 1`` odd taps clamped to the axis (so a large finite sigma is a flat but not uniform kernel),
    whole-sample ``reflect`` padding, and any sigma above 9999 is the mean query; see :func:`seg_blur_matrix`.
    ``faithful=False`` is diffattn's earlier blur: an untruncated Gaussian with half-sample reflection, which tends
    to the mean smoothly and works on any map (:func:`gaussian_blur_matrix`). They agree at ``sigma = inf``.
    """

    sigma: float = math.inf
    faithful: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        s = self.sigma
        if isinstance(s, bool) or not isinstance(s, (int, float)) or math.isnan(s) or s < 0:
            raise ValueError(f"SEG: sigma must be >= 0 tokens (math.inf = mean query), got {s!r}")
        if not isinstance(self.faithful, bool):
            raise ValueError(
                f"SEG: faithful must be a bool (True: the authors' truncated kernel, False: diffattn's "
                f"untruncated Gaussian), got {self.faithful!r}"
            )
        object.__setattr__(self, "sigma", float(s))

    @property
    def perturbs(self) -> bool:
        return self.scale > 0 and self.sigma > 0

    def _perturb(
        self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext, rows: Tensor, heads: Tensor | None
    ) -> Tensor:
        if self.sigma == 0.0:
            return ctx.dense(q, k, v)
        layout = ctx.q_layout
        vis = layout.visual_slice
        blurred = q.index_select(0, rows).clone()
        blurred[:, :, vis] = blur_tokens(blurred[:, :, vis], layout.grid, self.sigma, self.faithful)
        # One SDPA call for the whole batch: the other entries (and heads) see their original queries, bitwise.
        return ctx.dense(_replace(q, blurred, rows, heads), k, v)
