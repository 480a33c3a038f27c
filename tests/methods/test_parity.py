"""Parity with the papers' own code (issue #19): each authors' rule is written out here from their repositories'
construction, step by step (never through diffattn's helpers), and compared with diffattn's faithful mode (the
default of SEG, ToDo and ShiftedWindowAttention; ``RadialAttention(faithful=True)``, whose default is diffattn's rule).

- Radial Attention (mit-han-lab/radial-attention, ``gen_log_mask_shrinked``): per frame pair a token mask (frame
  sink, band width, diagonal split), placed at the pair's offset in a canvas padded to ``ceil(S_f / b)`` blocks,
  shrunk tile by tile (column density > 1/3, > 60 % of non-empty columns), OR-ed into the block mask.
- SEG (SusungHong/SEG-SDXL, ``gaussian_blur_2d``): ``ceil(6 sigma)`` made odd, clamped to the map, a normalised
  Gaussian on integer offsets, outer product, ``F.pad(mode="reflect")``, depthwise ``conv2d``; sigma > 9999 = mean.
- ToDo (ethansmith2000/ImprovedTokenMerge, ``up_or_downsample``): ``(B, h*w, C)`` -> ``(B, C, h, w)``,
  ``F.interpolate(size=(h // f, w // f), mode="nearest-exact" | "nearest")``, back to tokens.
- HiDiffusion MSW-MSA (megvii-research/HiDiffusion): window ``ceil(H / 2)``, shift ``(window // 4) * k``, no roll
  when the first shift is 0, ``torch.roll`` by -shift, 2 x 2 windows folded into the batch, attention, reverse.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from diffattn.context import AttentionContext
from diffattn.guidance import SEG
from diffattn.layout import TokenLayout
from diffattn.methods.downsampling import TokenDownsampling
from diffattn.methods.seg import blur_tokens
from diffattn.methods.sparse import RadialAttention, ShiftedWindowAttention
from diffattn.patterns import Radial, ShiftedWindow
from diffattn.patterns.dynamic import pool_grid


@contextlib.contextmanager
def one_thread():
    """Many small tensor ops: one thread is ~10x faster than two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_ctx(layout: TokenLayout, *, roles=None, step=0) -> AttentionContext:
    return AttentionContext(
        layer="blocks.0.attn1",
        role="self",
        step=step,
        num_steps=10,
        q_layout=layout,
        kv_layout=layout,
        batch_roles=roles,
        attn_mask=None,
        scale=None,
        enable_gqa=False,
        dense=lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        report=lambda **m: None,
    )


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------------------------- Radial


