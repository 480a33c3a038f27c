"""Checks of method parameters at construction, shared by the methods' ``__post_init__``.

Each raises at the constructor call, before anything is applied, with a message that names the method and the
parameter, shows what was given (value and type) and how to write it: ``TypeError`` for a value of the wrong type,
``ValueError`` for one out of range. Bools are never taken for numbers (``True`` is not a tile size).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from typing import Any

from ..context import ROLES
from .base import check_roles

__all__ = [
    "given",
    "check_roles_arg",
    "check_int",
    "check_block_size",
    "check_optional_int",
    "check_number",
    "check_bool",
    "check_str",
    "check_per_axis",
    "check_int_tuple",
]


def given(value: Any, limit: int = 80) -> str:
    """``value`` as an error message shows it: its repr (shortened) and its type."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"{text} ({type(value).__name__})"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_roles_arg(roles: Any, owner: str, allowed: frozenset[str] = ROLES) -> frozenset[str]:
    """``roles`` as :func:`~diffattn.methods.base.check_roles` takes it, after checking it is a collection of role
    names (a string, a tensor or a number is not)."""
    if (
        isinstance(roles, (str, bytes))
        or not isinstance(roles, (AbstractSet, list, tuple))
        or not all(isinstance(r, str) for r in roles)
    ):
        example = "{" + ", ".join(repr(r) for r in sorted(allowed)) + "}"
        raise TypeError(
            f"{owner}: roles is a set of role names out of {sorted(allowed)}, got {given(roles)}; e.g. roles={example}"
        )
    return check_roles(roles, owner, allowed)


def check_int(
    owner: str,
    name: str,
    value: Any,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    example: Any = None,
    meaning: str = "",
) -> int:
    """An int (not a bool) in ``[minimum, maximum]``. ``meaning`` (e.g. ``"a number of steps"``) goes into the
    message."""
    example = example if example is not None else (minimum if minimum is not None else 0)
    bounds = " and ".join(
        b for b in (f">= {minimum}" if minimum is not None else "", f"<= {maximum}" if maximum is not None else "") if b
    )
    what = f"{meaning + ', ' if meaning else ''}an int{' ' + bounds if bounds else ''}"
    if not _is_int(value):
        hint = f"{name}={int(value)}" if _is_real(value) and math.isfinite(value) and value == int(value) else None
        raise TypeError(f"{owner}: {name} must be {what}, got {given(value)}; write e.g. {hint or f'{name}={example}'}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{owner}: {name} must be {what}, got {value}; e.g. {name}={example}")
    return int(value)


#: Largest kernel block taken (tokens): blocks are 64 or 128 in practice; a block far beyond any sequence would only
#: allocate padding.
MAX_BLOCK_SIZE = 1 << 16


def check_block_size(owner: str, value: Any) -> int:
    return check_int(
        owner, "block_size", value, minimum=1, maximum=MAX_BLOCK_SIZE, example=128, meaning="tokens per kernel block"
    )


def check_optional_int(
    owner: str, name: str, value: Any, *, minimum: int | None = None, example: Any = None, meaning: str = ""
) -> int | None:
    """``None`` or :func:`check_int`."""
    if value is None:
        return None
    return check_int(owner, name, value, minimum=minimum, example=example, meaning=meaning)


def check_number(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
    example: Any,
    meaning: str = "",
) -> float:
    """A real number (int or float, not a bool, not NaN; infinite only with ``allow_inf``) in the given range, as a
    float. ``meaning`` (e.g. ``"a cosine similarity"``) goes into the message."""
    lo = "" if low is None else f"{low} {'<' if low_open else '<='} "
    hi = "" if high is None else f" {'<' if high_open else '<='} {high}"
    bounds = f" with {lo}{name}{hi}" if lo or hi else ""
    what = f"{meaning + ', ' if meaning else ''}a {'' if allow_inf else 'finite '}number{bounds}"
    if not _is_real(value):
        raise TypeError(f"{owner}: {name} must be {what}, got {given(value)}; e.g. {name}={example}")
    v = float(value)
    bad = (
        math.isnan(v)
        or (math.isinf(v) and not allow_inf)
        or (low is not None and (v <= low if low_open else v < low))
        or (high is not None and (v >= high if high_open else v > high))
    )
    if bad:
        raise ValueError(f"{owner}: {name} must be {what}, got {value!r}; e.g. {name}={example}")
    return v


