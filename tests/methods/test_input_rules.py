"""The rules for ``steps=`` and ``layers=`` and for method parameters: each form means one documented thing, and
anything else fails at the call with an error that says what was wrong and how to write it (issue #26, items 3-4)."""

from __future__ import annotations

import math

import pytest

import diffattn
from diffattn import LayerSelectionError, StepSchedule, StepSelectionError
from diffattn.patterns import SlidingWindow
from diffattn.schedule import select_layers

NAMES = ["down.0.attn1", "down.0.attn2", "mid.attn1", "up.0.attn1"]


# --------------------------------------------------------------------------------------------------------------------
# steps=


def test_steps_float_pair_is_a_fraction_range_and_int_pair_or_list_is_indices():
    assert StepSchedule.parse((0.0, 1.0)) == StepSchedule(fraction_range=(0.0, 1.0))
    assert StepSchedule.parse((0.25, 0.75)).is_active(3, 8) and not StepSchedule.parse((0.25, 0.75)).is_active(1, 8)
    assert StepSchedule.parse((0, 1)) == StepSchedule(indices=frozenset({0, 1}))
    assert StepSchedule.parse([0, 1]) == StepSchedule(indices=frozenset({0, 1}))
    assert StepSchedule.parse(range(2, 4)) == StepSchedule(indices=frozenset({2, 3}))


@pytest.mark.parametrize("mixed", [(0.0, 1), (0, 1.0), (0.25, 1)])
def test_steps_mixed_int_float_pair_says_how_to_write_fractions_or_indices(mixed):
    with pytest.raises(StepSelectionError, match=r"write \(0\.0, 1\.0\) for fractions or \[0, 1\] for indices"):
        StepSchedule.parse(mixed)


def test_steps_zero_float_is_no_warmup_and_zero_int_is_step_zero():
    """``steps=0.0`` is a warm-up of ceil(0 · n) = 0 steps: the method acts on every step, and says so; ``steps=0``
    is step 0 only. Both are documented in StepSchedule's docstring."""
    no_warmup, step_zero = StepSchedule.parse(0.0), StepSchedule.parse(0)
    assert all(no_warmup.is_active(s, 10) for s in range(10))
    assert step_zero.is_active(0, 10) and not step_zero.is_active(1, 10)
    assert "every step" in no_warmup.describe()
    assert "steps=0.0" in StepSchedule.__doc__ and "indices" in StepSchedule.__doc__


@pytest.mark.parametrize(
    "bad,says",
    [
        (1.0, "[0, 1)"),
        (1.5, "[0, 1)"),
        (-0.1, "[0, 1)"),
        (math.nan, "[0, 1)"),
        (math.inf, "[0, 1)"),
        ((0.5, 0.25), "start < stop"),
        ((0.0, math.nan), "start < stop"),
        ((0.1, 0.2, 0.3), "(start, stop)"),
        ([0.25, 0.75], "(0.25, 0.75)"),
        ([0, 0.5], "ints"),
        ([], "selects nothing"),
        (range(0), "selects nothing"),
        ([-1], ">= 0"),
        (-3, ">= 0"),
        (True, "bool"),
        ([True, 2], "bool"),
        ("0:3", "range(0, 3)"),
        ([[0, 1]], "ints"),
        ({"a": 1}, "ints"),
        (object(), "not understood"),
        (1j, "not understood"),
    ],
    ids=repr,
)
def test_bad_steps_raise_step_selection_error_saying_the_fix(bad, says):
    with pytest.raises(StepSelectionError) as info:
        StepSchedule.parse(bad)
    assert says in str(info.value), str(info.value)


def test_step_schedule_timesteps_takes_numbers():
    assert StepSchedule.timesteps(0, 500).is_active(0, 10, timestep=250.0)
    with pytest.raises(StepSelectionError, match="numbers"):
        StepSchedule.timesteps("low", 500)
    with pytest.raises(StepSelectionError, match="low <= high"):
        StepSchedule.timesteps(math.nan, 500)


# --------------------------------------------------------------------------------------------------------------------
# layers=


@pytest.mark.parametrize("bad", [5, 2.5, b"attn1", ["attn1", 3], [None], {"attn1": 1}.values()], ids=repr)
def test_layers_that_are_not_regex_strings_say_what_layers_takes(bad):
    with pytest.raises(LayerSelectionError, match="layers takes a regex string .* or a list of them"):
        select_layers(bad, NAMES)


def test_apply_with_layers_as_an_int_says_what_layers_takes(tiny_model):
    model = tiny_model("unet_sd15")
    with pytest.raises(LayerSelectionError, match=r"layers takes a regex string .* or a list of them.*got 5 \(int\)"):
        diffattn.apply(model, diffattn.Dense(), layers=5)
    assert select_layers(("mid", "up"), NAMES) == ["mid.attn1", "up.0.attn1"]


# --------------------------------------------------------------------------------------------------------------------
# method parameters: checked at construction, with what was wrong and how to write it


def test_sliding_tile_float_tile_says_what_was_wrong_and_how_to_write_it():
    with pytest.raises(TypeError) as info:
        diffattn.SlidingTileAttention(tile=4.0)
    message = str(info.value)
    assert message.startswith("SlidingTileAttention: tile must be a positive int or a tuple of positive ints")
    assert "(one per grid axis), got 4.0 (float); write tile=4" in message


