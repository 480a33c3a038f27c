"""Dynamic block selection: which key blocks each query block computes, chosen per call from pooled q and k.

Pure tensor functions (no diffusers): the methods in :mod:`diffattn.methods.dynamic_sparse`,
:mod:`diffattn.methods.pyramid` and :mod:`diffattn.methods.downsampling` call them per batch entry.

- :func:`block_order`: the kernel order of a call (tile-major for a ``tile``, else raster) with blocks of one tile.
- :func:`pool_blocks`, :func:`block_self_similarity`: mean-pooled vectors per block and how much a block's tokens
  agree (mean cosine similarity of distinct pairs).
- :func:`block_probabilities`: softmax over key blocks of the pooled scores, each block weighted by its token count
  (``exp(q̄·k̄ + log n_k)``: the mass a block would get if its tokens were its mean). ``(n/b)²`` per head, never n².
- :func:`forced_blocks`, :func:`select_topk`, :func:`select_topp`, :func:`pyramid_levels`: the selection rules.
- :func:`selection_block_mask`: a selection placed on the kernel order (text rows/columns dense) as a ``BlockMask``.
- :func:`pool_grid`: ToDo's key/value downsampling over the token grid.

Conventions: relations are ``(..., n_query_blocks, n_key_blocks)`` over the *visual* blocks of the kernel order;
text blocks are added by :func:`diffattn.patterns.compile.place_visual_relation` (text rows and columns dense, never
counted in a budget). Ranks are by descending probability, ties broken by block index, forced blocks first.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from ..layout import TokenLayout
from .base import blocks_of
from .compile import (
    KernelOrder,
    kept_token_pairs,
    kernel_order,
    place_visual_relation,
    relation_block_mask,
    token_mask_mod,
)
from .tile import SlidingTile

__all__ = [
    "PYRAMID_LEVELS",
    "block_order",
    "fit_tile",
    "pool_blocks",
    "block_self_similarity",
    "block_probabilities",
    "forced_blocks",
    "block_ranks",
    "select_topk",
    "select_topp",
    "pyramid_levels",
    "selection_block_mask",
    "pool_grid",
    "POOL_MODES",
]

#: KV pooling levels of pyramid sparse attention (PSA): full resolution, then 2x, 4x, 8x pooled blocks.
PYRAMID_LEVELS: tuple[int, ...] = (1, 2, 4, 8)


def fit_tile(tile: tuple[int, ...], grid: tuple[int, ...]) -> tuple[int, ...]:
    """``tile`` clipped to the grid (a tile never spans more than an axis), one value per grid axis."""
    if len(tile) != len(grid):
        raise ValueError(
            f"tile {tile} has {len(tile)} axes but the layer's tokens form a {len(grid)}-D grid {grid}; give one "
            "value per axis"
        )
    return tuple(min(t, n) for t, n in zip(tile, grid))


@functools.lru_cache(maxsize=64)
def block_order(
    layout: TokenLayout, tile: tuple[int, ...] | None, block_size: int, text_padding: int = 0
) -> KernelOrder:
    """Kernel order of a call for block selection: tile-major with one (clipped) tile per block when ``tile`` is
    given (spatially compact blocks, e.g. for videos), else raster order with blocks of ``block_size``."""
    if tile is None:
        return kernel_order(None, layout, block_size, text_padding)
    tile = fit_tile(tile, layout.grid)
    order = SlidingTile(tile, 1).token_order(layout.grid)
    return kernel_order(order, layout, math.prod(tile), text_padding)


def _blocked(x: Tensor, valid: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """``x`` (..., L, D) as (at least) float32 (..., nb, b, D) with invalid positions zeroed, and the weights (nb,
    b)."""
    length, dim = x.shape[-2:]
    nb = blocks_of(length, block_size)
    pad = nb * block_size - length
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    w = F.pad(valid.to(device=x.device, dtype=x.dtype), (0, pad))
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    x = x.reshape(*x.shape[:-2], nb, block_size, dim)
    if not bool(w.all()):
        x = x * w.view(nb, block_size, 1)
    return x, w.view(nb, block_size)


def pool_blocks(x: Tensor, valid: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Mean of the valid positions of each block: ``(means (..., nb, D), counts (nb,))`` (at least float32). ``x`` is
    ``(..., L, D)`` in kernel order, ``valid`` ``(L,)`` bool. Blocks without a valid position give 0."""
    blocks, w = _blocked(x, valid, block_size)
    counts = w.sum(-1)
    return blocks.sum(-2) / counts.clamp(min=1.0).unsqueeze(-1), counts


def block_self_similarity(x: Tensor, valid: Tensor, block_size: int) -> Tensor:
    """Mean cosine similarity between distinct valid positions of each block, ``(..., nb)``; 1 for blocks with fewer
    than two positions. Computed from the sum of unit vectors (``(|Σx̂|² - n) / (n(n-1))``), in O(L·D)."""
    blocks, w = _blocked(x, valid, block_size)
    unit = F.normalize(blocks, dim=-1) * w.unsqueeze(-1)
    n = w.sum(-1)
    total = unit.sum(-2).square().sum(-1)
    pairs = n * (n - 1)
    return torch.where(pairs > 0, (total - n) / pairs.clamp(min=1.0), torch.ones_like(total))


