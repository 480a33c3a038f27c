"""diffattn.tune: per layer, step range and head budgets chosen against dense attention, saved and reloaded bitwise,
refused on another grid or model, resumed after an interruption (issue #30)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import diffattn
from diffattn.errors import DiffattnError, MethodConfigError
from diffattn.tuning import SensitivityProbe, TunedProfile
from diffattn.tuning.probe import relative_l1_per_head
from diffattn.tuning.tune import _choose

PROMPTS = ["a red circle", "a blue square"]
CALL = {"height": 32, "width": 32, "guidance_scale": 4.0}
#: random tiny weights attend diffusely: sparse outputs are 10-90% off dense, so the target is loose here
SETTINGS = {"error_target": 0.3, "num_inference_steps": 4, "block_size": 16, "candidates": (0.25, 0.5, 0.75)}


def _pipe(kind: str = "sd"):
    from diffattn.testing import tiny_pipeline

    pipe = tiny_pipeline(kind, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.cache
def _tuned() -> TunedProfile:
    return diffattn.tune(_pipe(), "dynamic-topk", PROMPTS, progress=False, **SETTINGS, **CALL)


def _image(pipe, prompt: str = "a green triangle", **call) -> np.ndarray:
    kwargs = {**CALL, **call}
    return pipe(
        prompt, num_inference_steps=4, generator=torch.Generator().manual_seed(7), output_type="np", **kwargs
    ).images[0]


def test_relative_l1_per_head_by_hand():
    dense = torch.zeros(1, 2, 3, 1)
    dense[0, 0] = 2.0
    dense[0, 1] = -1.0
    out = dense.clone()
    out[0, 0, 0] = 1.0  # head 0: |1 - 2| / (3 * 2)
    assert relative_l1_per_head(out, dense).tolist() == pytest.approx([1 / 6, 0.0])


def test_choice_is_the_smallest_candidate_within_the_target_per_head_and_range():
    probe = SensitivityProbe((0.1, 0.3, 0.6), step_ranges=2)
    # head 0 meets 0.05 at 0.3, head 1 only dense; range 1: head 0 at 0.1, head 1 at 0.6 (the mean of two calls)
    probe.sums[("a", 0)] = torch.tensor([[0.2, 0.3], [0.04, 0.2], [0.01, 0.1]], dtype=torch.float64)
    probe.sums[("a", 1)] = torch.tensor([[0.06, 0.4], [0.02, 0.2], [0.0, 0.08]], dtype=torch.float64)
    probe.counts.update({("a", 0): 1, ("a", 1): 2})
    probe.grids["a"] = (4, 4)
    (layer,) = _choose(probe, (0.1, 0.3, 0.6), 2, 0.05)
    assert layer.budgets == ((0.3, 1.0), (0.1, 0.6))
    assert np.allclose(layer.errors, ((0.04, 0.0), (0.03, 0.04)))
    assert layer.grid == (4, 4)


def test_tune_lists_every_self_attention_layer_with_budgets_within_the_target():
    profile = _tuned()
    pipe = _pipe()
    selves = [n for n, m in diffattn.attention_modules(pipe.unet) if n.endswith("attn1")]
    assert sorted(profile.layer_names) == sorted(selves)  # in the order of the first calls
    assert profile.model_class == "UNet2DConditionModel" and profile.step_ranges == 2
    for layer in profile.layers:
        heads = dict(diffattn.attention_modules(pipe.unet))[layer.name].heads
        assert len(layer.budgets) == 2 and all(len(row) == heads for row in layer.budgets)
        for budgets, errors in zip(layer.budgets, layer.errors):
            for b, e in zip(budgets, errors):
                assert b in (*SETTINGS["candidates"], 1.0)
                assert e <= SETTINGS["error_target"]
    budgets = {b for layer in profile.layers for row in layer.budgets for b in row}
    assert len(budgets) > 1, "every head got the same budget: the tuning chose nothing"


def test_tighter_target_never_lowers_a_budget():
    loose = _tuned()
    tight = diffattn.tune(
        _pipe(), "dynamic-topk", PROMPTS, progress=False, **{**SETTINGS, "error_target": 0.15}, **CALL
    )
    for a, b in zip(loose.layers, tight.layers):
        for row_a, row_b in zip(a.budgets, b.budgets):
            assert all(y >= x for x, y in zip(row_a, row_b))
    assert tight.mean_budget() > loose.mean_budget()


def test_saved_profile_reloads_equal_and_gives_bitwise_the_same_image(tmp_path):
    profile = _tuned()
    loaded = TunedProfile.load(profile.save(tmp_path / "profile"))
    assert loaded == profile
    pipe = _pipe()
    handle = diffattn.apply(pipe, profile)
    first = _image(pipe)
    assert handle.acted(), "the profile acted on no call"
    handle.remove()
    diffattn.apply(pipe, loaded)
    second = _image(pipe)
    assert np.array_equal(first, second)
    diffattn.remove(pipe)
    assert not np.array_equal(first, _image(pipe)), "the profile changed nothing against dense"


def test_profile_on_another_grid_is_refused_saying_to_tune_again():
    pipe = _pipe()
    diffattn.apply(pipe, _tuned())
    with pytest.raises(MethodConfigError, match=r"tuned on token grid .* tune again at this size"):
        _image(pipe, height=48, width=48)


def test_profile_on_another_model_is_refused():
    with pytest.raises(MethodConfigError, match="tuned for UNet2DConditionModel, not"):
        diffattn.apply(_pipe("sd3"), _tuned())


def test_interrupted_tuning_resumes_where_it_stopped(tmp_path, monkeypatch):
    pipe = _pipe()
    calls = []
    original = type(pipe).__call__

    def interrupted(self, prompt, **kwargs):
        calls.append(prompt)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, prompt, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        diffattn.tune(pipe, "dynamic-topk", PROMPTS, checkpoint=tmp_path, progress=False, **SETTINGS, **CALL)
    assert not diffattn.attention_modules(pipe.unet)[0][1].processor.__class__.__module__.startswith("diffattn")
    monkeypatch.setattr(type(pipe), "__call__", original)
    calls.clear()

    def counting(self, prompt, **kwargs):
        calls.append(prompt)
        return original(self, prompt, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", counting)
    resumed = diffattn.tune(pipe, "dynamic-topk", PROMPTS, checkpoint=tmp_path, progress=False, **SETTINGS, **CALL)
    assert calls == [PROMPTS[1]], "the finished prompt ran again"
    assert resumed.layers == _tuned().layers
    with pytest.raises(DiffattnError, match="other settings"):
        diffattn.tune(pipe, "dynamic-topk", PROMPTS[:1], checkpoint=tmp_path, progress=False, **SETTINGS, **CALL)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"family": "sliding-tile"}, "not tunable yet; use one of dynamic-topk"),
        ({"prompts": "a red circle"}, "list of calibration prompts"),
        ({"error_target": 5}, "relative L1 error .* in \\(0, 1\\)"),
        ({"candidates": (0.5, 0.1)}, "increasing top-k fractions"),
        ({"step_ranges": 0}, "positive number of parts"),
        ({"refine": -1}, "refine is a number of extra search steps"),
    ],
)
def test_bad_tuning_arguments_say_how_to_fix(change, message):
    args = {"family": "dynamic-topk", "prompts": PROMPTS, **SETTINGS, **CALL, **change}
    family, prompts = args.pop("family"), args.pop("prompts")
    with pytest.raises(ValueError, match=message):
        diffattn.tune(_pipe(), family, prompts, **args)


def test_loading_a_folder_without_a_profile_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="diffattn.tune"):
        TunedProfile.load(tmp_path)


def test_psnr_target_picks_the_sparsest_profile_that_keeps_it():
    """With ``psnr_target`` the profile regenerates the calibration prompts within that PSNR of dense (checked here
    by regenerating them), and a lower target never gets denser budgets."""
    from diffattn.tuning.tune import pooled_psnr

    settings = {k: v for k, v in SETTINGS.items() if k != "error_target"}
    strict = diffattn.tune(_pipe(), "dynamic-topk", PROMPTS, psnr_target=30.0, progress=False, **settings, **CALL)
    loose = diffattn.tune(_pipe(), "dynamic-topk", PROMPTS, psnr_target=15.0, progress=False, **settings, **CALL)
    assert strict.calibration_psnr >= 30.0 and loose.calibration_psnr >= 15.0
    assert loose.mean_budget() <= strict.mean_budget()
    pipe = _pipe()

    def outputs():
        return [
            pipe(p, num_inference_steps=4, generator=torch.Generator().manual_seed(i), output_type="np", **CALL).images
            for i, p in enumerate(PROMPTS)
        ]

    dense = outputs()
    with diffattn.apply(pipe, strict):
        sparse = outputs()
    assert pooled_psnr(sparse, dense) == pytest.approx(strict.calibration_psnr)


def test_one_target_and_a_psnr_in_db():
    args = {k: v for k, v in SETTINGS.items() if k != "error_target"}
    with pytest.raises(ValueError, match="give one target"):
        diffattn.tune(_pipe(), "dynamic-topk", PROMPTS, progress=False, **args, **CALL)
    with pytest.raises(ValueError, match="give one target"):
        diffattn.tune(_pipe(), "dynamic-topk", PROMPTS, error_target=0.1, psnr_target=25, **args, **CALL)
    with pytest.raises(ValueError, match="psnr_target is in dB"):
        diffattn.tune(_pipe(), "dynamic-topk", PROMPTS, psnr_target=-3, **args, **CALL)


def _profile(budgets: tuple[tuple[float, ...], ...], grid=(4, 8, 8)) -> TunedProfile:
    from diffattn.tuning.profile import LayerBudget

    errors = tuple(tuple(0.0 for _ in row) for row in budgets)
    return TunedProfile(
        model_class="M",
        family="dynamic-topk",
        block_size=32,
        tile=(2, 4, 4),
        step_ranges=len(budgets),
        error_target=0.1,
        layers=(LayerBudget("bench", grid, budgets, errors),),
        calibration=("p",),
        num_inference_steps=2,
        diffattn_version="test",
    )


def _qkv(heads: int = 4, tokens: int = 256):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(2, heads, tokens, 16, generator=g) for _ in range(3)]


def test_dense_heads_of_a_profile_run_the_stock_core_and_the_others_their_budgets():
    """Heads tuned dense (budget 1.0) skip selection and the sparse loop: they are the stock core's output bit for
    bit; the other heads are what the dynamic method gives them with their budgets; the density reported counts a
    dense head as 1."""
    from diffattn.layout import TokenLayout
    from diffattn.testing import standalone_context

    q, k, v = _qkv()
    ctx, reports = standalone_context(TokenLayout((4, 8, 8)), step=0, num_steps=2)
    method = _profile(((1.0, 0.25, 1.0, 0.5), (1.0,) * 4)).method()
    out = method(q, k, v, ctx)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out[:, [0, 2]], dense[:, [0, 2]])
    alone = diffattn.DynamicSparseAttention(topk=(0.25, 0.5), block_size=32, tile=(2, 4, 4))
    own, _ = standalone_context(TokenLayout((4, 8, 8)), step=0, num_steps=2)
    assert torch.allclose(out[:, [1, 3]], alone(q[:, [1, 3]], k[:, [1, 3]], v[:, [1, 3]], own), atol=1e-6)
    assert not torch.allclose(out[:, [1, 3]], dense[:, [1, 3]], atol=1e-3)  # they are sparse
    assert 0.5 < reports["density"] < 1.0
    # the second step range is dense in every head: the stock core, no selection
    ctx, reports = standalone_context(TokenLayout((4, 8, 8)), step=1, num_steps=2)
    assert torch.equal(method(q, k, v, ctx), dense)
    assert reports["density"] == 1.0 and reports["selection_seconds"] == 0.0


def test_weighted_choice_takes_a_budget_only_where_it_saves_time():
    """With candidate costs (time / dense time) a head takes the candidate minimising cost + error / threshold:
    never one slower than dense, however exact; one that saves a share s of the time only if its error is below
    threshold * s."""
    from diffattn.tuning.tune import _pick

    candidates = (0.1, 0.5, 0.9)
    costs = (0.3, 0.7, 1.05)  # the 0.9 candidate is slower than the stock core
    assert _pick([0.5, 0.5, 0.0], candidates, 0.1, costs) == 3  # exact at 0.9 but slower: dense
    assert _pick([0.5, 0.5, 0.0], candidates, 0.1, None) == 2  # without costs: the smallest within the target
    assert _pick([0.5, 0.029, 0.0], candidates, 0.1, costs) == 1  # 0.7 + 0.29 < 1
    assert _pick([0.5, 0.031, 0.0], candidates, 0.1, costs) == 3  # 0.7 + 0.31 > 1
    assert _pick([0.06, 0.0, 0.0], candidates, 0.1, costs) == 1  # 0.3 + 0.6 > 0.7 + 0: the cheaper total wins
    assert _pick([0.03, 0.0, 0.0], candidates, 0.1, costs) == 0  # 0.3 + 0.3 < 0.7


def test_psnr_tuning_times_the_candidates_and_keeps_their_costs_in_the_saved_profile(tmp_path):
    settings = {k: v for k, v in SETTINGS.items() if k != "error_target"}
    profile = diffattn.tune(_pipe(), "dynamic-topk", PROMPTS, psnr_target=15.0, progress=False, **settings, **CALL)
    assert profile.candidates == settings["candidates"]
    for layer in profile.layers:
        assert len(layer.costs) == len(settings["candidates"]) and all(c > 0 for c in layer.costs)
        for row, errors in zip(layer.budgets, layer.errors):
            for budget, error in zip(row, errors):
                if budget < 1.0:  # a kept candidate saves time and keeps its error within threshold x saving
                    cost = layer.costs[settings["candidates"].index(budget)]
                    assert cost < 1.0 and error <= profile.error_target * (1 - cost) + 1e-12
    assert TunedProfile.load(profile.save(tmp_path)) == profile
    plain = diffattn.tune(
        _pipe(), "dynamic-topk", PROMPTS, psnr_target=15.0, progress=False, weigh_costs=False, **settings, **CALL
    )
    assert all(not layer.costs for layer in plain.layers)


def test_a_layer_range_its_profile_does_not_speed_up_is_made_dense_and_the_others_kept():
    from diffattn.tuning.cost import drop_unpaid_ranges
    from diffattn.tuning.profile import LayerBudget

    a = LayerBudget("a", (4, 4), ((0.25, 1.0), (0.5, 0.5)), ((0.1, 0.0), (0.2, 0.2)))
    b = LayerBudget("b", (4, 4), ((1.0, 1.0), (0.25, 0.25)), ((0.0, 0.0), (0.1, 0.1)))
    profile = TunedProfile("M", "dynamic-topk", 16, "auto", 2, 0.2, (a, b))
    # a's first range (one head sparse: a split) is slower than dense, its second faster; b's second range not timed
    seconds = {("a", 0): (1.0, 1.2), ("a", 1): (1.0, 0.6), ("b", 0): (1.0, 2.0)}
    lean, dropped = drop_unpaid_ranges(profile, seconds)
    assert dropped == [("a", 0)]
    assert lean.layer("a").budgets == ((1.0, 1.0), (0.5, 0.5)) and lean.layer("a").errors[0] == (0.0, 0.0)
    assert lean.layer("b") == b  # all dense where timed, untimed range kept
    assert drop_unpaid_ranges(profile, {("a", 0): (1.0, 1.0)})[1] == [("a", 0)]  # no faster: dense


def test_psnr_tuning_times_its_profile_per_layer_and_range_and_drops_what_does_not_pay(monkeypatch):
    """After the search, one run times every tuned layer's call of the chosen profile against the stock core in each
    step range; ranges that save nothing become dense (here every range is made to look slower)."""
    import importlib
    import math

    tune_module = importlib.import_module("diffattn.tuning.tune")  # the package's `tune` is the function
    seen = {}
    real = tune_module.drop_unpaid_ranges

    def all_slower(profile, seconds):
        seen.update(profile=profile, seconds=dict(seconds))
        return real(profile, {key: (1.0, 2.0) for key in seconds})

    monkeypatch.setattr(tune_module, "drop_unpaid_ranges", all_slower)
    # on the tiny model every candidate is slower than the stock core: let the search see them as cheap
    monkeypatch.setattr(tune_module, "relative_costs", lambda seconds: tuple(0.1 for _ in seconds[1:]))
    settings = {k: v for k, v in SETTINGS.items() if k != "error_target"}
    profile = diffattn.tune(_pipe(), "dynamic-topk", PROMPTS, psnr_target=15.0, progress=False, **settings, **CALL)
    searched = seen["profile"]
    assert searched.mean_budget() < 1.0, "the search kept no sparse head: nothing to time"
    assert set(seen["seconds"]) == {(layer.name, r) for layer in searched.layers for r in range(2)}
    assert all(dense > 0 and timed > 0 for dense, timed in seen["seconds"].values())
    assert profile.mean_budget() == 1.0 and profile.calibration_psnr == math.inf
    assert profile.error_target == searched.error_target


def test_refined_search_ends_between_the_grid_thresholds_and_still_keeps_the_target():
    """The bisections after the grid search only move the threshold up while the target holds: the profile is never
    denser than the grid's and its calibration PSNR still meets the target."""
    from diffattn.tuning.tune import THRESHOLDS

    settings = {k: v for k, v in SETTINGS.items() if k != "error_target"}
    # the tiny pipeline keeps 51 dB even at the loosest threshold: 55 dB makes the grid search stop below it
    common = {"psnr_target": 55.0, "progress": False, "weigh_costs": False, **settings, **CALL}
    grid = diffattn.tune(_pipe(), "dynamic-topk", PROMPTS, refine=0, **common)
    refined = diffattn.tune(_pipe(), "dynamic-topk", PROMPTS, refine=3, **common)
    assert grid.error_target in THRESHOLDS
    assert refined.error_target >= grid.error_target and refined.calibration_psnr >= 55.0
    assert refined.mean_budget() <= grid.mean_budget()
    following = THRESHOLDS[THRESHOLDS.index(grid.error_target) + 1]
    assert refined.error_target < following  # it stays below the grid threshold that failed


