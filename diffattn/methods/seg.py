"""Smoothed energy guidance: :class:`SEG` (see :mod:`~diffattn.methods.perturbed` for what every
perturbed-attention method shares).

The perturbed entries' visual queries are blurred by a Gaussian of ``sigma`` tokens over the token grid (every axis,
frames included); ``sigma = inf`` gives the mean query. By default with the authors' kernel (``faithful=True``:
``ceil(6 sigma) + 1`` odd taps clamped to the map, whole-sample reflection; :func:`seg_blur_matrix`), else an
untruncated Gaussian (:func:`gaussian_blur_matrix`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..context import AttentionContext
from .perturbed import PerturbedAttention, _replace

__all__ = ["SEG", "gaussian_blur_matrix", "seg_blur_matrix", "SEG_INF_BLUR_THRESHOLD"]


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
