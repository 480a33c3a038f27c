"""A non-editable install works: the two distributions of the repository (``kernels/`` and the root) are built as
wheels and installed into a new virtual environment, which runs from a folder outside the checkout (nothing of the
checkout on ``sys.path``). Its third-party packages come from this environment's site-packages, appended to
``sys.path`` by a ``.pth`` line: that line does not run this environment's own ``.pth`` files, so its editable
installs stay invisible, and what the test runs is the installed copy.

- ``diffattn example`` runs, ``diffattn compare --quick`` runs (the bench extra, assets shipped in the wheel) and
  ``diffattn demo`` starts and answers on loopback (the demo extra).
- With matplotlib, tomesd and gradio made unimportable (the library without its extras), ``import diffattn``
  applies a method to a tiny pipeline, and ``diffattn compare`` / ``diffattn demo`` say which extra to install.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROOMS = ("diffattn", "diffattn_kernels", "diffattn_bench", "diffattn_demo")
_NOT_SOURCES = (".git", ".venv*", "build", "*.egg-info", "outputs", "__pycache__", ".pytest_cache", ".hypothesis")

# In the environment without extras: the path finder answers "not found" for these, as if never installed.
_BLOCKER = """
import sys
from importlib.machinery import PathFinder
BLOCKED = {"matplotlib", "tomesd", "gradio"}  # tqdm: diffusers itself needs it
class _Hiding(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split(".")[0] in BLOCKED else PathFinder.find_spec(name, path, target)
sys.meta_path[:] = [_Hiding if finder is PathFinder else finder for finder in sys.meta_path]
"""

_LIBRARY_ONLY = """
import importlib.util, json, numpy as np, torch
import diffattn
from diffattn.testing import tiny_pipeline
assert importlib.util.find_spec("matplotlib") is None and importlib.util.find_spec("gradio") is None
pipe = tiny_pipeline("sd", seed=0)
def run():
    out = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0))
    return np.asarray(out.images)
stock = run()
with diffattn.apply(pipe, diffattn.SlidingWindowAttention(window=1)) as handle:
    sparse = run()
    acted = handle.acted()
print(json.dumps({"file": diffattn.__file__, "acted": len(acted), "changed": float(np.abs(sparse - stock).max())}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A new virtual environment with the two wheels installed (not editable)."""
    base = tmp_path_factory.mktemp("wheel-install")
    # built from a copy: setuptools leaves build/ and *.egg-info beside the sources, and a stale build/ would ship
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*_NOT_SOURCES))
    wheels = base / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(wheels)]
        + [str(source / "kernels"), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=base,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    env_dir = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "outer_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", "--quiet"]
        + sorted(str(w) for w in wheels.glob("*.whl")),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=base,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    blocked = base / "blocked"
    blocked.mkdir()
    (blocked / "sitecustomize.py").write_text(_BLOCKER)
    return {"python": python, "bin": env_dir / "bin", "site": site, "cwd": base, "blocked": blocked}


def _run(installed: dict[str, Path], args: list[str], *, blocked: bool = False, timeout: float = 600):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{installed['bin']}{os.pathsep}{env.get('PATH', '')}"
    if blocked:
        env["PYTHONPATH"] = str(installed["blocked"])
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=installed["cwd"], env=env)


def test_packages_come_from_the_installed_copy(installed: dict[str, Path]) -> None:
    code = f"import importlib, json; print(json.dumps({{n: importlib.import_module(n).__file__ for n in {ROOMS!r}}}))"
    result = _run(installed, [str(installed["python"]), "-c", code])
    assert result.returncode == 0, result.stderr[-3000:]
    files = json.loads(result.stdout.strip().splitlines()[-1])
    for name, file in files.items():
        assert Path(file).resolve().is_relative_to(installed["site"].resolve()), f"{name} imported from {file}"
    assets = installed["site"] / "diffattn_bench" / "assets"
    assert (assets / "shapes-image" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (installed["site"] / "diffattn_kernels" / "csrc" / "block_sparse_cpu.cpp").is_file()


def test_example_runs(installed: dict[str, Path]) -> None:
    result = _run(installed, [str(installed["bin"] / "diffattn"), "example", "--steps", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Masked 3x3 window" in result.stdout


@pytest.mark.slow
def test_compare_quick_runs(installed: dict[str, Path]) -> None:
    out = installed["cwd"] / "compare-out"
    # one method beside the two dense rows: the installed package's whole job runs (models, scoring, plots, the
    # compiled CPU loop); every row runs in CI's main job (`diffattn compare --quick`). "--only 'sliding tile'" also
    # matched NATTEN's and compiled FlexAttention's rows, whose first calls compile (52 s of 56 on a 2-core AMD EPYC)
    command = ["compare", "--quick", "--no-image", "--only", "dynamic top-k", "--out", str(out)]
    result = _run(installed, [str(installed["bin"] / "diffattn"), *command])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trajectory error" in result.stdout.lower() or "Trajectory error" in result.stdout
    assert (out / "compare.json").is_file()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_demo_starts(installed: dict[str, Path]) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    process = subprocess.Popen(
        [str(installed["bin"] / "diffattn"), "demo", "--port", str(port)],
        cwd=installed["cwd"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert process.poll() is None, f"diffattn demo exited:\n{process.stdout.read()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as response:
                    config = json.loads(response.read())
                break
            except OSError:
                time.sleep(2)
        else:
            pytest.fail("diffattn demo did not answer within 300 s")
        assert config["components"], "the demo's page has no components"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def test_library_works_without_the_extras(installed: dict[str, Path]) -> None:
    result = _run(installed, [str(installed["python"]), "-c", _LIBRARY_ONLY], blocked=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).resolve().is_relative_to(installed["site"].resolve())
    assert report["acted"] > 0 and report["changed"] > 0, report


@pytest.mark.parametrize(("command", "extra"), [("compare", "bench"), ("demo", "demo")])
def test_a_command_without_its_extra_names_it(installed: dict[str, Path], command: str, extra: str) -> None:
    result = _run(installed, [str(installed["bin"] / "diffattn"), command], blocked=True)
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    assert f"'{extra}' extra" in result.stderr and f".[{extra}]" in result.stderr, result.stderr[-2000:]
