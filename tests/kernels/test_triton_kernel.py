"""The Triton block-sparse kernel against the float64 reference, run on CPU under the Triton interpreter.

Every test here except the ``gpu``-marked ones sets ``TRITON_INTERPRET=1`` for its own duration (triton decides
at decoration time whether a kernel interprets; the kernel module builds its kernel lazily, once per mode), so
other test modules in the same process never see the variable. Shapes are tiny: the interpreter is ~1000x slower
than SDPA. The ``gpu`` tests run the same cases compiled on a CUDA device.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask

import diffattn
import diffattn_kernels as kernels
from diffattn import TokenLayout
from diffattn.patterns import Radial, ShiftedWindow, SlidingWindow
from diffattn.patterns.compile import compile_pattern
from diffattn.patterns.compose import PerHead
from diffattn.patterns.tile import SlidingTile

pytest.importorskip("triton", reason="triton is not installed (pip install triton; scripts/bootstrap.sh does)")


# Written tolerance per dtype: max abs error of the output against float64 attention of the same (rounded) inputs,
# unit-variance q, k, v. fp32 dots are exact-precision ("ieee"); fp16 / bf16 round the probabilities to the value
# dtype before P @ V, as flash attention does. The log-sum-exp gets 10x the output tolerance.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(
    not HAS_CUDA,
    reason="needs a CUDA GPU (the compiled kernel); the interpreter tests above cover the same cases on CPU",
)


@pytest.fixture(autouse=True)
def triton_interpreter(request, monkeypatch):
    """Interpreter for CPU tests, compiled kernels for ``gpu`` tests."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def random_qkv(batch, heads, n, dim, dtype, seed=0, kv_heads=None, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, dim, generator=g)
    k = torch.randn(batch, kv_heads or heads, n, dim, generator=g)
    v = torch.randn(batch, kv_heads or heads, n, dim, generator=g)
    return [x.to(dtype).to(device) for x in (q, k, v)]


def reference64(q, k, v, block_mask, scale=None):
    """Float64 attention of the given (already rounded) inputs under ``block_mask`` (batch dim 1)."""
    return kernels.attention(
        q.double().cpu(), k.double().cpu(), v.double().cpu(), block_mask.to("cpu"), backend="reference", scale=scale
    )


def assert_matches_reference(q, k, v, block_mask, *, scale=None, reference_masks=None, **kernel_kwargs):
    """Kernel vs float64 reference; ``reference_masks``: one batch-1 mask per batch entry for per-batch masks."""
    from diffattn_kernels.triton_block_sparse import triton_block_sparse_attention

    out, lse = triton_block_sparse_attention(q, k, v, block_mask, scale=scale, **kernel_kwargs)
    if reference_masks is None:
        ref, ref_lse = reference64(q, k, v, block_mask, scale=scale)
    else:
        parts = [reference64(q[b : b + 1], k[b : b + 1], v[b : b + 1], m, scale) for b, m in enumerate(reference_masks)]
        ref, ref_lse = torch.cat([o for o, _ in parts]), torch.cat([l for _, l in parts])
    tol = TOLERANCE[q.dtype]
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == q.shape[:-1]
    assert torch.isfinite(out).all(), "the kernel produced NaN or inf"
    err = (out.double().cpu() - ref).abs().max().item()
    assert err <= tol, f"{q.dtype}: max error {err} > {tol}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse.cpu())), "empty rows must give lse -inf, others finite"
    assert torch.isneginf(lse.cpu()[~finite]).all()
    assert (out.cpu()[~finite] == 0).all(), "empty rows must give output 0"
    if finite.any():
        lse_err = (lse.cpu()[finite].double() - ref_lse[finite]).abs().max().item()
        assert lse_err <= 10 * tol, f"{q.dtype}: lse error {lse_err}"
    return out, lse


def sliding_window_2d():
    # stride and dilation on a 10 x 12 grid (120 tokens) + 7 text tokens: 127, not a multiple of 16
    return SlidingWindow((5, 5), stride=(2, 1), dilation=(1, 2)), TokenLayout((10, 12), text_len=7), 16


