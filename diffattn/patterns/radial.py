"""Radial Attention's block-level energy-decay mask for videos: :class:`Radial` and :func:`radial_density`."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Pattern, PositionMaskMod, blocks_of, check_grid

__all__ = ["Radial", "radial_density"]


def _bitlen(x: int) -> int:
    return int(x).bit_length()


def _pair_rule(
    i: int, j: int, tokens: int, decay: float, block: int, sink: bool, band_frames: int, faithful: bool = False
):
    """Pre-shrink token mask of frame pair (i, j): ``"dense"``, ``"empty"`` or the integer band half-width W
    (token p of frame i sees token q of frame j iff ``|p - q| <= W``)."""
    if sink and j == 0:
        return "dense"
    d = abs(i - j)
    exponent = _bitlen(tokens) - _bitlen(d)  # lambda(d) = 2**exponent
    # Diagonal split: lambda < 128 (hard-coded, also for 64-token blocks) keeps only distances that are multiples of
    # 128 / lambda (a power of two). The authors apply it to every pair but the sink, neighbouring frames included
    # (it reaches d = 1 only when S_f < 128); diffattn's earlier rule (faithful=False) never splits the dense band.
    split_off = exponent < 7 and d % (1 << (7 - exponent)) != 0
    if d <= band_frames:
        return "empty" if faithful and split_off else "dense"
    if split_off:
        return "empty"
    width = max(float(block), math.ldexp(decay, exponent))
    width = int(math.floor(width))
    return "dense" if width >= tokens - 1 else width


def _shrink_pair(rule, tokens: int, block: int, row_off: int, col_off: int) -> Tensor:
    """Block shrink of one pair's token mask placed at (row_off, col_off) in a canvas of whole blocks: a column of a
    tile is high density if more than a third of the tile's rows are set; the tile is kept if more than 60 % of its
    non-empty columns are high density. Counts are computed from the band geometry, not from the token mask."""
    n_rows = blocks_of(row_off + tokens, block)
    n_cols = blocks_of(col_off + tokens, block)
    tile_rows = torch.arange(n_rows) * block - row_off
    p_lo = tile_rows.clamp(min=0)[:, None, None]
    p_hi = (tile_rows + block - 1).clamp(max=tokens - 1)[:, None, None]
    q = (torch.arange(n_cols)[:, None] * block + torch.arange(block)[None, :] - col_off)[None]  # (1, cols, block)
    valid = (q >= 0) & (q < tokens)
    if rule == "dense":
        count = (p_hi - p_lo + 1).expand(n_rows, n_cols, block)
    else:
        count = (torch.minimum(p_hi, q + rule) - torch.maximum(p_lo, q - rule) + 1).clamp(min=0)
    count = torch.where(valid, count, torch.zeros((), dtype=count.dtype))
    nonempty = (count > 0).sum(dim=-1)
    high = (3 * count > block).sum(dim=-1)
    return 5 * high > 3 * nonempty


@functools.lru_cache(maxsize=32)
def _radial_kept(
    frames: int, tokens: int, decay: float, block: int, sink: bool, band_frames: int, faithful: bool
) -> Tensor:
    n = frames * tokens
    nb = blocks_of(n, block)
    kept = torch.zeros(nb, nb, dtype=torch.bool)
    shrunk: dict = {}
    # The authors' generator pads each pair's canvas to ceil(S_f / b) blocks after the offset and keeps only those,
    # so a pair that straddles one more block (offset + S_f > that) loses its tail tiles; diffattn's earlier rule
    # (faithful=False) keeps every block the pair touches.
    limit = blocks_of(tokens, block) if faithful else None
    for i in range(frames):
        for j in range(frames):
            rule = _pair_rule(i, j, tokens, decay, block, sink, band_frames, faithful)
            if rule == "empty":
                continue
            r, c = (i * tokens) % block, (j * tokens) % block
            key = (rule, r, c)
            if key not in shrunk:
                shrunk[key] = _shrink_pair(rule, tokens, block, r, c)
            tile = shrunk[key][:limit, :limit]
            r0, c0 = (i * tokens) // block, (j * tokens) // block
            kept[r0 : r0 + tile.shape[0], c0 : c0 + tile.shape[1]] |= tile
    # Kept in both modes (not in the authors' code): the diagonal block, so no query is left without keys. It
    # changes nothing when frames are whole blocks (d = 0 is dense); it matters where the block shrink drops a
    # row's only blocks (frames shorter than a block, or the tail tiles the faithful rule drops).
    kept |= torch.eye(nb, dtype=torch.bool)
    return kept


def _check_radial_args(owner: str, decay, block_size, frame_sink, dense_band_frames, faithful=False) -> None:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not math.isfinite(decay) or decay <= 0:
        raise ValueError(
            f"{owner}: decay must be a positive number (γ, e.g. 0.2 for Wan, 0.95 for HunyuanVideo), got {decay!r}"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{owner}: block_size must be a positive int (128 or 64 upstream), got {block_size!r}")
    if not isinstance(frame_sink, bool):
        raise ValueError(
            f"{owner}: frame_sink must be a bool (True for Wan, False for HunyuanVideo), got {frame_sink!r}"
        )
    if isinstance(dense_band_frames, bool) or not isinstance(dense_band_frames, int) or dense_band_frames < 0:
        raise ValueError(f"{owner}: dense_band_frames must be an int >= 0, got {dense_band_frames!r}")
    if not isinstance(faithful, bool):
        raise ValueError(
            f"{owner}: faithful must be a bool (True: the authors' block shrink, False: diffattn's, which keeps the "
            f"tail blocks of frames that straddle a block), got {faithful!r}"
        )


def radial_density(
    frames: int,
    tokens_per_frame: int,
    decay: float = 1.0,
    block_size: int = 128,
    *,
    frame_sink: bool = True,
    dense_band_frames: int = 1,
    faithful: bool = False,
) -> float:
    """Fraction of video token pairs Radial Attention computes (its kept blocks, last partial block counted by its
    real tokens; equal to the kept-block fraction when the token count is a multiple of ``block_size``).
    ``faithful``: the authors' block shrink or diffattn's (see :class:`Radial`)."""
    _check_radial_args("radial_density", decay, block_size, frame_sink, dense_band_frames, faithful)
    if frames < 1 or tokens_per_frame < 1:
        raise ValueError(
            f"radial_density: frames and tokens_per_frame must be positive, got {frames}, {tokens_per_frame}"
        )
    kept = _radial_kept(frames, tokens_per_frame, float(decay), block_size, frame_sink, dense_band_frames, faithful)
    n = frames * tokens_per_frame
    sizes = torch.full((kept.shape[0],), block_size, dtype=torch.float64)
    sizes[-1] = n - block_size * (kept.shape[0] - 1)
    return float(sizes @ kept.to(torch.float64) @ sizes) / (n * n)


@dataclass(frozen=True)
class Radial(Pattern):
    """Radial Attention: a static block mask whose spatial band shrinks exponentially with frame distance.

    Grid ``(f, h, w)`` (any grid whose first axis is frames; tokens per frame S_f = product of the others). For each
    frame pair (i, j), d = |i - j|: j = 0 is fully kept when ``frame_sink`` (Wan); d <= ``dense_band_frames`` is
    fully kept; otherwise token p of frame i sees token q of frame j iff |p - q| <= max(b, 2**bitlen(S_f) /
    2**bitlen(d) * decay) (1-D indices in the frame), and, if lambda = 2**bitlen(S_f) / 2**bitlen(d) < 128, only when
    d is a multiple of 128 / lambda. Each pair's token mask is shrunk to ``block_size`` blocks at its canvas offset
    (a tile is kept when more than 60 % of its non-empty columns have more than a third of the tile's rows set) and
    OR-ed into the global block mask. The mask is block-level: ``mask_mod`` looks up the kept blocks.

    ``faithful=True`` is the authors' generator (``gen_log_mask_shrinked``) in the two points where diffattn's rule
    (``faithful=False``, the default: it measured better on the embedded video model, see the README) differs:
    (1) a pair's canvas is padded to ``ceil(S_f / b)`` blocks from its offset and only those are kept, so where a
    frame is not a whole number of blocks (Wan 480p: S_f = 1,560) the tail of a pair that straddles one more block
    is dropped (diffattn shrinks every block the pair touches: +48..67 blocks of ~13-19k at 16 x 1,560 tokens,
    b = 128); (2) the diagonal split also applies to the dense band, which empties neighbouring frames (d = 1) when
    S_f < 128. Both rules give the same mask when S_f is a multiple of ``block_size`` and at least 128. In both, the
    diagonal block is always kept (the authors' mask can lack it), so no query is left without keys.
    """

    decay: float = 1.0
    block_size: int = 128
    frame_sink: bool = True
    dense_band_frames: int = 1
    faithful: bool = False

    def __post_init__(self) -> None:
        _check_radial_args(
            type(self).__name__, self.decay, self.block_size, self.frame_sink, self.dense_band_frames, self.faithful
        )
        object.__setattr__(self, "decay", float(self.decay))

    def _frames(self, grid: tuple[int, ...]) -> tuple[int, int]:
        name = type(self).__name__
        grid = check_grid(grid, None, name)
        if len(grid) < 2:
            raise ValueError(
                f"{name} is a video pattern: the token grid must be (frames, height, width), got {grid}; "
                "use SlidingWindow or ShiftedWindow for images"
            )
        return grid[0], math.prod(grid[1:])

    def pair_rule(self, grid: tuple[int, ...], i: int, j: int):
        """The pre-shrink token mask of frames (i, j): ``"dense"``, ``"empty"`` or the band half-width (int)."""
        frames, tokens = self._frames(grid)
        if not (0 <= i < frames and 0 <= j < frames):
            raise ValueError(f"{type(self).__name__}: frame pair ({i}, {j}) outside 0..{frames - 1}")
        return _pair_rule(
            i, j, tokens, self.decay, self.block_size, self.frame_sink, self.dense_band_frames, self.faithful
        )

    def kept_blocks(self, grid: tuple[int, ...]) -> Tensor:
        """Kept blocks ``(nb, nb)`` of ``block_size`` raster tokens (a fresh tensor)."""
        frames, tokens = self._frames(grid)
        kept = _radial_kept(
            frames, tokens, self.decay, self.block_size, self.frame_sink, self.dense_band_frames, self.faithful
        )
        return kept.clone()

    def density(self, grid: tuple[int, ...]) -> float:
        frames, tokens = self._frames(grid)
        return radial_density(
            frames,
            tokens,
            self.decay,
            self.block_size,
            frame_sink=self.frame_sink,
            dense_band_frames=self.dense_band_frames,
            faithful=self.faithful,
        )

    def mask_mod(self, grid: tuple[int, ...]) -> PositionMaskMod:
        kept = self.kept_blocks(grid)
        b, last = self.block_size, kept.shape[0] - 1

        def mask_mod(q_pos: Tensor, kv_pos: Tensor) -> Tensor:
            table = kept if kept.device == q_pos.device else kept.to(q_pos.device)  # positions may live on a GPU
            return table[(q_pos // b).clamp(max=last), (kv_pos // b).clamp(max=last)]

        return mask_mod

    def block_relation(self, grid: tuple[int, ...], block_size: int) -> tuple[Tensor, Tensor]:
        """``any_ == full == kept`` at the pattern's block size; at another block size the relation is re-blocked
        exactly (the token mask is constant on the pattern's blocks)."""
        kept = self.kept_blocks(grid)
        if block_size == self.block_size:
            return kept, kept.clone()
        if block_size < 1:
            raise ValueError(f"block_size must be a positive number of tokens, got {block_size}")
        frames, tokens = self._frames(grid)
        n = frames * tokens
        starts = torch.arange(0, n, block_size)
        first = starts // self.block_size
        last = (starts + block_size - 1).clamp(max=n - 1) // self.block_size
        prefix = torch.zeros(kept.shape[0] + 1, kept.shape[1] + 1, dtype=torch.int64)
        prefix[1:, 1:] = kept.to(torch.int64).cumsum(0).cumsum(1)
        r0, r1 = first[:, None], last[:, None] + 1
        c0, c1 = first[None, :], last[None, :] + 1
        count = prefix[r1, c1] - prefix[r0, c1] - prefix[r1, c0] + prefix[r0, c0]
        area = (r1 - r0) * (c1 - c0)
        return count > 0, count == area
