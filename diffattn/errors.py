"""Errors raised by diffattn. Each message says what was wrong and how to fix it."""

from __future__ import annotations

__all__ = [
    "DiffattnError",
    "UnsupportedModelError",
    "LayerSelectionError",
    "InterceptionError",
    "LayoutError",
    "ContextParallelError",
    "MethodConfigError",
    "StepSelectionError",
    "NonFiniteInputError",
]


class DiffattnError(Exception):
    """Base class of diffattn's errors."""


class UnsupportedModelError(DiffattnError, TypeError):
    """The model (or pipeline) has no diffattn adapter."""


class LayerSelectionError(DiffattnError, ValueError):
    """A ``layers=`` or ``steps=`` request selects nothing or is malformed."""


class InterceptionError(DiffattnError, RuntimeError):
    """A processor's attention call could not be intercepted, so the method would have had no effect."""


class LayoutError(DiffattnError, ValueError):
    """The attention call's sequence does not match the token layout derived from the model inputs."""


class ContextParallelError(DiffattnError, ValueError):
    """The model's context parallelism is a mode or split diffattn cannot run a method under (see diffattn.parallel)."""


class MethodConfigError(DiffattnError, ValueError):
    """A method's parameters do not fit a selected layer's token grid (raised when the grid is first known)."""


class StepSelectionError(LayerSelectionError):
    """A ``steps=`` selection acts on no step that the pipeline will run."""


class NonFiniteInputError(DiffattnError, FloatingPointError):
    """A method that cannot propagate NaN / Inf the way dense attention does met them in q, k or v (it says so)."""
