"""Kernel autograd: the torch backend's backward against finite differences (float64 gradcheck) and against the
float64 reference's autograd (float32); backends without a backward refuse with a message naming one that has it;
auto selection on devices no backend lists; the torch backend as a custom op under opcheck and torch.compile; no
process-wide setting changed by importing or first use."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

import diffattn_kernels as kernels
from diffattn import TokenLayout
from diffattn.patterns import SlidingWindow
from diffattn.patterns.compile import compile_pattern
from diffattn.patterns.tile import SlidingTile
from diffattn_kernels import KernelUnsupportedError, block_sparse

# gradcheck (float64, finite differences with eps 1e-6): the backward recomputes probabilities from the float32
# log-sum-exp the op returns, so analytic gradients carry ~1e-7 relative error.
GRADCHECK = {"eps": 1e-6, "atol": 1e-6, "rtol": 1e-5}
# float32 torch backend vs the float64 reference's autograd (unit-variance inputs, max abs error per gradient).
GRAD_TOL_F32 = 5e-6


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes: a second thread only adds barrier waits (milliseconds per call on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def qkv(heads: int, kv_heads: int, n: int, dim: int = 8, dtype=torch.float64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(1, h, n, dim, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
        for h in (heads, kv_heads, kv_heads)
    ]


def mask_from(mod, n: int, heads: int | None = None, block: int = 16) -> BlockMask:
    return create_block_mask(mod, None, heads, n, n, device="cpu", BLOCK_SIZE=block)


def window_with_empty_row(b, h, q, kv):
    return ((q - kv).abs() <= 20) & (q != 7)  # full and partial blocks; row 7 sees nothing


def second_block_blind(b, h, q, kv):
    return (q // 16 != 1) & ((q - kv).abs() <= 20)  # query block 1 lists no key block at all


def widening_per_head(b, h, q, kv):
    return (q - kv).abs() <= 6 + 10 * h


def scattered(b, h, q, kv):
    return ((q // 16 - kv // 16) % 3 == 0) & ((q - kv) % 3 != 1)


def case(name: str) -> tuple[BlockMask, int, int, int]:
    """(block mask, query heads, key/value heads, sequence length) of a named test case."""
    if name == "partial_full_empty_row_ragged":
        return mask_from(window_with_empty_row, 56), 2, 2, 56
    if name == "empty_query_block":
        return mask_from(second_block_blind, 64), 2, 2, 64
    if name == "gqa_per_head_mask":
        return mask_from(widening_per_head, 48, heads=4), 4, 2, 48
    if name == "scattered_gqa":
        return mask_from(scattered, 96), 2, 1, 96
    if name == "tile_full_blocks_only":
        plan = compile_pattern(SlidingTile((16,), (3,)), TokenLayout((96,)), block_size=16)
        return plan.block_mask, 2, 2, plan.kernel_length
    if name == "window_with_text":
        plan = compile_pattern(SlidingWindow((3, 5)), TokenLayout((4, 8), text_len=5), block_size=16)
        return plan.block_mask, 2, 2, plan.kernel_length
    raise KeyError(name)


CASES = [
    "partial_full_empty_row_ragged",
    "empty_query_block",
    "gqa_per_head_mask",
    "scattered_gqa",
    "tile_full_blocks_only",
    "window_with_text",
]


def blocks_of_case(bm: BlockMask) -> tuple[int, int]:
    """(listed partial blocks, listed full blocks) over the mask."""
    full = 0 if bm.full_kv_num_blocks is None else int(bm.full_kv_num_blocks.sum())
    return int(bm.kv_num_blocks.sum()), full


@pytest.mark.parametrize("name", CASES)
def test_torch_backend_gradcheck_float64(name):
    bm, heads, kv_heads, n = case(name)
    q, k, v = qkv(heads, kv_heads, n)
    fast = name != CASES[0]  # the full Jacobian costs 2 forward calls per input element: random projections else
    assert torch.autograd.gradcheck(
        lambda a, b, c: kernels.attention(a, b, c, bm, backend="torch")[0], (q, k, v), fast_mode=fast, **GRADCHECK
    )


def test_cases_cover_the_block_kinds():
    """The gradcheck cases hold what they claim: partial and full blocks, empty rows and query blocks, GQA."""
    partial, full = blocks_of_case(case("partial_full_empty_row_ragged")[0])
    assert partial and full
    assert blocks_of_case(case("tile_full_blocks_only")[0])[0] == 0
    assert int(case("empty_query_block")[0].kv_num_blocks[0, 0, 1]) == 0
    assert int(case("empty_query_block")[0].full_kv_num_blocks[0, 0, 1]) == 0
    bm, heads, kv_heads, _ = case("gqa_per_head_mask")
    assert bm.kv_num_blocks.shape[1] == heads > kv_heads
    assert blocks_of_case(case("window_with_text")[0])[0] > 0


@pytest.mark.parametrize("name", CASES)
def test_torch_gradients_equal_reference_float32(name, monkeypatch):
    """Gradients through out and lse (as a log-sum-exp merge uses them) against the float64 reference's autograd."""
    bm, heads, kv_heads, n = case(name)
    if name == "scattered_gqa":  # its query blocks' keys go through the gathered-copy forward path
        monkeypatch.setattr(block_sparse, "MAX_VIEW_RUNS", 0)
        monkeypatch.setattr(block_sparse, "MIN_VIEW_RUN", 1000.0)
    g = torch.Generator().manual_seed(1)
    w_out = torch.randn(1, heads, n, 8, generator=g)
    w_lse = torch.randn(1, heads, n, generator=g)
    grads = {}
    for backend, dtype in (("torch", torch.float32), ("reference", torch.float64)):
        q, k, v = qkv(heads, kv_heads, n, dtype=dtype, seed=2)
        out, lse = kernels.attention(q, k, v, bm, backend=backend)
        loss = (out * w_out.to(dtype)).sum() + (lse.masked_fill(torch.isneginf(lse), 0.0) * w_lse).sum()
        grads[backend] = torch.autograd.grad(loss, (q, k, v))
    for name_, got, ref in zip("qkv", grads["torch"], grads["reference"]):
        assert got.dtype == torch.float32 and torch.isfinite(got).all(), name_
        err = (got.double() - ref).abs().max().item()
        assert err <= GRAD_TOL_F32, f"d{name_}: {err}"