def check_bool(owner: str, name: str, value: Any, meaning: str = "") -> bool:
    if not isinstance(value, bool):
        raise TypeError(
            f"{owner}: {name} must be True or False{' (' + meaning + ')' if meaning else ''}, got {given(value)}"
        )
    return value


def check_str(owner: str, name: str, value: Any, *, choices: Iterable[str] | None = None, example: str = "") -> str:
    """A string, one of ``choices`` if given."""
    options = tuple(choices) if choices is not None else None
    if not isinstance(value, str) or (options is not None and value not in options):
        which = f"one of {list(options)}" if options is not None else "a string"
        hint = f"; e.g. {name}={example!r}" if example else ""
        raise (ValueError if isinstance(value, str) else TypeError)(
            f"{owner}: {name} must be {which}, got {given(value)}{hint}"
        )
    return value


def _int_hint(value: Any) -> Any:
    """``value`` with integral floats written as ints (4.0 -> 4, (2.0, 4.0) -> (2, 4)), else ``None``."""

    def one(v: Any) -> int | None:
        return int(v) if _is_real(v) and math.isfinite(v) and v == int(v) and v >= 1 else None

    if isinstance(value, (tuple, list)):
        ints = tuple(one(v) for v in value)
        return ints if ints and all(i is not None for i in ints) else None
    return one(value)


def check_per_axis(owner: str, name: str, value: Any, *, example: tuple[int, ...]) -> int | tuple[int, ...]:
    """A positive int (every grid axis) or a non-empty tuple / list of positive ints (one per axis), returned as an
    int or a tuple."""
    if _is_int(value) and value >= 1:
        return int(value)
    if isinstance(value, (tuple, list)) and value and all(_is_int(v) and v >= 1 for v in value):
        return tuple(int(v) for v in value)
    hint = _int_hint(value)
    fix = f"{name}={hint!r}" if hint is not None else f"{name}={example[-1]} or {name}={example!r}"
    positive = _is_int(value) or (isinstance(value, (tuple, list)) and all(_is_int(v) for v in value) and value)
    raise (ValueError if positive else TypeError)(
        f"{owner}: {name} must be a positive int or a tuple of positive ints (one per grid axis), got "
        f"{given(value)}; write {fix}"
    )


def check_int_tuple(owner: str, name: str, value: Any, *, minimum: int = 0, example: Any) -> tuple[int, ...]:
    """A collection of ints ``>= minimum`` (tuple, list, range, array; possibly empty), as a tuple."""
    try:
        items = None if isinstance(value, (str, bytes, dict)) else list(value)
    except TypeError:
        items = None
    if items is None or not all(_is_int(v) for v in items):
        raise TypeError(f"{owner}: {name} must be a tuple of ints, got {given(value)}; e.g. {name}={example!r}")
    if any(v < minimum for v in items):
        raise ValueError(f"{owner}: {name} must hold ints >= {minimum}, got {tuple(items)}; e.g. {name}={example!r}")
    return tuple(int(v) for v in items)


#: The dtypes a method may compute attention in (``compute_dtype=``).
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


def check_compute_dtype(owner: str, value: Any) -> None:
    """``compute_dtype`` is ``None`` (the call's dtype) or one of :data:`COMPUTE_DTYPES` as a ``torch.dtype``."""
    import torch

    if value is None or (isinstance(value, torch.dtype) and str(value).removeprefix("torch.") in COMPUTE_DTYPES):
        return
    raise ValueError(
        f"{owner}: compute_dtype is None (compute in the call's dtype) or one of torch.bfloat16, torch.float16, "
        f"torch.float32, got {given(value)}; e.g. compute_dtype=torch.bfloat16"
    )
