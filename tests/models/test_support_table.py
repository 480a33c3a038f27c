"""The README's "Supported models" block is what the code generates (python -m diffattn.testing.support_table
--write README.md), and every class of diffusers is either supported (in the zoo) or refused with a reason, or
named here as not reached yet."""

from __future__ import annotations

from pathlib import Path

import diffattn
from diffattn.adapters import refused_models, supported_models
from diffattn.testing.support_table import END, START, readme_block
from diffattn.testing.zoo import zoo_cases

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_support_block_is_generated_from_the_code():
    text = README.read_text()
    start, end = text.index(START), text.index(END) + len(END)
    assert text[start:end] == readme_block(), "regenerate: python -m diffattn.testing.support_table --write README.md"


def test_every_registered_adapter_has_a_zoo_case_and_a_grid_source():
    zoo = {case.model_class for case in zoo_cases()}
    assert set(supported_models()) <= zoo, sorted(set(supported_models()) - zoo)
    for name in supported_models():
        adapter = diffattn.adapters.registry._ADAPTERS[name]
        assert adapter.grid_source != "the model's inputs", f"{name}: its grid reader has no docstring"


def test_supported_and_refused_are_disjoint():
    assert not set(supported_models()) & set(refused_models())