def test_a_bf16_profile_computes_every_head_in_bf16_and_keeps_the_dtype_when_saved(tmp_path):
    """``compute_dtype="bfloat16"``: dense heads are the stock core on bf16-cast inputs, sparse heads the dynamic
    method in bf16; the output keeps float32; the dtype survives saving."""
    import dataclasses

    from diffattn.layout import TokenLayout
    from diffattn.testing import standalone_context

    q, k, v = _qkv()
    profile = dataclasses.replace(_profile(((1.0, 0.25, 1.0, 0.5), (1.0,) * 4)), compute_dtype="bfloat16")
    ctx, _ = standalone_context(TokenLayout((4, 8, 8)), step=0, num_steps=2)
    out = profile.method()(q, k, v, ctx)
    assert out.dtype == torch.float32
    cast = [x.bfloat16() for x in (q, k, v)]
    dense = torch.nn.functional.scaled_dot_product_attention(*cast).float()
    assert torch.equal(out[:, [0, 2]], dense[:, [0, 2]])
    alone = diffattn.DynamicSparseAttention(topk=(0.25, 0.5), block_size=32, tile=(2, 4, 4))
    own, _ = standalone_context(TokenLayout((4, 8, 8)), step=0, num_steps=2)
    assert torch.equal(out[:, [1, 3]], alone(*(x[:, [1, 3]] for x in cast), own).float())
    assert TunedProfile.load(profile.save(tmp_path)).compute_dtype == "bfloat16"
    meta = next(tmp_path.glob("*.json"))
    meta.write_text(meta.read_text().replace('"bfloat16"', '"bfloat8"'))
    with pytest.raises(diffattn.MethodConfigError, match="compute_dtype is None or one of bfloat16, float16, float32"):
        TunedProfile.load(tmp_path)  # a dtype torch has no name for: refused on load, not at the first call