def block_probabilities(q_means: Tensor, k_means: Tensor, k_counts: Tensor, scale: float) -> Tensor:
    """Softmax over key blocks of ``scale · q̄·k̄ + log n_k``: ``(..., nqb, nkb)`` (float32, or float64 for float64
    inputs). Empty key blocks get 0.

    A score that is not finite (a NaN / Inf token pooled into q̄ or k̄, or an overflow) gets probability 0 too, so
    it ranks last instead of first: a NaN key block is kept only where the selection keeps it for another reason
    (forced, or a budget reaching the last ranks), never for its score. A row without a finite score is all 0."""
    dtype = torch.promote_types(q_means.dtype, torch.float32)
    logits = torch.matmul(q_means.to(dtype), k_means.to(dtype).transpose(-1, -2)) * scale
    logits = logits + torch.log(k_counts.to(logits)).view(*([1] * (logits.ndim - 1)), -1)
    finite = torch.isfinite(logits)
    if bool(finite.all()):
        return torch.softmax(logits, dim=-1)
    probs = torch.softmax(torch.where(finite, logits, -math.inf), dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def forced_blocks(
    num_q: int,
    num_k: int,
    *,
    q_similarity: Tensor | None = None,
    k_similarity: Tensor | None = None,
    threshold: float | None = None,
    device: torch.device | str = "cpu",
    diagonal: bool = True,
) -> Tensor:
    """Blocks kept whatever the budget, ``(..., num_q, num_k)`` bool: each query block's own (diagonal) block (unless
    ``diagonal=False``) and, with a ``threshold``, the whole row of a query block and the whole column of a key block
    whose tokens disagree (self-similarity below ``threshold``): their pooled vector does not represent them, so they
    are computed."""
    idx_q = torch.arange(num_q, device=device).view(-1, 1)
    idx_k = torch.arange(num_k, device=device).view(1, -1)
    forced = (idx_q == idx_k) & diagonal
    if threshold is not None:
        if q_similarity is not None:
            forced = forced | (q_similarity < threshold).unsqueeze(-1)
        if k_similarity is not None:
            forced = forced | (k_similarity < threshold).unsqueeze(-2)
    return forced


def block_ranks(probs: Tensor, forced: Tensor) -> tuple[Tensor, Tensor]:
    """``(rank, order)`` of every key block in its row: forced blocks first, then by descending probability, ties by
    block index. ``order[..., r]`` is the block at rank ``r``."""
    key = torch.where(forced, torch.full_like(probs, math.inf), probs)
    order = torch.argsort(key, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(probs.shape[-1], device=probs.device).expand_as(order)
    )
    return rank, order


def _per_row(budget: Tensor | float, probs: Tensor) -> Tensor:
    budget = torch.as_tensor(budget, dtype=torch.float64, device=probs.device)
    return budget.view(*budget.shape, 1, 1) if budget.ndim else budget


def select_topk(probs: Tensor, forced: Tensor, fraction: Tensor | float) -> Tensor:
    """Per query block: the forced blocks, filled up with the most probable others to ``ceil(fraction · n_k)`` blocks
    in all (or just the forced ones if they are more). ``fraction`` is a float or one per leading index (head)."""
    count = torch.ceil(_per_row(fraction, probs) * probs.shape[-1] - 1e-9)
    rank, _ = block_ranks(probs, forced)
    return forced | (rank < count)


def select_topp(probs: Tensor, forced: Tensor, mass: Tensor | float) -> Tensor:
    """Per query block: the smallest set of blocks that contains the forced ones and covers probability ``mass`` (the
    forced blocks' mass counts), taking the most probable first. ``mass >= 1`` keeps every block."""
    mass = _per_row(mass, probs)
    _, order = block_ranks(probs, forced)
    sorted_probs = probs.gather(-1, order)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the blocks ranked above
    keep_sorted = forced.gather(-1, order) | (before < mass) | (mass >= 1.0)
    return torch.zeros_like(forced).scatter_(-1, order, keep_sorted)


def pyramid_levels(
    probs: Tensor, forced: Tensor, edges: Tensor | tuple[float, ...], poolable: Tensor | None = None
) -> Tensor:
    """PSA's KV pooling level of each block, int64 (0 = skipped, else 1, 2, 4 or 8): blocks ranked below
    ``ceil(edges[i] · n_k)`` get ``PYRAMID_LEVELS[i]`` (first matching band). ``edges`` are cumulative fractions
    (``(e1, e2, e3, e4)`` non-decreasing), one tuple or one row per leading index (head). Forced blocks and blocks
    that may not be pooled (``poolable`` False) are computed at full resolution instead of pooled."""
    edges = torch.as_tensor(edges, dtype=torch.float64, device=probs.device)
    counts = torch.ceil(edges * probs.shape[-1] - 1e-9)  # (..., 4)
    rank, _ = block_ranks(probs, forced)
    levels = torch.zeros(probs.shape, dtype=torch.int64, device=probs.device)
    for i in reversed(range(len(PYRAMID_LEVELS))):
        bound = counts[..., i].view(*counts.shape[:-1], 1, 1) if counts.ndim > 1 else counts[i]
        levels = torch.where(rank < bound, PYRAMID_LEVELS[i], levels)
    if poolable is not None:
        levels = torch.where((levels > 1) & ~poolable, 1, levels)
    return torch.where(forced, 1, levels)


def selection_block_mask(
    ko: KernelOrder, selected: Tensor, device: torch.device | str = "cpu"
) -> tuple[BlockMask, float]:
    """``(block_mask, density)`` of a visual block selection ``(H, nvb, nvb)`` on kernel order ``ko``: selected blocks
    are computed whole, text rows and columns dense, padding keys never. ``density`` is the fraction of real
    (query, key) pairs inside computed blocks, averaged over heads."""
    selected = selected.to("cpu")
    any_, full = place_visual_relation(ko, selected, selected)
    block = ko.block_size
    sel = selected.to(device)

    def visual_mod(q: Tensor, kv: Tensor, h: Tensor) -> Tensor:
        return sel[h, q // block, kv // block]

    mask_mod = token_mask_mod(ko, visual_mod, True, device)
    # built per call: the query-side lists (FlexAttention's backward only) are skipped when no gradient can flow
    block_mask = relation_block_mask(any_, full, block, ko.length, mask_mod, compute_q_blocks=torch.is_grad_enabled())
    if str(device) != "cpu":
        block_mask = block_mask.to(device)
    real = int(ko.valid.sum())
    return block_mask, kept_token_pairs(any_, ko.valid, block) / max(real * real, 1)


#: ``pool_grid`` modes: the authors' interpolations (output ``floor(L / factor)`` per axis) and diffattn's cell
#: pools (output ``ceil(L / factor)``, smaller border cells).
POOL_MODES = ("nearest-exact", "nearest", "avg", "max", "top-left")


def _interpolate_index(length: int, out: int, mode: str) -> Tensor:
    """Source index of each of ``out`` samples that ``F.interpolate(size=out, mode=mode)`` picks on an axis of
    ``length`` (computed by the op itself, so float rounding matches it exactly)."""
    src = torch.arange(length, dtype=torch.float64).view(1, 1, length)
    return F.interpolate(src, size=out, mode=mode).view(out).round().long()


def pool_grid(
    x: Tensor, grid: tuple[int, ...], factor: int, mode: str = "nearest-exact"
) -> tuple[Tensor, tuple[int, ...]]:
    """ToDo's downsampling: ``x`` (..., S, D) with S = prod(grid) raster tokens, reduced by ``factor`` on the last
    two grid axes (each frame of a video separately). Runs where ``x`` lives.

    ``mode``: ``"nearest-exact"`` (the authors' library default) and ``"nearest"`` (their demo app) are their
    ``F.interpolate(size=(h // factor, w // factor), mode=...)``: ``floor`` sizes, one token per output (nearest-exact
    takes ``floor((i + 0.5) * h / h')``, nearest ``floor(i * h / h')``). diffattn's ``"avg"`` / ``"max"`` pool
    ``factor x factor`` cells and ``"top-left"`` takes each cell's first token: ``ceil`` sizes, border cells of sizes
    the factor does not divide hold fewer tokens. Returns the reduced tokens (..., S', D) in raster order of the
    reduced grid, and that grid."""
    if len(grid) < 2:
        raise ValueError(f"pool_grid needs a grid of at least 2 axes, got {grid}")
    if mode not in POOL_MODES:
        raise ValueError(f"pool_grid: mode is one of {POOL_MODES}, got {mode!r}")
    *lead, h, w = grid
    interpolate = mode in ("nearest-exact", "nearest")
    size = (lambda n: n // factor) if interpolate else (lambda n: -(-n // factor))
    pooled_grid = (*lead, size(h), size(w))
    if factor == 1:
        return x, tuple(grid)
    if interpolate and min(pooled_grid[-2:]) < 1:
        raise ValueError(
            f"pool_grid: factor {factor} leaves no token of a {h}x{w} frame with mode={mode!r} (output floor(L / "
            f"factor)); use a factor <= {min(h, w)} or mode='avg'"
        )
    batch_shape, dim = x.shape[:-2], x.shape[-1]
    frames = math.prod(lead) if lead else 1
    planes = x.reshape(-1, h, w, dim)  # (N·frames, h, w, D)
    if interpolate:
        rows = _interpolate_index(h, pooled_grid[-2], mode).to(x.device)
        cols = _interpolate_index(w, pooled_grid[-1], mode).to(x.device)
        out = planes.index_select(1, rows).index_select(2, cols)
    elif mode == "top-left":
        out = planes[:, ::factor, ::factor]
    else:
        planes = planes.permute(0, 3, 1, 2)
        pool = F.avg_pool2d if mode == "avg" else F.max_pool2d
        out = pool(planes, factor, factor, ceil_mode=True).permute(0, 2, 3, 1)
    return out.reshape(*batch_shape, frames * pooled_grid[-2] * pooled_grid[-1], dim), pooled_grid
