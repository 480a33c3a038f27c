"""``import diffattn`` is light (its names load when first used), so the ``diffattn`` command parses its arguments
and the demo serves its page before torch and diffusers are imported; every exported name still resolves."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import types

import diffattn

HEAVY = ("torch", "diffusers", "transformers")


def _fresh(code: str) -> dict:
    """Run ``code`` in a new interpreter (this one has torch imported) and read the JSON it prints last."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_diffattn_and_the_command_parser_load_neither_torch_nor_diffusers():
    loaded = _fresh(
        "import json, sys, diffattn\n"
        "from diffattn.cli import build_parser\n"
        "build_parser()\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    assert loaded == []


def test_the_demo_builds_its_page_for_the_default_model_before_importing_torch(tmp_path):
    """The page is served while the image model loads: building it reads the model's declared structure only."""
    loaded = _fresh(
        "import json, sys\n"
        "from diffattn_demo import app\n"
        "temp = app.prepare_environment()\n"
        "app.build_app(app.Models(), temp)\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    assert loaded == []


def test_every_exported_name_resolves_to_its_module_and_submodules_stay_reachable():
    for name in diffattn.__all__:
        value = getattr(diffattn, name)
        assert value is not None and name in dir(diffattn)
    assert isinstance(diffattn.editing, types.ModuleType) and diffattn.editing.__name__ == "diffattn.editing"
    importlib.import_module("diffattn.attention_processors")  # the module behind diffattn.processors

    assert callable(diffattn.processors) and diffattn.processors.__module__ == "diffattn.attention_processors"
    assert diffattn.Dense.__module__.startswith("diffattn.methods")
    assert isinstance(diffattn.testing, types.ModuleType)  # a submodule, as an eager package has it
    try:
        diffattn.no_such_name  # noqa: B018
    except AttributeError as error:
        assert "no attribute 'no_such_name'" in str(error)
    else:
        raise AssertionError("an unknown name resolved")