def test_bf16_tuning_measures_in_bf16_and_records_it():
    settings = {k: v for k, v in SETTINGS.items() if k != "error_target"}
    profile = diffattn.tune(
        _pipe(),
        "dynamic-topk",
        PROMPTS,
        psnr_target=15.0,
        progress=False,
        compute_dtype=torch.bfloat16,
        **settings,
        **CALL,
    )
    assert profile.compute_dtype == "bfloat16" and profile.calibration_psnr >= 15.0
    with pytest.raises(ValueError, match="compute_dtype is None"):
        diffattn.tune(_pipe(), "dynamic-topk", PROMPTS, compute_dtype="bf16", progress=False, **SETTINGS, **CALL)


@pytest.mark.parametrize("native, warns", [(False, True), (True, False), (None, False)])
def test_bf16_tuning_warns_on_a_cpu_that_emulates_bf16(monkeypatch, native, warns):
    """Without AVX512-BF16 or AMX, bf16 attention is slower than float32: tuning in it says so (and not where bf16
    is native, or where torch cannot tell)."""
    import importlib
    import warnings

    tune_module = importlib.import_module("diffattn.tuning.tune")
    monkeypatch.setattr(tune_module, "native_bf16_on_cpu", lambda: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tune_module._warn_emulated_bf16(torch.bfloat16, torch.nn.Linear(2, 2))
        tune_module._warn_emulated_bf16(None, torch.nn.Linear(2, 2))  # float32: never
    messages = [str(w.message) for w in caught]
    assert len(messages) == int(warns)
    assert not warns or "leave compute_dtype out to tune in float32" in messages[0]
