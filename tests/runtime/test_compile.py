"""``torch.compile`` with diffattn (issue #26, item 9): ``fullgraph=True`` works with Dense and a sparse method, the
step and records of each call are read at call time (never baked into the graph), the forward's state ends with
the forward, guidance under ``fullgraph=True`` is refused with its reason, and every op that runs Python at call
time is kept out of CUDA graph capture."""

from __future__ import annotations

import pytest
import torch
from support import Recording, ip_adapter_unet

import diffattn
from diffattn.runtime.model_hook import existing_state
from diffattn.testing import tiny_inputs, tiny_model

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _wan():
    return tiny_model("wan"), tiny_inputs("wan", (2, 4, 4), batch=1, text_len=3)


def _per_step(model, method, inputs, steps=2):
    outs = []
    with diffattn.apply(model, method, steps=[1]) as handle, torch.no_grad():
        for i in range(steps):
            with diffattn.denoising_step(i, steps):
                outs.append(model(**inputs)[0])
        return outs, handle.acted()


@pytest.mark.parametrize(
    "method", [diffattn.Dense(), diffattn.SlidingTileAttention(tile=(1, 2, 2), window=(1, 1, 1))], ids=lambda m: m.name
)
def test_fullgraph_compile_acts_on_the_steps_chosen_at_call_time(method):
    """One graph for both steps: steps=[1] acts at step 1 only, so the step is read when the graph runs."""
    model, inputs = _wan()
    eager, eager_acted = _per_step(model, method, inputs)
    compiled = torch.compile(model, fullgraph=True)
    outs, acted = _per_step(compiled, method, inputs)
    assert acted == eager_acted and {step for step, _ in acted} == {1}
    for out, reference in zip(outs, eager, strict=True):
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_sparse_method_changes_the_compiled_output_only_where_it_acts():
    model, inputs = _wan()
    compiled = torch.compile(model, fullgraph=True)
    dense, _ = _per_step(compiled, diffattn.Dense(), inputs)
    tiled, _ = _per_step(compiled, diffattn.SlidingTileAttention(tile=(1, 2, 2), window=(1, 1, 1)), inputs)
    torch.testing.assert_close(tiled[0], dense[0], rtol=1e-5, atol=1e-5)
    assert (tiled[1] - dense[1]).abs().max() > 1e-3


def test_compiled_forward_ends_its_call_state():
    """After a compiled forward nothing can read its step: a direct call of an attention module raises."""
    model, inputs = _wan()
    compiled = torch.compile(model, fullgraph=True)
    with diffattn.apply(compiled, diffattn.Dense()), torch.no_grad():
        with diffattn.denoising_step(0, 1):
            compiled(**inputs)
        with pytest.raises(diffattn.LayoutError, match="outside the model's forward"):
            _ = existing_state(model).current


def test_compiled_model_without_a_declared_step_raises_for_a_step_selection():
    model, inputs = _wan()
    compiled = torch.compile(model, fullgraph=True)
    with diffattn.apply(compiled, diffattn.Dense(), steps=[1]), torch.no_grad():
        with pytest.raises(diffattn.StepSelectionError):
            compiled(**inputs)


def test_fullgraph_compile_with_guidance_says_why_it_cannot():
    model, inputs = _wan()
    compiled = torch.compile(model, fullgraph=True)
    with diffattn.guidance.enable(compiled, diffattn.PAG(scale=3.0)), torch.no_grad():
        with pytest.raises(torch._dynamo.exc.Unsupported, match="compile without fullgraph=True"):
            with diffattn.denoising_step(0, 1, batch_roles=("cond",)):
                compiled(**inputs)


def test_guidance_under_compile_without_fullgraph_matches_eager():
    """Guidance expands the batch inside the compiled model's call (traced by dynamo and AOTAutograd; inductor's code
    generation, which the tests above cover, took 8 of this test's 20 s alone on a 2-core AMD EPYC)."""
    model, inputs = _wan()
    with diffattn.guidance.enable(model, diffattn.PAG(scale=3.0)), torch.no_grad():
        with diffattn.denoising_step(0, 1, batch_roles=("cond",)):
            eager = model(**inputs)[0]
    compiled = torch.compile(model, backend="aot_eager")
    with diffattn.guidance.enable(compiled, diffattn.PAG(scale=3.0)), torch.no_grad():
        with diffattn.denoising_step(0, 1, batch_roles=("cond",)):
            out = compiled(**inputs)[0]
    assert (out - model(**inputs)[0]).abs().max() > 1e-3  # PAG acted
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


def test_ip_adapter_call_keeps_its_role_under_compile():
    """Compiled, each SDPA call is its own op: the image-prompt call is still the module's second, not text. (Traced
    by dynamo and AOTAutograd, run without inductor's code generation, which the tests above cover and which took 55 s
    of this test on a 2-core AMD EPYC: the roles are decided at graph capture and by the ops at call time.)"""
    model = ip_adapter_unet()
    inputs = tiny_inputs("unet_sd15", (4, 4), text_len=7)
    batch = inputs["sample"].shape[0]
    extra = {"added_cond_kwargs": {"image_embeds": [torch.randn(batch, 1, 16)]}}
    method = Recording(read=lambda q, k, ctx: k.shape[-2], roles=frozenset({"cross"}))
    compiled = torch.compile(model, backend="aot_eager")
    with diffattn.apply(compiled, method) as handle, torch.no_grad():
        with diffattn.denoising_step(0, 1, batch_roles=("cond",) * batch):
            compiled(**inputs, **extra)
    assert method.seen and set(method.seen) == {7}
    assert any(record.role == "image_prompt" and not record.acted for record in handle.calls)


def test_ops_that_run_python_at_call_time_are_kept_out_of_cuda_graphs():
    """``mode="reduce-overhead"`` must not replay a forward without the ops' Python (step, records)."""
    for name in ("attention_core", "begin_forward", "end_forward"):
        op = getattr(torch.ops.diffattn, name).default
        assert torch.Tag.cudagraph_unsafe in op.tags, name
