"""The ``diffattn`` command's own arguments: ``diffattn example`` refuses steps and sizes it cannot run, with a message
saying what is allowed and exit status 2, before any work."""

from __future__ import annotations

import pytest

from diffattn.cli import build_parser, main


def _no_work(*args, **kwargs):
    raise AssertionError("diffattn example started work on arguments it should have refused")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--steps", "0"], "argument --steps: expected a whole number >= 2"),
        (["--steps", "1"], "argument --steps: expected a whole number >= 2"),
        (["--steps", "-3"], "argument --steps: expected a whole number >= 2"),
        (["--steps", "2.5"], "argument --steps: expected a whole number >= 2"),
        (["--size", "7", "--steps", "2"], "argument --size: expected a multiple of 16 >= 16 (pixels), got '7'"),
        (["--size", "0"], "argument --size: expected a multiple of 16 >= 16"),
        (["--size", "-16"], "argument --size: expected a multiple of 16 >= 16"),
        (["--size", "40"], "argument --size: expected a multiple of 16 >= 16"),
    ],
)
def test_example_refuses_steps_below_2_and_sizes_not_multiples_of_16(argv, message, capsys, monkeypatch):
    monkeypatch.setattr("diffattn.testing.tiny_pipeline", _no_work)
    with pytest.raises(SystemExit) as exited:
        main(["example", *argv])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_example_accepts_what_its_help_allows():
    args = build_parser().parse_args(["example"])
    assert (args.steps, args.size) == (4, 64)
    args = build_parser().parse_args(["example", "--steps", "2", "--size", "16"])
    assert (args.steps, args.size) == (2, 16)
