"""The runtime: applications stack and remove exactly, steps and batch roles come from the running call, threads do
not see each other, records stay bounded, torch.compile works."""

from __future__ import annotations

import copy
import functools
import threading
import tracemalloc
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from support import generate

import diffattn
from diffattn import guidance
from diffattn.methods.pag import PAG
from diffattn.testing import tiny_inputs, tiny_model, tiny_pipeline


@functools.cache
def pipeline(kind: str):
    return tiny_pipeline(kind, seed=0)


@dataclass(frozen=True)
class Recording(diffattn.AttentionMethod):
    """Dense attention that remembers (step, num_steps, batch roles) of every call."""

    seen: list = field(default_factory=list, compare=False)
    roles: frozenset = frozenset({"self", "cross", "joint"})

    def __call__(self, q, k, v, ctx):
        self.seen.append((ctx.step, ctx.num_steps, ctx.batch_roles))
        return ctx.dense(q, k, v)


@dataclass(frozen=True)
class ScaleQueries(diffattn.AttentionMethod):
    """A method that delegates: the next method (or the stock core) on scaled queries."""

    factor: float = 1.0
    roles: frozenset = frozenset({"self"})

    def __call__(self, q, k, v, ctx):
        return ctx.dense(q * self.factor, k, v)


def near(q_idx, kv_idx, ctx):
    return (q_idx - kv_idx).abs() < 4


def far(q_idx, kv_idx, ctx):
    return (q_idx - kv_idx).abs() % 3 != 1


# ----------------------------------------------------------------------------------------------------------------
# Stacking
# ----------------------------------------------------------------------------------------------------------------
def test_guidance_and_sparse_stack_in_a_defined_order():
    """PAG outermost, the kernel-level method inside (PAG's dense call reaches it), whatever the order of applying."""
    pipe = pipeline("wan")
    tile = diffattn.SlidingTileAttention(tile=(1, 2, 2), window=(1, 1, 1))
    with guidance.enable(pipe, PAG(scale=3.0)):
        pag_only = generate(pipe, guidance_scale=1.0, height=64, width=64)
    with diffattn.apply(pipe, tile):
        tile_only = generate(pipe, guidance_scale=1.0, height=64, width=64)
    with guidance.enable(pipe, PAG(scale=3.0)), diffattn.apply(pipe, tile) as handle:
        first = generate(pipe, guidance_scale=1.0, height=64, width=64)
        assert handle.acted()
    with diffattn.apply(pipe, tile), guidance.enable(pipe, PAG(scale=3.0)):
        second = generate(pipe, guidance_scale=1.0, height=64, width=64)
    assert np.array_equal(first, second)
    assert np.abs(first - pag_only).max() > 1e-4 and np.abs(first - tile_only).max() > 1e-4
    # the inner method sees the batch guidance expanded (cond + perturbed)
    recording = Recording()
    with guidance.enable(pipe, PAG(scale=3.0, layers="blocks.0.attn1")):
        with diffattn.apply(pipe, recording, layers="blocks.0.attn1"):
            generate(pipe, steps=2, guidance_scale=1.0, height=64, width=64)
    assert {roles for *_, roles in recording.seen} == {("cond", "perturbed")}


def test_guidance_with_masked_attention():
    sd = pipeline("sd")
    with guidance.enable(sd, PAG()):
        pag = generate(sd, guidance_scale=7.5)
    with guidance.enable(sd, PAG()), diffattn.apply(sd, diffattn.Masked(near, roles={"self"})) as handle:
        both = generate(sd, guidance_scale=7.5)
        assert handle.acted()
    assert np.isfinite(both).all() and np.abs(both - pag).max() > 1e-4


def test_removing_the_middle_of_three_leaves_the_other_two_exact():
    pipe = pipeline("sd")
    a, c = ScaleQueries(1.5), diffattn.Masked(near, roles={"self"})
    with diffattn.apply(pipe, a), diffattn.apply(pipe, c):
        expected = generate(pipe, steps=2)
    first = diffattn.apply(pipe, a)
    middle = diffattn.apply(pipe, ScaleQueries(0.5))
    last = diffattn.apply(pipe, c)
    try:
        assert not np.array_equal(generate(pipe, steps=2), expected)
        middle.remove()
        assert np.array_equal(generate(pipe, steps=2), expected)
    finally:
        first.remove()
        last.remove()