# name: (pattern, layout, block size, heads); kernel lengths 127, 149, 149, 96, 54, 262, 196, 38
PATTERN_CASES = {
    "window_2d_stride_dilation": (*sliding_window_2d(), 1),
    "window_3d": (SlidingWindow((2, 3, 3)), TokenLayout((3, 6, 8), text_len=5), 32, 1),
    "tile_3d_text": (SlidingTile((2, 2, 4), (1, 3, 3)), TokenLayout((3, 5, 9), text_len=5, text_first=True), 16, 1),
    "tile_exact_multiple": (SlidingTile((4, 4), (1, 2)), TokenLayout((12, 8)), 16, 1),
    "tile_odd_block": (SlidingTile((3, 2), (2, 2)), TokenLayout((7, 6), text_len=0), 6, 1),
    "radial_text": (Radial(decay=0.5, block_size=64), TokenLayout((4, 8, 8), text_len=6), 64, 1),
    "shifted_window": (ShiftedWindow.from_fraction((16, 12), 0.25), TokenLayout((16, 12), text_len=4), 16, 1),
    "per_head": (PerHead((SlidingWindow((3, 3)), SlidingWindow((1, 7)))), TokenLayout((5, 7), text_len=3), 8, 2),
}


def compiled(case):
    pattern, layout, block, heads = PATTERN_CASES[case]
    if isinstance(pattern, SlidingTile):
        block = pattern.tile_volume(layout.grid)
    return compile_pattern(pattern, layout, block_size=block), heads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(PATTERN_CASES))
def test_patterns_match_float64_reference(case, dtype):
    plan, heads = compiled(case)
    bm = plan.block_mask
    assert int(bm.kv_num_blocks.sum()) + int(bm.full_kv_num_blocks.sum()) < bm.kv_num_blocks.shape[-1] ** 2 * heads, (
        "the case must be sparse to mean anything"
    )
    q, k, v = random_qkv(1, heads, plan.kernel_length, 64, dtype, seed=1)
    assert_matches_reference(q, k, v, bm)


def test_partial_and_full_blocks_both_present():
    """The cases include query blocks with full, partial and skipped key blocks: both kernel loops run."""
    bm = compiled("shifted_window")[0].block_mask
    assert int(bm.kv_num_blocks.sum()) > 0 and int(bm.full_kv_num_blocks.sum()) > 0
    assert int((bm.kv_num_blocks + bm.full_kv_num_blocks).min()) < bm.kv_num_blocks.shape[-1]