def test_empty_rows_get_zero_gradients_and_no_nan():
    bm, heads, kv_heads, n = case("empty_query_block")
    q, k, v = qkv(heads, kv_heads, n, dtype=torch.float32)
    out, lse = kernels.attention(q, k, v, bm, backend="torch")
    assert (out[:, :, 16:32] == 0).all() and torch.isneginf(lse[:, :, 16:32]).all()
    (out.sum() + lse.masked_fill(torch.isneginf(lse), 0.0).sum()).backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    assert (q.grad[:, :, 16:32] == 0).all()


def test_compiled_cpu_loop_forward_with_backward():
    """float32 full-block query blocks run the compiled CPU loop (where it builds); gradients still match."""
    plan = compile_pattern(SlidingTile((2, 2, 4), (1, 3, 3)), TokenLayout((4, 6, 12)), block_size=16)
    q, k, v = qkv(2, 2, plan.kernel_length, dim=16, dtype=torch.float32, seed=3)
    out, _ = kernels.attention(q, k, v, plan.block_mask, backend="torch")
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, _ = kernels.attention(q64, k64, v64, plan.block_mask, backend="reference")
    for got, expected in zip(grads, torch.autograd.grad(ref.square().sum(), (q64, k64, v64))):
        assert (got.double() - expected).abs().max().item() <= GRAD_TOL_F32


def test_reference_backend_is_differentiable():
    bm, heads, kv_heads, n = case("partial_full_empty_row_ragged")
    q, k, v = (x.detach()[:, :, :24].requires_grad_() for x in qkv(heads, kv_heads, n))
    small = mask_from(window_with_empty_row, 24, block=8)
    assert torch.autograd.gradcheck(
        lambda a, b, c: kernels.attention(a, b, c, small, backend="reference")[0], (q, k, v), **GRADCHECK
    )


def test_backends_without_backward_refuse_with_the_alternative():
    bm, heads, kv_heads, n = case("partial_full_empty_row_ragged")
    q, k, v = qkv(heads, kv_heads, n, dtype=torch.float32)
    for backend in ("flex", "triton"):
        with pytest.raises(KernelUnsupportedError, match=r"no backward.*backend='torch'"):
            kernels.attention(q, k, v, bm, backend=backend)
    with pytest.raises(KernelUnsupportedError, match=r"no backward.*backend='torch'"):
        kernels.flex_block_attention(q, k, v, bm)
    with torch.no_grad():  # inference with parameters that require grad still runs
        out, _ = kernels.attention(q, k, v, bm, backend="flex")
    torch.testing.assert_close(out, kernels.attention(q, k, v, bm, backend="torch")[0].detach(), rtol=0, atol=2e-6)
    name, reasons = kernels.select_backend("auto", q, n, need_grad=True)
    assert name == "torch" and reasons == []

    class FakeCuda:
        type = "cuda"

    class Q:
        device, dtype, shape = FakeCuda(), torch.float16, q.shape

    for backend in ("xformers", "triton"):
        reason = kernels.BACKENDS[backend].rejects(Q(), n, need_grad=True)
        assert reason and "no backward" in reason and "backend='torch'" in reason, reason
    assert kernels.BACKENDS["flex"].rejects(Q(), n, need_grad=True) is None, "FlexAttention has a CUDA backward"
    name, reasons = kernels.select_backend("auto", Q(), n, need_grad=True)
    assert name == "flex-compiled" and [r.split(":")[0] for r in reasons] == ["xformers", "triton"]


