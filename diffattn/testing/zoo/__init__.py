"""The model zoo: one tiny instance of every diffusers denoiser class diffattn supports, and of every class it refuses.

Each module of this package (one per family) lists ``CASES``: :class:`ZooCase` entries, each a diffusers model class
built tiny from a config the way diffusers' own model tests build it (seeded random weights, nothing downloaded),
forward inputs on an odd, non-square grid (odd-length for video), and the visual token grid those inputs give,
counted by hand. ``tests/models/test_zoo.py`` runs every case: ``Dense`` is bitwise the stock output, a masked method
changes it and ``remove()`` restores it exactly, and the grid the runtime reads equals the hand-counted one. Refused
classes are ``Refusal`` entries: building them and calling ``diffattn.apply`` must raise ``UnsupportedModelError``
with the reason.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ZooCase", "Refusal", "zoo_cases", "zoo_refusals", "seeded"]


@dataclass(frozen=True)
class ZooCase:
    """``model_class`` built by ``build()``, called as ``model(**inputs())``, whose visual token grid is ``grid``.

    ``name`` tells cases of one class apart (default: the class name). ``text_len``: text tokens the inputs carry
    (``None``: no text). ``pipeline``: the name of a tiny pipeline kind that wraps this model, if any."""

    model_class: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict[str, Any]]
    grid: tuple[int, ...]
    text_len: int | None = None
    name: str = ""

    @property
    def id(self) -> str:
        return self.name or self.model_class


@dataclass(frozen=True)
class Refusal:
    """A model class diffattn refuses: ``build()`` makes a tiny one (``None``: not buildable here) and ``reason`` is
    a regular expression the ``UnsupportedModelError`` message matches."""

    model_class: str
    build: Callable[[], torch.nn.Module] | None
    reason: str


def seeded(build: Callable[[], torch.nn.Module], seed: int = 0) -> Callable[[], torch.nn.Module]:
    """``build`` run with torch's RNG seeded, in eval mode."""

    def make() -> torch.nn.Module:
        torch.manual_seed(seed)
        return build().eval()

    return make


def _modules() -> list[Any]:
    return [
        importlib.import_module(f"{__name__}.{info.name}")
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name)
    ]


def zoo_cases() -> list[ZooCase]:
    """Every case of every family module, in family order."""
    return [case for module in _modules() for case in getattr(module, "CASES", ())]


def zoo_refusals() -> list[Refusal]:
    return [refusal for module in _modules() for refusal in getattr(module, "REFUSALS", ())]
