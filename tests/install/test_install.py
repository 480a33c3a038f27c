"""A fresh machine gets a working install: nothing at the repository root shadows a dependency, every runtime import
is declared, and from the repository root (where ``python -m`` puts the working directory first on ``sys.path``)
every supported diffusers model class imports and both embedded pipelines load."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from diffattn.adapters import supported_models

ROOT = Path(__file__).resolve().parents[2]
# each room of installed code: its folder, the pyproject that declares it, and the extras its imports may use
ROOMS = {
    "kernels": (ROOT / "kernels" / "src" / "diffattn_kernels", ROOT / "kernels" / "pyproject.toml", ()),
    "library": (ROOT / "diffattn", ROOT / "pyproject.toml", ()),
    "bench": (ROOT / "pipelines" / "diffattn_bench", ROOT / "pyproject.toml", ("bench",)),
    "demo": (ROOT / "demo" / "diffattn_demo", ROOT / "pyproject.toml", ("bench", "demo")),
}
OURS = {"diffattn", "diffattn_kernels", "diffattn_bench", "diffattn_demo"}

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None


def _project(path: Path = ROOT / "pyproject.toml") -> dict:
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11+")
    return tomllib.loads(path.read_text())["project"]


def _name(requirement: str) -> str:
    """The normalised distribution name of a PEP 508 requirement string."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)).lower()


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _regular_root_names() -> set[str]:
    """Names that ``import X`` resolves to a regular package or module at the repository root. A folder without
    ``__init__.py`` (like ``kernels/``) is at most a namespace portion, which an installed package of the same
    name wins over (and which diffusers' availability checks reject, having no distribution metadata)."""
    names = set()
    for entry in ROOT.iterdir():
        if entry.is_dir() and (entry / "__init__.py").is_file():
            names.add(entry.name)
        elif entry.suffix == ".py":
            names.add(entry.stem)
    return names


def test_no_root_package_is_a_dependency_name() -> None:
    """No root package or module shares its import name with an installed distribution (Hugging Face's
    ``kernels`` is the one that bit: a root ``kernels/__init__.py`` broke every diffusers model import)."""
    provided = metadata.packages_distributions()
    clashes = {name: provided[name] for name in _regular_root_names() - OURS if name in provided}
    assert not clashes, (
        f"repository-root packages {sorted(clashes)} have the import names of installed distributions {clashes}; "
        "move the Python package below a folder that only resolves as diffattn.<name> (see README, layout)"
    )
    assert _regular_root_names() <= {"diffattn"}, _regular_root_names()
    assert not (ROOT / "kernels" / "__init__.py").exists()


def _third_party_imports(folders: list[Path]) -> dict[str, set[str]]:
    """Top-level module name -> files that import it, for every absolute import in ``folders``."""
    stdlib = set(sys.stdlib_module_names)
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                elif (
                    isinstance(node, ast.Call)
                    and getattr(node.func, "attr", None) == "importorskip"
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                ):
                    modules = [node.args[0].value]  # a test that skips silently when its import is missing
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top not in stdlib and top not in OURS and top != "__future__":
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def _declared(project: dict, extras: tuple[str, ...]) -> set[str]:
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    return {_name(r) for r in requirements}


# imports that are optional by design: guarded where they are used, with the extra (or reason) that provides them
OPTIONAL = {
    "triton": "gpu extra / bootstrap (CPU interpreter tests)",
    "natten": "bootstrap (compared against in tests and benchmarks)",
    "xformers": "gpu extra",
    "flash_attn": "GPU only, not on PyPI as a wheel for CPU",
    "flash_attn_interface": "GPU only (FlashAttention 3)",
}


@pytest.mark.parametrize("room", list(ROOMS))
def test_every_runtime_import_is_declared(room: str) -> None:
    """Each third-party module a room imports comes from a distribution its pyproject declares (the library's
    ``dependencies``, plus the bench's or demo's extra for those rooms), or is an optional, guarded import listed in
    OPTIONAL. Removing e.g. ``tomesd`` from the bench extra fails here; so does a library import of matplotlib."""
    folder, pyproject, extras = ROOMS[room]
    project = _project(pyproject)
    declared = _declared(project, extras)
    provided = metadata.packages_distributions()
    missing = {}
    for module, files in _third_party_imports([folder]).items():
        if module in OPTIONAL:
            continue
        dists = {_normalise(d) for d in provided.get(module, [])}
        if not dists & declared:
            missing[module] = (sorted(dists) or ["<not installed>"], sorted(files)[:3])
    assert not missing, f"{room}: imported but not declared in {pyproject.relative_to(ROOT)}: {missing}"
    if "bench" in extras:
        # accelerate is never imported by name: diffusers needs it to load models with keep_in_fp32_modules (Wan)
        assert "accelerate" in _declared(project, ("bench",))


def test_every_test_import_is_declared() -> None:
    project = _project()
    declared = _declared(project, ("test", "bench", "demo")) | _declared(
        _project(ROOT / "kernels" / "pyproject.toml"), ()
    )
    provided = metadata.packages_distributions()
    local = {p.stem for p in (ROOT / "tests").rglob("*.py")} | {p.stem for p in (ROOT / "scripts").glob("*.py")}
    missing = {}
    for module in _third_party_imports([ROOT / "tests"]):
        if module in OPTIONAL or module in local:
            continue
        dists = {_normalise(d) for d in provided.get(module, [])}
        if not dists & declared:
            missing[module] = sorted(dists) or ["<not installed>"]
    assert not missing, f"tests import undeclared modules (add them to the test extra): {missing}"


def test_constraints_pin_every_installed_distribution() -> None:
    """constraints.txt is the verified set: every declared dependency and test extra is pinned there exactly."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[_normalise(name)] = version
    project = _project()
    unpinned = (
        (_declared(project, ("test", "bench", "demo")) | _declared(_project(ROOT / "kernels" / "pyproject.toml"), ()))
        - set(pins)
        - {"torch", "diffattn", "diffattn-kernels"}
    )  # torch: pinned by bootstrap.sh, kept on GPUs
    assert not unpinned, f"declared but not pinned in constraints.txt: {sorted(unpinned)}"


_FROM_ROOT = """
import importlib, json, sys
import diffusers
names = json.loads(sys.argv[1])
for name in names:
    getattr(diffusers, name)
from diffattn_bench import embedded
image = embedded.load_image_pipeline()
video = embedded.load_video_pipeline()
print(json.dumps({"kernels": importlib.import_module("kernels").__file__,
                  "image": type(image).__name__, "video": type(video).__name__}))
"""


def test_model_classes_and_embedded_pipelines_import_from_repository_root() -> None:
    """In a subprocess whose working directory is the repository root (as ``python -m pytest`` and
    ``python -c`` run), with Hugging Face's ``kernels`` installed."""
    assert "kernels" in metadata.packages_distributions(), "Hugging Face's kernels (the test extra) is not installed"
    result = subprocess.run(
        [sys.executable, "-c", _FROM_ROOT, json.dumps(supported_models())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert not Path(loaded["kernels"]).resolve().is_relative_to(ROOT / "kernels"), loaded["kernels"]
    assert loaded["image"] == "StableDiffusionPipeline"
    assert loaded["video"] == "ShapesVideoPipeline"