def empty_rows_mask(n, block, heads=None):
    """Band mask with row 7 seeing nothing, and the whole query block 2 seeing nothing (no listed blocks)."""

    def mod(b, h, q, kv):
        band = (q - kv).abs() <= 5 + (0 if h is None else h)
        return band & (q != 7) & (q // block != 2)

    return create_block_mask(mod, None, heads, n, n, device="cpu", BLOCK_SIZE=block)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_rows_give_zero_and_minus_inf(dtype):
    n, block = 75, 16
    bm = empty_rows_mask(n, block, heads=2)
    assert int(bm.kv_num_blocks[0, 0, 2]) == 0 and int(bm.full_kv_num_blocks[0, 0, 2]) == 0
    q, k, v = random_qkv(1, 2, n, 64, dtype, seed=2)
    out, lse = assert_matches_reference(q, k, v, bm)
    assert (out[:, :, 7] == 0).all() and torch.isneginf(lse[:, :, 7]).all()
    assert (out[:, :, 32:48] == 0).all() and torch.isneginf(lse[:, :, 32:48]).all()


def test_fully_empty_mask_and_empty_sequences():
    from diffattn_kernels.triton_block_sparse import triton_block_sparse_attention

    n = 40
    bm = create_block_mask(lambda b, h, q, kv: q < 0, None, None, n, n, device="cpu", BLOCK_SIZE=16)
    q, k, v = random_qkv(1, 1, n, 64, torch.float32)
    out, lse = triton_block_sparse_attention(q, k, v, bm)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_tile_splitting_and_padding_paths():
    """Mask blocks larger than the kernel tile (split into 16 x 16 tiles), and the default tiles."""
    n, block = 150, 64

    def mod(b, h, q, kv):
        return ((q // 7 - kv // 5).abs() <= 3) | (kv >= 140)

    bm = create_block_mask(mod, None, None, n, n, device="cpu", BLOCK_SIZE=block)
    q, k, v = random_qkv(1, 1, n, 64, torch.float32, seed=3)
    assert_matches_reference(q, k, v, bm, block_m=16, block_n=16)
    assert_matches_reference(q, k, v, bm, block_m=32, block_n=64)
    assert_matches_reference(q, k, v, bm)


@settings(max_examples=12, deadline=None)
@given(
    num_q=st.integers(1, 150),
    num_kv=st.integers(1, 150),
    bq=st.integers(3, 70),
    bkv=st.integers(3, 70),
    width=st.integers(0, 40),
    salt=st.integers(2, 7),
    heads=st.integers(1, 2),
)
def test_random_masks_block_shapes_and_lengths(num_q, num_kv, bq, bkv, width, salt, heads):
    """Any block shape (bq != bkv, not powers of two), any lengths (Sq != Skv), scattered element masks."""

    def mod(b, h, q, kv):
        return ((q - kv).abs() <= width + 5 * h) & ((q * 7 + kv * 13) % salt != 0)

    bm = create_block_mask(mod, None, heads, num_q, num_kv, device="cpu", BLOCK_SIZE=(bq, bkv))
    g = torch.Generator().manual_seed(num_q * 1000 + num_kv)
    q = torch.randn(1, heads, num_q, 64, generator=g)
    k, v = torch.randn(2, 1, heads, num_kv, 64, generator=g)
    assert_matches_reference(q, k, v, bm)


@pytest.mark.parametrize("dim", [80, 128])
def test_other_head_dims(dim):
    plan, _ = compiled("window_3d")
    q, k, v = random_qkv(1, 1, plan.kernel_length, dim, torch.float16, seed=4)
    assert_matches_reference(q, k, v, plan.block_mask)


def test_batch_gqa_scale_and_per_batch_masks():
    n, block = 70, 16

    def mod(b, h, q, kv):
        return (q - kv).abs() <= 4 + 9 * b + 3 * h

    bm = create_block_mask(mod, 2, 2, n, n, device="cpu", BLOCK_SIZE=block)
    per_entry = [
        create_block_mask(lambda _, h, q, kv, b=b: mod(b, h, q, kv), None, 2, n, n, device="cpu", BLOCK_SIZE=block)
        for b in range(2)
    ]
    q, k, v = random_qkv(2, 2, n, 64, torch.float32, seed=5)
    assert_matches_reference(q, k, v, bm, scale=0.3, reference_masks=per_entry)
    shared = create_block_mask(
        lambda b, h, q, kv: (q - kv).abs() <= 6, None, None, n, n, device="cpu", BLOCK_SIZE=block
    )
    q, k, v = random_qkv(2, 4, n, 64, torch.float32, seed=6, kv_heads=2)  # grouped-query: 2 query heads per kv head
    assert_matches_reference(q, k, v, shared)


def test_non_contiguous_inputs():
    plan, _ = compiled("shifted_window")
    q, k, v = random_qkv(1, 2, plan.kernel_length, 64, torch.float32, seed=7)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))  # (B, S, H, D) memory
    assert not q.is_contiguous()
    assert_matches_reference(q, k, v, plan.block_mask)


def test_dense_mode_matches_sdpa():
    from diffattn_kernels.triton_block_sparse import triton_block_sparse_attention

    q, k, v = random_qkv(1, 2, 100, 64, torch.float32, seed=8)
    out, lse = triton_block_sparse_attention(q, k, v, None, dense_block=32)
    ref, ref_lse = kernels.reference_attention(q, k, v)
    torch.testing.assert_close(out, ref, rtol=0, atol=TOLERANCE[torch.float32])
    torch.testing.assert_close(lse, ref_lse.float(), rtol=0, atol=1e-4)


def test_packed_bits_equal_the_element_mask():
    """The bit tiles of the partial blocks hold exactly ``mask_mod`` inside the block (0 past the sequence)."""
    from diffattn_kernels.triton_block_sparse import partial_block_bits

    plan, _ = compiled("per_head")
    bm, n = plan.block_mask, plan.kernel_length
    bq, bkv = bm.BLOCK_SIZE
    tile_index, bits = partial_block_bits(bm, n, n, "cpu")
    assert partial_block_bits(bm, n, n, "cpu")[1] is bits, "tiles are cached per block mask"
    assert bits.shape[0] < int(bm.kv_num_blocks.sum()), "identical tiles are stored once"
    shifts = torch.arange(32)
    for h in range(2):
        dense = kernels.block_mask_to_dense(bm, n, n, head=h)
        for qb in range(bm.kv_num_blocks.shape[-1]):
            for j in range(int(bm.kv_num_blocks[0, h, qb])):
                kb = int(bm.kv_indices[0, h, qb, j])
                tile = bits[int(tile_index[0, h, qb, j])]  # (bq, words)
                unpacked = ((tile.unsqueeze(-1) >> shifts) & 1).flatten(-2).bool()[:, :bkv]
                expected = torch.zeros(bq, bkv, dtype=torch.bool)
                block = dense[qb * bq : (qb + 1) * bq, kb * bkv : (kb + 1) * bkv]
                expected[: block.shape[0], : block.shape[1]] = block
                assert torch.equal(unpacked, expected)


def test_lse_merge_of_sparse_visual_and_dense_text_is_exact():
    """Sparse video part and dense text parts computed apart (Triton) and merged by lse == the joint mask."""
    pattern = SlidingTile((2, 2, 4), (1, 3, 3))
    grid, text = (3, 5, 9), 6
    block = pattern.tile_volume(grid)
    joint = compile_pattern(pattern, TokenLayout(grid, text_len=text), block_size=block, text_padding=2)
    visual = compile_pattern(pattern, TokenLayout(grid), block_size=block)
    nv = visual.kernel_length
    order_valid = pattern.token_order(grid) >= 0
    key_valid = torch.cat([order_valid, torch.arange(text) < text - 2])
    q, k, v = random_qkv(1, 2, joint.kernel_length, 64, torch.float32, seed=9)
    out, lse = kernels.split_text_attention(
        q, k, v, visual.block_mask, nv, key_valid=key_valid, backend="triton", block_size=16
    )
    ref, ref_lse = reference64(q, k, v, joint.block_mask)
    assert (out.double() - ref).abs().max().item() <= TOLERANCE[torch.float32]
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (lse[finite].double() - ref_lse[finite]).abs().max().item() <= 1e-4


def test_registry_selects_triton_only_where_it_runs(monkeypatch):
    plan, _ = compiled("window_3d")
    q, k, v = random_qkv(1, 1, plan.kernel_length, 64, torch.float32)
    name, _ = kernels.select_backend("auto", q, q.shape[-2], block_mask=plan.block_mask)
    assert name == "torch", "the interpreter is never picked automatically on CPU"
    out, lse = kernels.attention(q, k, v, plan.block_mask, backend="triton")
    ref, _ = kernels.attention(q, k, v, plan.block_mask, backend="torch")
    torch.testing.assert_close(out, ref, rtol=0, atol=TOLERANCE[torch.float32])
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.attention(q, k, v, plan.block_mask, backend="triton")
    with pytest.raises(ValueError, match="triton: no torch.float64"):
        kernels.select_backend("triton", q.double(), q.shape[-2])


def test_auto_on_cuda_explains_rejections(monkeypatch):
    """Selection logic for CUDA tensors, checked on CPU with a stand-in device type (no kernel runs)."""
    plan, _ = compiled("window_2d_stride_dilation")
    q = torch.zeros(1, 1, plan.kernel_length, 64, dtype=torch.float16)

    class FakeCuda:
        type = "cuda"

    class Q:
        device, dtype, shape = FakeCuda(), q.dtype, q.shape

    name, reasons = kernels.select_backend("auto", Q(), q.shape[-2], block_mask=plan.block_mask)
    assert name == "triton"
    assert len(reasons) == 1 and reasons[0].startswith("xformers:")
    tile = compile_pattern(SlidingTile((4, 4), (1, 4)), TokenLayout((8, 16)), block_size=16)  # one key run
    reason = kernels.BACKENDS["xformers"].rejects(Q(), q.shape[-2], block_mask=tile.block_mask)
    assert reason is None or "not installed" in reason


def band_block_mask(n, block, gap=False):
    """Full blocks only: query block i sees key blocks i-1..i+1 (without i when ``gap``); last block ragged."""
    from torch.nn.attention.flex_attention import BlockMask

    nb = math.ceil(n / block)
    kept = (torch.arange(nb).view(-1, 1) - torch.arange(nb).view(1, -1)).abs() <= 1
    if gap:
        kept &= ~torch.eye(nb, dtype=torch.bool)
    num = kept.sum(-1, dtype=torch.int32).view(1, 1, nb)
    idx = torch.argsort((~kept).to(torch.int8), dim=-1, stable=True).to(torch.int32).view(1, 1, nb, nb)
    zero = torch.zeros_like(num)
    return BlockMask.from_kv_blocks(
        zero,
        idx.clone(),
        num,
        idx,
        BLOCK_SIZE=block,
        mask_mod=lambda b, h, q, kv: torch.ones_like(q - kv, dtype=torch.bool),
        seq_lengths=(n, n),
    )


def test_mask_structure_for_xformers():
    from diffattn_kernels.xformers_attention import local_runs

    dense = kernels.dense_block_mask(100, 100, 32)
    assert local_runs(dense, 100, 100)[0] == "dense"
    rows = compile_pattern(SlidingTile((4, 4), (1, 4)), TokenLayout((8, 16)), block_size=16)  # row tiles: one run
    kind, _, runs = local_runs(rows.block_mask, 128, 128)
    assert kind == "local" and runs[0] == (0, 4) and runs[-1] == (4, 8)
    kind, reason, _ = local_runs(compiled("window_3d")[0].block_mask, 149, 149)
    assert kind is None and "partial" in reason
    kind, reason, _ = local_runs(band_block_mask(100, 16, gap=True), 100, 100)
    assert kind is None and "contiguous" in reason
    kind, _, runs = local_runs(band_block_mask(100, 16), 100, 100)
    assert kind == "local" and runs[0] == (0, 2) and runs[-1] == (5, 7)


def test_xformers_gappy_bias_equals_the_block_mask():
    """The xformers bias of a local mask (built and materialised on CPU; the attention itself needs CUDA)."""
    pytest.importorskip("xformers.ops.fmha.attn_bias", reason="xformers is not installed (GPU extra)")
    from diffattn_kernels.xformers_attention import gappy_bias, local_runs

    n = 100  # ragged last block
    bm = band_block_mask(n, 16)
    kind, _, runs = local_runs(bm, n, n)
    assert kind == "local"
    bias = gappy_bias(runs, bm.BLOCK_SIZE, 2, n, n, device="cpu")
    allowed = bias.materialize((2 * n, 2 * n)) == 0
    expected = torch.block_diag(*[kernels.block_mask_to_dense(bm, n, n)] * 2)
    assert torch.equal(allowed, expected)


def test_sparse_method_on_model_with_triton_backend(tiny_model):
    """diffattn.apply with a SparseAttention method on backend='triton' == backend='torch'."""
    from diffattn.testing import tiny_inputs

    model = tiny_model("flux")
    inputs = tiny_inputs("flux", (6, 5), batch=1, text_len=7)
    method = dict(window=3, stride=2, block_size=8)
    with torch.no_grad():
        with diffattn.apply(model, diffattn.SlidingWindowAttention(**method, backend="torch")):
            expected = model(**inputs)[0]
        with diffattn.apply(model, diffattn.SlidingWindowAttention(**method, backend="triton")):
            got = model(**inputs)[0]
        dense = model(**inputs)[0]
    assert not torch.allclose(expected, dense, atol=1e-4), "the pattern must be sparse for the test to mean anything"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------- GPU


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", list(PATTERN_CASES))
def test_gpu_patterns_match_float64_reference(case, dtype):
    pattern, layout, block, heads = PATTERN_CASES[case]
    if isinstance(pattern, SlidingTile):
        block = pattern.tile_volume(layout.grid)
    plan = compile_pattern(pattern, layout, block_size=block, device="cuda")
    for dim in (64, 128, 96):
        q, k, v = random_qkv(2, heads, plan.kernel_length, dim, dtype, seed=1, device="cuda")
        assert_matches_reference(q, k, v, plan.block_mask)


@gpu
@needs_cuda
def test_gpu_empty_rows_and_auto_selection():
    n, block = 75, 16
    bm = empty_rows_mask(n, block, heads=2).to("cuda")
    q, k, v = random_qkv(1, 2, n, 64, torch.float16, seed=2, device="cuda")
    assert_matches_reference(q, k, v, bm)
    name, reasons = kernels.select_backend("auto", q, n, block_mask=bm)
    assert name == "triton", reasons


@gpu
@needs_cuda
def test_gpu_xformers_dense_and_local_match_reference():
    pytest.importorskip("xformers.ops", reason="xformers is not installed")
    n = 100
    for bm in (band_block_mask(n, 16).to("cuda"), kernels.dense_block_mask(n, n, 16, "cuda")):
        q, k, v = random_qkv(2, 2, n, 64, torch.float16, device="cuda")
        out, lse = kernels.attention(q, k, v, bm, backend="xformers")
        ref, ref_lse = reference64(q, k, v, bm)
        assert (out.double().cpu() - ref).abs().max().item() <= TOLERANCE[torch.float16]
        assert (lse.cpu().double() - ref_lse).abs().max().item() <= 10 * TOLERANCE[torch.float16]