def test_two_methods_that_each_replace_the_core_are_refused_not_ignored():
    pipe = pipeline("sd")
    with diffattn.apply(pipe, diffattn.Masked(near, roles={"self"})), diffattn.apply(pipe, diffattn.Masked(far)):
        with pytest.raises(diffattn.InterceptionError, match="never ran"):
            generate(pipe, steps=1)


def _two_transformer_wan():
    base = pipeline("wan")
    return type(base)(**{**base.components, "transformer_2": copy.deepcopy(base.transformer)}, boundary_ratio=0.5)


def test_applying_to_one_denoiser_leaves_the_other_alone():
    """Wan 2.2: one loop, one global step shared by both transformers; a method on pipe.transformer_2 stays when
    another is applied to pipe.transformer."""
    pipe = _two_transformer_wan()
    on_first, on_second = Recording(), Recording()
    with diffattn.apply(pipe.transformer_2, on_second), diffattn.apply(pipe.transformer, on_first):
        generate(pipe, steps=4, guidance_scale=1.0)
    first, second = {s for s, *_ in on_first.seen}, {s for s, *_ in on_second.seen}
    assert first and second and not first & second and first | second == {0, 1, 2, 3}
    assert max(first) < min(second)  # high-noise steps first, then the low-noise transformer
    assert {n for _, n, _ in on_first.seen + on_second.seen} == {4}


def test_steps_follow_the_loop_of_two_transformers():
    pipe = _two_transformer_wan()
    for steps in (range(2, 4), 0.5, (0.5, 1.0)):
        with diffattn.apply(pipe, diffattn.Dense(), steps=steps) as handle:
            generate(pipe, steps=4, guidance_scale=1.0)
            assert {s for s, _ in handle.acted()} == {2, 3}, steps


def test_img2img_strength_counts_only_the_steps_that_run():
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**pipeline("sd").components)
    image = torch.rand(1, 3, 32, 32)
    recording = Recording(roles=frozenset({"self"}))
    with diffattn.apply(pipe, recording, steps=0.5) as handle:
        pipe(
            "a red circle",
            image=image,
            strength=0.5,
            num_inference_steps=4,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        )
        assert {s for s, _ in handle.acted()} == {1}  # 2 of 4 steps run; the second half of them is step 1
    assert {n for _, n, _ in recording.seen} == {2}


