"""Bad method parameters fail before any attention with a MethodConfigError that names the layer, its grid and the
fix; NaN / Inf in q, k, v propagate as dense attention with the same mask would (issue #14, item 11)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import diffattn
import diffattn_kernels as kernels
from diffattn.context import AttentionContext
from diffattn.errors import MethodConfigError
from diffattn.layout import TokenLayout
from diffattn.methods import dynamic_common, masked, sparse
from diffattn.methods.downsampling import TokenDownsampling
from diffattn.methods.dynamic_sparse import DynamicSparseAttention
from diffattn.methods.pyramid import PyramidSparseAttention
from diffattn.methods.rettention import Rettention
from diffattn.patterns import SlidingWindow
from diffattn.testing import standalone_context, tiny_inputs


def forward(model, family, grid):
    with torch.no_grad():
        out = model(**tiny_inputs(family, grid, batch=1, text_len=7))
    return out[0] if isinstance(out, tuple) else out.sample


@pytest.fixture
def no_attention(monkeypatch):
    """Any attention math by a method fails the test: validation must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("attention ran before the parameters were checked")

    for module in (sparse, dynamic_common):
        monkeypatch.setattr(module.kernels, "attention", refuse)
    monkeypatch.setattr(masked, "reference_attention", refuse)


def wrong_shape(q_idx, kv_idx, ctx):
    return torch.ones(3, 3, dtype=torch.bool)


