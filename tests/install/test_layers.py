"""Imports point one way: demo -> bench -> library -> kernels. A module may import its own room and the rooms below
it, never one above (the library never imports the bench, the kernels never import diffattn or diffusers). Lazy
imports inside functions count too: they are found by walking every import statement of every file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# lowest first: each room may import the rooms before it
LAYERS = ("diffattn_kernels", "diffattn", "diffattn_bench", "diffattn_demo")
FOLDERS = {
    "diffattn_kernels": ROOT / "kernels" / "src" / "diffattn_kernels",
    "diffattn": ROOT / "diffattn",
    "diffattn_bench": ROOT / "pipelines" / "diffattn_bench",
    "diffattn_demo": ROOT / "demo" / "diffattn_demo",
}
FORBIDDEN_BELOW = {"diffattn_kernels": {"diffusers"}}  # third-party imports a room must not make


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``; relative imports stay in the file's own room."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def upward_imports(folders: dict[str, Path]) -> list[str]:
    """Every import against the direction of :data:`LAYERS`, as ``file:line imports module``."""
    rank = {name: index for index, name in enumerate(LAYERS)}
    wrong = []
    for room, folder in folders.items():
        for path in sorted(folder.rglob("*.py")):
            for line, module in _imported_modules(path):
                top = module.split(".")[0]
                if (top in rank and rank[top] > rank[room]) or top in FORBIDDEN_BELOW.get(room, ()):
                    wrong.append(f"{path.relative_to(folder.parent)}:{line} imports {module} (room {room})")
    return wrong


def test_imports_point_one_way() -> None:
    wrong = upward_imports(FOLDERS)
    assert not wrong, "imports against demo -> bench -> library -> kernels:\n" + "\n".join(wrong)


def test_every_room_exists_with_its_package() -> None:
    for room, folder in FOLDERS.items():
        assert (folder / "__init__.py").is_file(), f"{room}: {folder} is not a package"


@pytest.mark.parametrize(
    ("room", "module"),
    [
        ("diffattn", "diffattn_bench.compare"),
        ("diffattn_kernels", "diffattn"),
        ("diffattn_kernels", "diffusers.hooks"),
        ("diffattn_bench", "diffattn_demo"),
    ],
)
def test_an_upward_import_is_caught(tmp_path: Path, room: str, module: str) -> None:
    """The checker itself: a lazy upward import written into a room is reported."""
    folder = tmp_path / room
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(f"def f():\n    import {module}\n")
    assert upward_imports({room: folder}) == [f"{room}/__init__.py:2 imports {module} (room {room})"]