def test_triton_kernel_refuses_grad_when_called_directly():
    pytest.importorskip("triton")
    from diffattn_kernels.triton_block_sparse import triton_block_sparse_attention

    bm, heads, kv_heads, n = case("partial_full_empty_row_ragged")
    q, k, v = qkv(heads, kv_heads, n, dtype=torch.float32)
    with pytest.raises(KernelUnsupportedError, match="backend='torch'"):
        triton_block_sparse_attention(q, k, v, bm)


@pytest.mark.parametrize("device", ["mps", "xpu", "privateuseone"])
def test_auto_on_devices_no_backend_lists_picks_torch(device):
    class Device:
        type = device

    class Q:
        device, dtype, shape = Device(), torch.float16, (1, 2, 4096, 64)

    for need_lse in (False, True):
        for need_grad in (False, True):
            assert kernels.select_backend("auto", Q(), 4096, need_lse=need_lse, need_grad=need_grad) == ("torch", [])
    with pytest.raises(KernelUnsupportedError, match=f"not {device}.*backend='auto'"):
        kernels.select_backend("flex", Q(), 4096)


def test_auto_on_meta_tensors_picks_torch():
    q = torch.empty(1, 2, 64, 8, device="meta")
    assert kernels.select_backend("auto", q, 64) == ("torch", [])


def op_args(dtype=torch.float32, requires_grad=False):
    bm, heads, kv_heads, n = case("partial_full_empty_row_ragged")
    q, k, v = (x.detach().requires_grad_(requires_grad) for x in qkv(heads, kv_heads, n, dtype=dtype))
    tiles, tile_index = block_sparse.partial_tiles(bm, n, n, q.device)
    return (
        q,
        k,
        v,
        bm.kv_num_blocks,
        bm.kv_indices,
        bm.full_kv_num_blocks,
        bm.full_kv_indices,
        tiles,
        tile_index,
        16,
        16,
        1 / math.sqrt(8),
    )


@pytest.mark.parametrize("requires_grad", [False, True])
def test_custom_op_passes_opcheck(requires_grad):
    op = torch.ops.diffattn.block_sparse_attention.default
    torch.library.opcheck(op, op_args(requires_grad=requires_grad))


def test_torch_backend_compiles_fullgraph_and_matches_eager():
    """One graph for attention(..., backend='torch') (masks enter as data: a second mask of the same kind gives its
    own result, not the first one's), forward and backward equal to eager within 1e-5."""
    bm, heads, kv_heads, n = case("partial_full_empty_row_ragged")

    def fn(q, k, v, block_mask):
        out, lse = kernels.attention(q, k, v, block_mask, backend="torch")
        return out, lse

    compiled = torch.compile(fn, fullgraph=True)
    q, k, v = qkv(heads, kv_heads, n, dtype=torch.float32)
    results = []
    for run in (compiled, fn):
        out, lse = run(q, k, v, bm)
        finite = torch.isfinite(lse)
        (out.square().sum() + lse[finite].sum()).backward()
        results.append((out.detach(), lse.detach(), *(x.grad.clone() for x in (q, k, v))))
        for x in (q, k, v):
            x.grad = None
    for got, expected in zip(*results):
        assert torch.equal(torch.isfinite(got), torch.isfinite(expected))
        finite = torch.isfinite(expected)
        torch.testing.assert_close(got[finite], expected[finite], rtol=0, atol=1e-5)

    def radius(r):
        return lambda b, h, q, kv: (q - kv).abs() <= r

    with torch.no_grad():
        for r in (3, 11):
            other = mask_from(radius(r), n)
            torch.testing.assert_close(compiled(q, k, v, other)[0], fn(q, k, v, other)[0], rtol=0, atol=1e-5)


def test_split_text_attention_is_differentiable():
    """Sparse visual and dense text parts merged by their log-sum-exp: gradients flow through both."""
    visual = mask_from(window_with_empty_row, 48)
    q, k, v = qkv(2, 2, 53, dtype=torch.float32)
    out, _ = kernels.split_text_attention(q, k, v, visual, 48, backend="torch", block_size=16)
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in (q, k, v))


def test_import_and_first_use_change_no_process_setting():
    code = """
import json, os, sys
import torch
before = (dict(os.environ), torch._dynamo.config.recompile_limit)
import diffattn, diffattn_kernels
from diffattn_kernels import flex
flex._compiled_flex()
with flex._recompile_room(True):
    inside = torch._dynamo.config.recompile_limit
after = (dict(os.environ), torch._dynamo.config.recompile_limit)
changed = sorted(k for k in set(before[0]) | set(after[0]) if before[0].get(k) != after[0].get(k))
print(json.dumps({"env": changed, "limit": [before[1], after[1]], "inside": inside}))
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["env"] == [], f"environment variables changed: {report['env']}"
    assert report["limit"][0] == report["limit"][1], "dynamo's recompile_limit changed globally"
    assert report["inside"] >= kernels.flex.RECOMPILE_LIMIT, "compiled flex calls get room for one compile per shape"
