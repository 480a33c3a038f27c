"""Shared by the demo tests: demo/logic.py loaded by path (demo/ is not a package) under the name demo/app.py uses,
so the tests and a server started in-process share one module."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_logic():
    name = "diffattn_demo_logic"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "demo" / "logic.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