# method, family, grid, what the message must say (besides the method name and the layer)
BAD = {
    "2-D window on video": (
        lambda: diffattn.SlidingWindowAttention(window=(3, 3)),
        "wan",
        (2, 4, 4),
        ["2x4x4", "3-value window (frames, height, width)", "window=(2, 4, 4)"],
    ),
    "video tile on image": (
        lambda: diffattn.SlidingTileAttention(),
        "flux",
        (4, 4),
        ["4x4", "2-value tile (height, width)", "tile=(4, 4)"],
    ),
    "video tile on unet": (
        lambda: diffattn.SlidingTileAttention(),
        "unet_sd15",
        (8, 8),
        ["8x8", "2-value tile", "tile=(8, 8)"],
    ),
    "window too large": (
        lambda: diffattn.SlidingWindowAttention(window=7),
        "sd3",
        (4, 6),
        ["4x6", "larger than", "clip_to_grid=True"],
    ),
    "too many shifted windows": (
        lambda: diffattn.ShiftedWindowAttention(windows=(2, 2, 2)),
        "unet_sd15",
        (8, 8),
        ["8x8", "describe 3 axes", "windows=(2, 2)"],
    ),
    "mask of fixed shape": (lambda: diffattn.Masked(wrong_shape), "flux", (4, 4), ["4x4", "(3, 3)", "q_idx"]),
    "dynamic video tile on image": (
        lambda: DynamicSparseAttention(topk=0.5, tile=(4, 4, 8)),
        "flux",
        (4, 4),
        ["4x4", "2-value tile", "tile=(4, 4)", "tile='auto'"],
    ),
    "pyramid 2-D tile on video": (
        lambda: PyramidSparseAttention(tile=(2, 4)),
        "wan",
        (2, 4, 4),
        ["2x4x4", "3-value tile", "tile=(2, 4, 4)"],
    ),
    "rettention base": (
        lambda: Rettention(base=diffattn.SlidingWindowAttention(window=(3, 3))),
        "wan",
        (2, 4, 4),
        ["2x4x4", "3-value window"],
    ),
    "todo factor covers the frame": (
        lambda: TokenDownsampling(factor=8),
        "unet_sd15",
        (8, 8),
        ["8x8", "factor=8", "factor < 8"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_parameters_name_the_layer_grid_and_fix_before_any_attention(case, tiny_model, no_attention):
    make, family, grid, says = BAD[case]
    method = make()
    model = tiny_model(family)
    with diffattn.apply(model, method) as handle:
        with pytest.raises(MethodConfigError) as info:
            forward(model, family, grid)
    message = str(info.value)
    layer = re.search(r" on layer (\S+) \(", message)
    assert layer and layer.group(1) in handle.layers, message
    assert "Fix: " in message, message
    for part in says:
        assert part in message, f"{part!r} missing from: {message}"


@pytest.mark.parametrize(
    "family,grid,method",
    [
        ("wan", (2, 4, 4), diffattn.SlidingWindowAttention(window=(1, 3, 3), block_size=8)),
        ("flux", (4, 4), diffattn.SlidingTileAttention(tile=(2, 2), window=3)),
        ("unet_sd15", (8, 8), diffattn.ShiftedWindowAttention(shift=0.25)),
        ("wan", (3, 4, 4), diffattn.RadialAttention(block_size=16)),
        ("flux", (4, 4), DynamicSparseAttention(topk=0.5)),
        ("unet_sd15", (8, 8), TokenDownsampling(factor=2)),
    ],
)
def test_valid_parameters_still_run(family, grid, method, tiny_model):
    model = tiny_model(family)
    with diffattn.apply(model, method) as handle:
        out = forward(model, family, grid)
        assert handle.acted() and torch.isfinite(out).all()


def test_random_window_shift_outside_a_denoising_loop_says_how_to_fix(tiny_model):
    model = tiny_model("unet_sd15")
    with diffattn.apply(model, diffattn.ShiftedWindowAttention()):
        with pytest.raises(MethodConfigError, match=r"on layer \S+attn1 \(visual grid 8x8.*no step.*shift=0.25"):
            forward(model, "unet_sd15", (8, 8))
        with diffattn.denoising_step(0, 10):
            assert torch.isfinite(forward(model, "unet_sd15", (8, 8))).all()


def test_clip_to_grid_is_what_the_window_error_suggests(tiny_model):
    """The window-too-large message suggests clip_to_grid=True: SlidingWindowAttention accepts it and clips the
    window to the axis, as a window of the axis length does."""
    model = tiny_model("sd3")
    with diffattn.apply(model, diffattn.SlidingWindowAttention(window=7, clip_to_grid=True, block_size=8)):
        clipped = forward(model, "sd3", (4, 6))
    with diffattn.apply(model, diffattn.SlidingWindowAttention(window=(4, 6), block_size=8)):
        whole = forward(model, "sd3", (4, 6))
    assert torch.equal(clipped, whole)


def test_sparse_attention_without_a_pattern_fails_at_construction():
    with pytest.raises(ValueError, match="needs a pattern.*SlidingWindow.*SlidingTile.*SlidingWindowAttention"):
        diffattn.SparseAttention()
    with pytest.raises(TypeError, match="needs a pattern"):
        diffattn.SparseAttention(pattern=(3, 3))
    with pytest.raises(ValueError, match="pass pattern= to SparseAttention"):
        diffattn.SlidingTileAttention(pattern=SlidingWindow(3))
    diffattn.SparseAttention(pattern=SlidingWindow(3))  # fine


def make_ctx(layout: TokenLayout, layer: str = "blocks.3.attn") -> AttentionContext:
    return standalone_context(layout, layer=layer)[0]


def test_radial_on_a_one_axis_grid_and_validate_called_directly():
    ctx = make_ctx(TokenLayout((16,)), layer="blocks.0.attn1")
    with pytest.raises(
        MethodConfigError,
        match=r"RadialAttention on layer blocks\.0\.attn1 \(visual grid 16 .*"
        r"Fix: apply RadialAttention to video models",
    ):
        diffattn.RadialAttention(block_size=8).validate(ctx)
    diffattn.RadialAttention(block_size=8).validate(make_ctx(TokenLayout((2, 4, 4))))


@pytest.mark.parametrize(
    "family,grid,tile,fits",
    [("flux", (4, 4), (8, 8), "tile=(2, 2), window=1"), ("wan", (2, 4, 4), (4, 4, 8), "tile=(1, 2, 2), window=1")],
)
def test_sliding_tile_larger_than_the_grid_is_refused_not_silently_dense(family, grid, tile, fits, tiny_model):
    """A tile wider than every axis is one padded tile: the layer would get dense attention (and compute the
    padding). The first call says so, naming the layer, the grid, the axes and parameters that are sparse there."""
    model = tiny_model(family)
    with diffattn.apply(model, diffattn.SlidingTileAttention(tile=tile, window=1)) as handle:
        with pytest.raises(MethodConfigError) as info:
            forward(model, family, grid)
    message = str(info.value)
    layer = re.search(r" on layer (\S+) \(", message)
    assert layer and layer.group(1) in handle.layers, message
    for part in ("x".join(map(str, grid)), f"tile {tile}", "larger than", "dense", "Fix: ", fits, "layers="):
        assert part in message, f"{part!r} missing from: {message}"
    fixed = diffattn.SlidingTileAttention(tile=tuple(max(1, n // 2) for n in grid), window=1)
    fixed.validate(make_ctx(TokenLayout(grid)))
    assert fixed.compiled(make_ctx(TokenLayout(grid)), 0, "cpu").density < 1


def test_sliding_tile_wider_than_one_axis_but_sparse_on_another_is_taken():
    """Tile (1, 2, 2) on a 2x1x1 video: the frames axis still has two tiles and window 1 keeps them apart, so the
    pattern is sparse and says what it does (the tiny Wan pipeline's grid)."""
    ctx = make_ctx(TokenLayout((2, 1, 1)))
    method = diffattn.SlidingTileAttention(tile=(1, 2, 2), window=(1, 1, 1))
    method.validate(ctx)
    assert method.compiled(ctx, 0, "cpu").density == 0.5
    with pytest.raises(MethodConfigError, match="dense"):
        diffattn.SlidingTileAttention(tile=(1, 2, 2), window=(2, 1, 1)).validate(ctx)


@pytest.mark.parametrize("grid", [(4, 8), (16,)])
def test_radial_attention_refuses_image_grids(grid):
    """Radial Attention is a video method (METHODS.md: frames x height x width); on an image grid it would take rows
    for frames. validate refuses it, naming the layer and grid and pointing to the image methods."""
    ctx = make_ctx(TokenLayout(grid, text_len=3), layer="blocks.0.attn")
    with pytest.raises(MethodConfigError) as info:
        diffattn.RadialAttention(block_size=8).validate(ctx)
    message = str(info.value)
    for part in ("blocks.0.attn", "x".join(map(str, grid)), "video", "Fix: ", "SlidingWindowAttention"):
        assert part in message, f"{part!r} missing from: {message}"


def test_radial_attention_on_an_image_model_fails_at_the_first_call(tiny_model, no_attention):
    model = tiny_model("flux")
    with diffattn.apply(model, diffattn.RadialAttention(block_size=8)):
        with pytest.raises(MethodConfigError, match=r"visual grid 4x4.*video.*Fix: apply RadialAttention to video"):
            forward(model, "flux", (4, 4))


# --------------------------------------------------------------------------------------------------------------------
# NaN / Inf: as dense attention over the keys each query may see


LAYOUT = TokenLayout((5, 6), text_len=3)  # visual tokens 0..29 (tiles of 2x4 pad the grid), text 30..32
STATIC = {
    "sliding window": diffattn.SlidingWindowAttention(window=3, block_size=8, backend="torch"),  # partial blocks
    "sliding tile": diffattn.SlidingTileAttention(tile=(2, 4), window=1, backend="torch"),  # padded tiles
}


def visible_attention(q, k, v, mask):
    """Dense SDPA of each query over the keys ``mask`` lets it see (a masked SDPA lets a hidden NaN through)."""
    out = torch.empty_like(q)
    with sdpa_kernel(SDPBackend.MATH):
        for i in range(q.shape[-2]):
            seen = mask[..., i, :]
            for h in range(q.shape[1]):
                row = seen[h] if seen.ndim == 2 else seen
                out[:, h, i : i + 1] = F.scaled_dot_product_attention(q[:, h, i : i + 1], k[:, h, row], v[:, h, row])
    return out


def token_mask(plan, heads: int) -> torch.Tensor:
    n = plan.gather.numel()
    masks = [kernels.block_mask_to_dense(plan.block_mask, n, n, head=h) for h in range(heads)]
    return torch.stack([m[plan.scatter][:, plan.scatter] for m in masks])


def poisoned(where: str, value: float, token: int):
    g = torch.Generator().manual_seed(token)
    q, k, v = (torch.randn(1, 2, LAYOUT.num_tokens, 8, generator=g) for _ in range(3))
    {"q": q, "k": k, "v": v}[where][:, :, token, 1] = value
    return q, k, v


NAN_CASES = [(w, x, t) for w in ("q", "k", "v") for x in (float("nan"), float("inf")) for t in (0, 13, 31)]


@pytest.mark.parametrize("name", list(STATIC))
@pytest.mark.parametrize("where,value,token", NAN_CASES)
def test_static_sparse_nan_inf_match_dense_attention_with_the_same_mask(name, where, value, token):
    method = STATIC[name]
    ctx = make_ctx(LAYOUT)
    q, k, v = poisoned(where, value, token)
    out = method(q, k, v, ctx)
    mask = token_mask(method.compiled(ctx, 0, "cpu"), 1)[0]
    expected = visible_attention(q, k, v, mask)
    torch.testing.assert_close(out, expected, equal_nan=True)
    bad_rows = ~torch.isfinite(out).all(-1)[0, 0]
    if where == "q":
        assert bad_rows.tolist() == [i == token for i in range(LAYOUT.num_tokens)]
    elif where == "v" or value != value:  # exactly the queries that see it (an Inf key may score -inf: weight 0)
        assert torch.equal(bad_rows, mask[:, token])
    if token < LAYOUT.num_visual:  # a visual token is hidden from some queries (text sees and is seen by all)
        assert not bad_rows.all()


@pytest.mark.parametrize(
    "where,value,token",
    [
        ("k", float("nan"), 13),
        ("v", float("nan"), 0),
        ("v", float("inf"), 0),
        ("v", float("-inf"), 31),
        ("q", float("nan"), 7),
    ],
)
def test_dynamic_sparse_nan_inf_match_dense_attention_with_its_selection(where, value, token):
    """Token 0 also fills the padding of the kernel order (tiles of 2x4 on 5x6): it must not reach those rows."""
    method = DynamicSparseAttention(topk=0.3, tile=(2, 4), backend="torch")
    ctx = make_ctx(LAYOUT)
    q, k, v = poisoned(where, value, token)
    out = method(q, k, v, ctx)
    mask = token_mask(method.plans(q, k, ctx)[0], q.shape[1])
    torch.testing.assert_close(out, visible_attention(q, k, v, mask), equal_nan=True)
    if where != "q":
        assert torch.equal(~torch.isfinite(out).all(-1)[0], mask[..., token])


def test_finite_inputs_take_the_one_kernel_call(monkeypatch):
    calls = []
    attention = kernels.attention

    def counting(*args, **kwargs):
        calls.append(1)
        return attention(*args, **kwargs)

    monkeypatch.setattr(sparse.kernels, "attention", counting)
    q, k, v = poisoned("q", 0.5, 3)
    STATIC["sliding window"](q, k, v, make_ctx(LAYOUT))
    assert len(calls) == 1