def test_repeated_timesteps_count_as_separate_steps():
    """DPM++ with Karras sigmas over 50 steps repeats a timestep (49 distinct): still 50 steps, the last one acts."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    components = pipeline("sd").components
    scheduler = DPMSolverMultistepScheduler.from_config(components["scheduler"].config, use_karras_sigmas=True)
    pipe = StableDiffusionPipeline(**{**components, "scheduler": scheduler})
    recording = Recording(roles=frozenset({"self"}))
    with diffattn.apply(pipe, recording, layers="mid_block", steps=[49]) as handle:
        generate(pipe, steps=50, guidance_scale=1.0)
        assert len(set(scheduler.timesteps.tolist())) == 49
        assert {s for s, _ in handle.acted()} == {49}
    assert {n for _, n, _ in recording.seen} == {50}


def test_timestep_and_fraction_ranges():
    pipe = pipeline("sd")
    with diffattn.apply(pipe, diffattn.Dense(), steps=diffattn.StepSchedule.timesteps(400, 1000)) as handle:
        generate(pipe, steps=4)
        selected = {i for i, t in enumerate(pipe.scheduler.timesteps.tolist()) if 400 <= t <= 1000}
        assert selected and {s for s, _ in handle.acted()} == selected
    with diffattn.apply(pipeline("sd"), diffattn.Dense(), steps=(0.25, 0.75)) as handle:
        generate(pipeline("sd"), steps=4)
        assert {s for s, _ in handle.acted()} == {1, 2}


def test_a_schedule_that_never_acts_is_an_error():
    pipe = pipeline("sd")
    with diffattn.apply(pipe, diffattn.Dense(), steps=100):
        with pytest.raises(diffattn.StepSelectionError, match="selects none of the 4 steps"):
            generate(pipe, steps=4)
    with diffattn.apply(pipe, diffattn.Dense(), steps=diffattn.StepSchedule.timesteps(1001, 2000)):
        with pytest.raises(diffattn.StepSelectionError, match="timesteps"):
            generate(pipe, steps=4)


def test_a_shared_denoiser_takes_cfg_from_the_pipeline_that_runs():
    from diffusers import StableDiffusionPipeline

    first = pipeline("sd")
    second = StableDiffusionPipeline(**first.components)
    recording = Recording(roles=frozenset({"self"}))
    with diffattn.apply(first, recording, layers="mid_block"):
        generate(second, steps=1, guidance_scale=7.5)  # the first pipeline was never called
        assert {roles for *_, roles in recording.seen} == {("uncond", "cond")}
        recording.seen.clear()
        generate(first, steps=1, guidance_scale=1.0)
        generate(second, steps=1, guidance_scale=7.5)
        assert [roles for *_, roles in recording.seen] == [("cond",), ("uncond", "cond")]


def test_apply_with_guidance_method_is_refused():
    with pytest.raises(diffattn.DiffattnError, match="guidance.enable"):
        diffattn.apply(pipeline("sd"), PAG(scale=5))


# ----------------------------------------------------------------------------------------------------------------
# Threads and memory
# ----------------------------------------------------------------------------------------------------------------
def test_two_pipelines_in_two_threads_get_their_single_thread_results():
    runs = {"flux": diffattn.Masked(near), "wan": diffattn.SlidingTileAttention(tile=(1, 1, 1), window=(1, 1, 1))}
    pipes = {kind: tiny_pipeline(kind, seed=0) for kind in runs}
    handles = [diffattn.apply(pipes[kind], method) for kind, method in runs.items()]
    try:
        alone = {kind: generate(pipes[kind], steps=3) for kind in runs}
        results, errors = {}, []

        def work(kind):
            try:
                for _ in range(2):
                    results.setdefault(kind, []).append(generate(pipes[kind], steps=3))
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(kind,)) for kind in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        for kind in runs:
            assert all(np.array_equal(r, alone[kind]) for r in results[kind]), kind
    finally:
        for handle in handles:
            handle.remove()


def test_records_stay_bounded_over_many_forwards():
    model = tiny_model("wan")
    inputs = tiny_inputs("wan", (1, 2, 2), batch=1, text_len=3)
    with diffattn.apply(model, diffattn.Masked(near)) as handle, torch.no_grad():
        for _ in range(50):
            model(**inputs)
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for _ in range(1000):
            model(**inputs)
        grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
        tracemalloc.stop()
        assert len(handle.calls) <= diffattn.runtime.RECENT_CALLS
        assert len(handle.acted()) == len(handle.layers)  # step unknown (None) x layers
    assert grown < 2_000_000, f"memory grew by {grown} bytes over 1,000 forwards"


def test_import_changes_no_process_wide_setting():
    import os
    import subprocess
    import sys

    code = (
        "import os, torch; env = dict(os.environ); limit = torch._dynamo.config.recompile_limit; "
        "import diffattn, diffattn_kernels, diffattn_bench.compare; "
        "assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items()); "
        "assert torch._dynamo.config.recompile_limit == limit"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("how", ["torch.compile", "model.compile"])
def test_compiled_model_matches_eager(how):
    model = tiny_model("wan")
    inputs = tiny_inputs("wan", (2, 4, 4), batch=1, text_len=3)
    method = diffattn.SlidingTileAttention(tile=(1, 2, 2), window=(1, 1, 1))
    with diffattn.apply(model, method), torch.no_grad():
        eager = model(**inputs)[0]
    compiled = torch.compile(model) if how == "torch.compile" else model
    if how == "model.compile":
        model.compile()
    try:
        with diffattn.apply(compiled, method) as handle, torch.no_grad():
            out = compiled(**inputs)[0]
            assert handle.acted()
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_model_graph_breaks_within_budget():
    """Static patterns and Dense add no graph break beyond the stock model's (budget: one per transformer block):
    the SDPA call becomes the opaque op diffattn::attention_core, whose Python runs at call time."""
    model = tiny_model("wan")
    inputs = tiny_inputs("wan", (2, 4, 4), batch=1, text_len=3)
    budget = len(model.blocks)
    try:
        with torch.no_grad():
            stock = torch._dynamo.explain(model)(**inputs).graph_break_count
            for method in (diffattn.Dense(), diffattn.SlidingTileAttention(tile=(1, 2, 2), window=(1, 1, 1))):
                torch._dynamo.reset()
                with diffattn.apply(model, method) as handle:
                    explained = torch._dynamo.explain(model)(**inputs)
                    assert handle.acted(), method.name
                assert explained.graph_break_count <= stock + budget, (method.name, explained.break_reasons)
    finally:
        torch._dynamo.reset()