@pytest.mark.parametrize(
    "make,says",
    [
        (lambda: diffattn.SlidingTileAttention(tile=(4, 4.5)), ["tile", "(4, 4.5) (tuple)"]),
        (lambda: diffattn.SlidingTileAttention(window="3"), ["window", "'3' (str)"]),
        (lambda: diffattn.SlidingTileAttention(tile=True), ["tile", "True (bool)"]),
        (lambda: diffattn.SlidingWindowAttention(block_size="128"), ["block_size", "'128' (str)", "block_size=128"]),
        (lambda: diffattn.SparseAttention(pattern=SlidingWindow(3), block_size=10**12), ["block_size", "<= 65536"]),
        (lambda: diffattn.ShiftedWindowAttention(shift="half"), ["shift", "'half' (str)", "shift=0.25"]),
        (lambda: diffattn.ShiftedWindowAttention(windows=0), ["windows", "0 (int)"]),
        (lambda: diffattn.ShiftedWindowAttention(seed=1.5), ["seed", "1.5 (float)"]),
        (lambda: diffattn.Dense(roles="self"), ["roles", "'self' (str)", "roles={"]),
        (lambda: diffattn.Masked(causal, roles=3), ["roles", "3 (int)"]),
        (lambda: diffattn.DynamicSparseAttention(topk=0.5, similarity_guard="high"), ["similarity_guard", "0.6"]),
        (lambda: diffattn.DynamicSparseAttention(topk=0.5, tile=4.0), ["tile", "4.0 (float)", "tile='auto'"]),
        (lambda: diffattn.PyramidSparseAttention(bands=5), ["bands", "5 (int)", "bands=(0.4, 0.5, 0.6, 0.8)"]),
        (lambda: diffattn.PyramidSparseAttention(pool_similarity=math.nan), ["pool_similarity", "nan"]),
        (lambda: diffattn.Rettention(ratio_drift=math.nan), ["ratio_drift", "nan", "ratio_drift=0.04"]),
        (lambda: diffattn.Rettention(calibrate_every=True), ["calibrate_every", "True (bool)"]),
        (lambda: diffattn.TokenDownsampling(timestep_threshold_stop="0.5"), ["timestep_threshold_stop", "'0.5'"]),
        (lambda: diffattn.EntropyScaling(token_ratio=math.inf), ["token_ratio", "inf", "token_ratio=4.0"]),
        (lambda: diffattn.EntropyScaling(train_tokens=True), ["train_tokens", "True (bool)"]),
        (lambda: diffattn.PAG(layers=5), ["layers", "5 (int)", "regex string"]),
        (lambda: diffattn.PAG(layers=["mid", "("]), ["'('", "not a valid regular expression"]),
        (lambda: diffattn.BoundedAttention(boxes=((0, 0, 1, "1"),), subject_tokens=((1,),)), ["boxes", "(x0, y0"]),
        (lambda: diffattn.BoundedAttention(boxes=((0, 0, 1, 1),), subject_tokens=((1.5,),)), ["subject_tokens[0]"]),
        (lambda: diffattn.BoundedAttention(boxes=((0, 0, 1, 1),), subject_tokens=((1,),), eos_token=math.inf), ["eos"]),
        (lambda: diffattn.BoundedAttention(boxes=((0, 0, 1, 1),), subject_tokens=((1,),), mask_eos="no"), ["mask_eos"]),
    ],
)
def test_bad_method_parameters_name_the_parameter_the_value_and_the_fix(make, says):
    with pytest.raises((TypeError, ValueError)) as info:
        make()
    message = str(info.value)
    for part in says:
        assert part in message, f"{part!r} missing from: {message}"


def causal(q_idx, kv_idx, ctx):
    return q_idx >= kv_idx


def test_entropy_scaling_refuses_cross_attention_its_base_cannot_take():
    """A sparse base raised a LayoutError at the first cross-attention call; the constructor now says it."""
    with pytest.raises(ValueError, match="roles include 'cross', but base SlidingTileAttention"):
        diffattn.EntropyScaling(token_ratio=2.0, base=diffattn.SlidingTileAttention(), roles={"self", "cross"})
    diffattn.EntropyScaling(token_ratio=2.0, roles={"self", "cross"})  # Dense takes cross-attention


def test_valid_parameters_are_kept_as_given():
    assert diffattn.SlidingTileAttention(tile=[2, 4], window=3).tile == (2, 4)
    assert diffattn.SlidingTileAttention(tile=4).tile == 4
    assert diffattn.ShiftedWindowAttention(shift=0.25, seed=3).shift == 0.25
    assert diffattn.Rettention(ratio_drift=0.04).ratio_drift == 0.04


@pytest.mark.parametrize(
    "method",
    [
        diffattn.PAG(heads={"blocks.0": (0, 1)}, steps=(0.0, 0.5)),
        diffattn.PAG(heads=(1, 2), layers="blocks.1"),
        diffattn.SEG(),
        diffattn.SlidingTileAttention(tile=(1, 2, 2), window=(1, 1, 1)),
        diffattn.PromptToPrompt(reweight=((2, 1.5),)),
        diffattn.LocalBlend(words="circle"),
        diffattn.MutualSelfAttention(mask_words=("circle", "square")),
    ],
    ids=lambda m: type(m).__name__,
)
def test_replace_takes_back_what_the_constructor_stored(method):
    """dataclasses.replace passes the stored (normalised) fields back to the constructor: it must accept them."""
    import dataclasses

    assert dataclasses.replace(method) == method
