"""Shared by the demo tests: the demo's logic module, imported as the app imports it, so the tests and a server
started in-process share one module."""

from __future__ import annotations


def load_logic():
    from diffattn_demo import logic

    return logic
