"""The names of diffattn's own rows in ``diffattn compare`` (``compare.default_methods`` builds them in this order),
in a module of their own so that a page listing them (the demo's Speed tab) needs neither torch nor diffattn."""

from __future__ import annotations

__all__ = ["METHOD_NAMES"]

METHOD_NAMES = (
    "sliding tile",
    "radial",
    "sliding window",
    "dynamic top-k",
    "pyramid (PSA)",
    "re-ttention",
    "ToDo 2x",
)
