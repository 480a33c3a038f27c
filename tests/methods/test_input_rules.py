"""The rules for ``steps=`` and ``layers=`` and for method parameters: each form means one documented thing, and
anything else fails at the call with an error that says what was wrong and how to write it (issue #26, items 3-4)."""

from __future__ import annotations

import math

import pytest

import diffattn
from diffattn import LayerSelectionError, StepSchedule, StepSelectionError
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