def authors_radial(frames: int, tokens: int, block: int, decay: float, wan: bool) -> torch.Tensor:
    """The authors' block mask for ``frames x tokens`` video tokens (their code needs a multiple of the block).

    ``wan``: model_type "wan" (frame sink on) else "hunyuan"; both keep d <= 1 at full width. A tile's column counts
    are the column sums of the pair's token mask over the tile's rows (prefix sums over rows, one per band width),
    which is what their ``mask.sum(dim=1)`` on the padded canvas computes, without an n x n canvas per pair."""
    assert (frames * tokens) % block == 0, "the authors' generator floors the block count"
    nb = frames * tokens // block
    final = torch.zeros(nb, nb, dtype=torch.bool)
    idx = torch.arange(tokens, dtype=torch.int32)

    def bitlen(x):  # Python's int.bit_length, as theirs
        return int(x).bit_length()

    padded = ((tokens - 1) // block + 1) * block  # the canvas: remainder + this many tokens per side
    tiles = padded // block  # rows // block of that canvas, for any remainder < block
    row_prefix: dict = {}
    for i in range(frames):
        for j in range(frames):
            d = abs(i - j)
            if wan and j == 0:
                width = tokens  # attention sink: the whole pair
            else:
                width = tokens if d <= 1 else max(2 ** bitlen(tokens) / 2 ** bitlen(d) * decay, block)
                decay_length = 2 ** bitlen(tokens) / 2 ** bitlen(d)
                if decay_length < 128 and d % int(128 / decay_length) != 0:
                    continue  # the split mask is all False: no tile of this pair is kept
            if width not in row_prefix:
                local = (idx[None, :] - idx[:, None]).abs() <= width
                prefix = torch.zeros(tokens + 1, tokens, dtype=torch.int32)
                prefix[1:] = local.to(torch.int32).cumsum(0)
                row_prefix[width] = prefix
            prefix = row_prefix[width]
            r, c = (i * tokens) % block, (j * tokens) % block
            t = torch.arange(tiles)
            lo, hi = (t * block - r).clamp(0, tokens), ((t + 1) * block - r).clamp(0, tokens)
            counts = torch.zeros(tiles, c + padded, dtype=torch.int32)  # canvas columns; rows start at offset r
            counts[:, c : c + tokens] = prefix[hi] - prefix[lo]
            density = counts[:, : tiles * block].reshape(tiles, tiles, block) / block
            kept = (density > 1 / 3).sum(-1) / ((density > 0).sum(-1) + 1e-9) > 0.6
            r0, c0 = i * tokens // block, j * tokens // block
            final[r0 : r0 + tiles, c0 : c0 + tiles] |= kept
    return final


RADIAL_CASES = [
    # (grid, block): Wan 480p (S_f = 1,560, frames straddle blocks) and 720p (3,600) at the block sizes, and
    # short frames that reach the diagonal split (200) and split the neighbouring frames too (100 < 128)
    *[((16, 30, 52), b) for b in (128, 64)],
    *[((8, 45, 80), b) for b in (128, 64)],
    *[((32, 10, 20), b) for b in (128, 64)],
    *[((32, 10, 10), b) for b in (128, 64)],
]


@pytest.mark.parametrize("sink", [True, False], ids=["sink", "no-sink"])
@pytest.mark.parametrize("grid, block", RADIAL_CASES)
def test_radial_equals_authors_mask_plus_diagonal(grid, block, sink):
    frames, tokens = grid[0], grid[1] * grid[2]
    decay = 0.2 if sink else 0.95  # Wan's and HunyuanVideo's settings
    with one_thread():
        ref = authors_radial(frames, tokens, block, decay, wan=sink)
        got = Radial(decay, block_size=block, frame_sink=sink, faithful=True).kept_blocks(grid)
        old = Radial(decay, block_size=block, frame_sink=sink).kept_blocks(grid)  # the default: diffattn's rule
    eye = torch.eye(ref.shape[0], dtype=torch.bool)
    assert torch.equal(got, ref | eye)  # the one deviation: the diagonal block is always kept
    method = RadialAttention(decay=decay, block_size=block, frame_sink=sink, faithful=True)
    assert method.pattern_for(make_ctx(TokenLayout(grid))) == Radial(decay, block, sink, faithful=True)
    rows = got.any(1)
    assert bool(rows.all()), "a query block without keys"
    assert bool((ref <= old).all())
    if tokens == 1560:
        # where frames straddle blocks the authors' mask drops tail tiles that diffattn's earlier rule keeps
        assert int(old.sum()) - int(got.sum()) > 0
    if tokens == 100:
        # with S_f < 128 the split reaches neighbouring frames, and the authors' mask lacks some diagonal blocks
        assert int(old.sum()) > int(got.sum())
        if block == 128:
            assert bool((eye & ~ref).any())


def test_radial_faithful_flag_is_validated_and_keyed():
    # diffattn's rule is the default (it measured better on the embedded video model: README, Deviations)
    assert not Radial().faithful and not RadialAttention().faithful
    assert Radial(0.2, faithful=True) != Radial(0.2)
    assert Radial(0.2, faithful=True).density((16, 30, 52)) < Radial(0.2).density((16, 30, 52))
    with pytest.raises(ValueError, match="faithful must be a bool"):
        Radial(0.2, faithful=1)
    with pytest.raises(ValueError, match="faithful must be a bool"):
        RadialAttention(faithful="yes")


# ------------------------------------------------------------------------------------------------------- SEG


def authors_seg_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """SEG-SDXL's query blur of a ``(B, C, H, W)`` square map (in the input's dtype)."""
    if sigma > 9999.0:  # inf_blur_threshold
        return img.mean(dim=(-2, -1), keepdim=True).expand_as(img)
    kernel_size = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    height = img.shape[-1]
    kernel_size = min(kernel_size, height - (height % 2 - 1))
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size, dtype=img.dtype)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    kernel = pdf / pdf.sum()
    kernel2d = (kernel[:, None] @ kernel[None, :]).expand(img.shape[-3], 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    return F.conv2d(F.pad(img, [pad, pad, pad, pad], mode="reflect"), kernel2d, groups=img.shape[-3])


def to_map(x: torch.Tensor, side: int) -> torch.Tensor:
    """(B, H, S, D) tokens -> (B, H*D, side, side), the authors' permute + view."""
    b, h, _, d = x.shape
    return x.permute(0, 1, 3, 2).reshape(b, h * d, side, side)


def from_map(m: torch.Tensor, heads: int) -> torch.Tensor:
    b, hd, side, _ = m.shape
    return m.reshape(b, heads, hd // heads, side * side).permute(0, 1, 3, 2)


@pytest.mark.parametrize("side", [7, 8, 32])
@pytest.mark.parametrize("sigma", [1.0, 2.0, 5.0, 10.0, math.inf])
def test_seg_blur_equals_authors(side, sigma):
    q = randn(2, 3, side * side, 4, seed=side)
    expected = from_map(authors_seg_blur(to_map(q, side), sigma), heads=3)
    torch.testing.assert_close(blur_tokens(q, (side, side), sigma, faithful=True), expected, rtol=0, atol=1e-12)
    # diffattn's earlier blur differs (borders; a clamped kernel in the interior) except at sigma = inf
    old = blur_tokens(q, (side, side), sigma, faithful=False)
    if math.isinf(sigma):
        torch.testing.assert_close(old, expected, rtol=0, atol=1e-12)
    else:
        assert float((old - expected).norm() / expected.norm()) > 1e-3


def test_seg_authors_threshold_and_method_output():
    side, heads = 8, 2
    layout = TokenLayout((side, side))
    q, k, v = (randn(2, heads, side * side, 4, seed=s, dtype=torch.float32) for s in (1, 2, 3))
    ctx = make_ctx(layout, roles=("cond", "perturbed"))
    for sigma in (2.0, 5.0, 20000.0):  # 20000 > 9999: the authors' mean query, finite sigma
        blurred = from_map(authors_seg_blur(to_map(q[1:].double(), side), sigma), heads).float()
        expected = F.scaled_dot_product_attention(torch.cat([q[:1], blurred]), k, v)
        out = SEG(sigma=sigma)(q, k, v, ctx)
        torch.testing.assert_close(out, expected, rtol=0, atol=2e-6)
        assert torch.equal(out[0], F.scaled_dot_product_attention(q, k, v)[0])
    # diffattn's earlier blur at a large finite sigma is a smooth approach to the mean, not the authors' switch
    mean_rows = SEG(sigma=20000.0, faithful=False)(q, k, v, ctx)[1]
    torch.testing.assert_close(mean_rows, mean_rows[:, :1].expand_as(mean_rows), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="faithful must be a bool"):
        SEG(faithful=None)


# ------------------------------------------------------------------------------------------------------- ToDo


def authors_downsample(item: torch.Tensor, h: int, w: int, factor: int, method: str) -> torch.Tensor:
    """ImprovedTokenMerge's ``up_or_downsample`` for the interpolating methods: ``(B, h*w, C)`` tokens."""
    new_h, new_w = h // factor, w // factor
    b = item.shape[0]
    item = item.reshape(b, h, w, -1).permute(0, 3, 1, 2)
    item = F.interpolate(item, size=(new_h, new_w), mode=method)
    return item.permute(0, 2, 3, 1).reshape(b, new_h * new_w, -1)


@pytest.mark.parametrize("mode", ["nearest-exact", "nearest"])
@pytest.mark.parametrize("grid, factor", [((7, 9), 2), ((10, 7), 3), ((9, 9), 4), ((16, 32), 3), ((3, 11, 13), 2)])
def test_todo_downsampling_equals_authors(grid, factor, mode):
    *lead, h, w = grid
    frames = math.prod(lead) if lead else 1
    x = randn(2, 3, math.prod(grid), 5, seed=sum(grid))
    got, pooled = pool_grid(x, grid, factor, mode)
    assert pooled == (*lead, h // factor, w // factor)
    per_frame = x.reshape(2 * 3 * frames, h * w, 5)  # the authors see one frame per batch entry
    expected = authors_downsample(per_frame, h, w, factor, mode).reshape(got.shape)
    assert torch.equal(got, expected)


def test_todo_nearest_exact_picks_cell_centres_by_hand():
    # 7 rows, factor 2 -> 3 rows: nearest-exact takes floor((i + 0.5) * 7 / 3) = 1, 3, 5; nearest floor(i * 7/3)
    x = torch.arange(7 * 4, dtype=torch.float64).reshape(1, 1, 28, 1)
    exact, _ = pool_grid(x, (7, 4), 2, "nearest-exact")
    nearest, _ = pool_grid(x, (7, 4), 2, "nearest")
    assert exact.flatten().tolist() == [r * 4 + c for r in (1, 3, 5) for c in (1, 3)]
    assert nearest.flatten().tolist() == [r * 4 + c for r in (0, 2, 4) for c in (0, 2)]


def test_todo_default_is_authors_and_attends_downsampled_keys():
    method = TokenDownsampling(factor=3)
    assert method.mode == "nearest-exact"
    layout = TokenLayout((10, 7))
    q, k, v = (randn(2, 2, 70, 8, seed=s, dtype=torch.float32) for s in (4, 5, 6))
    kd, vd = (authors_downsample(x.reshape(4, 70, 8), 10, 7, 3, "nearest-exact").reshape(2, 2, 6, 8) for x in (k, v))
    torch.testing.assert_close(
        method(q, k, v, make_ctx(layout)), F.scaled_dot_product_attention(q, kd, vd), rtol=0, atol=1e-6
    )


def test_todo_interpolating_modes_refuse_a_factor_that_leaves_no_row():
    from diffattn.errors import MethodConfigError

    ctx = make_ctx(TokenLayout((12, 3)))
    with pytest.raises(MethodConfigError, match=r"floor\(3 / 4\) = 0 rows or columns.*Fix: use factor <= 3"):
        TokenDownsampling(factor=4).validate(ctx)
    TokenDownsampling(factor=4, mode="avg").validate(ctx)  # ceil sizes: 3 x 1 cells
    with pytest.raises(ValueError, match="pool_grid: factor 4 leaves no token"):
        pool_grid(randn(1, 1, 36, 2), (12, 3), 4, "nearest-exact")
    with pytest.raises(ValueError, match="mode is one of"):
        TokenDownsampling(mode="bilinear")


# ------------------------------------------------------------------------------------------------------- HiDiffusion


def authors_windowed_attention(q, k, v, height: int, width: int, quarter: int) -> torch.Tensor:
    """MSW-MSA with HiDiffusion's shift for quarter k (even H, W: their path without resizing)."""
    window = (math.ceil(height / 2), math.ceil(width / 2))
    shift = (window[0] // 4 * quarter, window[1] // 4 * quarter)

    def partition(t):  # (B, heads, H*W, D) -> (B*4, heads, window tokens, D)
        b, heads, _, d = t.shape
        t = t.permute(0, 2, 1, 3).reshape(b, height, width, heads * d)
        if shift[0] > 0:
            t = torch.roll(t, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        t = t.view(b, 2, window[0], 2, window[1], heads * d).permute(0, 1, 3, 2, 4, 5)
        return t.reshape(b * 4, window[0] * window[1], heads, d).transpose(1, 2)

    def reverse(t, b):
        heads, d = t.shape[1], t.shape[-1]
        t = t.transpose(1, 2).reshape(b, 2, 2, window[0], window[1], heads * d).permute(0, 1, 3, 2, 4, 5)
        t = t.reshape(b, height, width, heads * d)
        if shift[0] > 0:
            t = torch.roll(t, shifts=(shift[0], shift[1]), dims=(1, 2))
        return t.reshape(b, height * width, heads, d).transpose(1, 2)

    out = F.scaled_dot_product_attention(partition(q), partition(k), partition(v))
    return reverse(out, q.shape[0])


@pytest.mark.parametrize("grid", [(20, 20), (12, 20), (6, 20), (28, 12), (16, 16)])
@pytest.mark.parametrize("quarter", [0, 1, 2, 3])
def test_hidiffusion_shift_equals_authors(grid, quarter):
    h, w = grid
    window = (h // 2, w // 2)  # 10, 6, 3, 14: not multiples of 4 (16 x 16: a multiple, as a control)
    expected_shift = (window[0] // 4 * quarter, window[1] // 4 * quarter)
    if expected_shift[0] == 0:
        expected_shift = (0, 0)  # their roll is skipped when the first shift is 0 (window 3 rows)
    assert ShiftedWindow.from_fraction(grid, quarter / 4).shift == expected_shift
    q, k, v = (randn(2, 2, h * w, 8, seed=s + quarter, dtype=torch.float32) for s in (7, 8, 9))
    method = ShiftedWindowAttention(shift=quarter / 4, block_size=16)
    out = method(q, k, v, make_ctx(TokenLayout(grid)))
    torch.testing.assert_close(out, authors_windowed_attention(q, k, v, h, w, quarter), rtol=0, atol=2e-6)
    old = ShiftedWindow.from_fraction(grid, quarter / 4, faithful=False).shift
    assert old == tuple(int(math.floor(quarter / 4 * n)) for n in window)
    if window == (10, 10) and quarter in (2, 3):
        assert old != expected_shift  # floor(k * 10 / 4) = 5, 7 against their 4, 6


def test_hidiffusion_faithful_rule_takes_quarters_only():
    with pytest.raises(ValueError, match="quarter of the window"):
        ShiftedWindowAttention(shift=0.3)
    with pytest.raises(ValueError, match="quarter of the window"):
        ShiftedWindow.from_fraction((20, 20), 0.3)
    assert ShiftedWindow.from_fraction((20, 20), 0.3, faithful=False).shift == (3, 3)
    assert ShiftedWindowAttention(shift=0.3, faithful=False).faithful is False
