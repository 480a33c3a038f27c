"""Where and when a method acts: layer selection by module name, step selection over the denoising schedule."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Union

from .errors import LayerSelectionError

__all__ = ["select_layers", "StepSchedule"]

LayerSpec = Union[str, Sequence[str], None]
StepSpec = Union[int, float, range, Iterable[int], "StepSchedule", None]


def _component_regex(pattern: str) -> re.Pattern[str]:
    """A pattern matches whole dot-separated components: ``blocks.1`` matches ``blocks.1.attn1`` only, never
    ``blocks.10.attn1`` nor ``transformer_blocks.1.attn``."""
    try:
        return re.compile(rf"(?:^|\.)(?:{pattern})(?:\.|$)")
    except re.error as exc:
        raise LayerSelectionError(f"layers pattern {pattern!r} is not a valid regular expression: {exc}") from exc


def _preview(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


def select_layers(spec: LayerSpec, names: Sequence[str]) -> list[str]:
    """Names (in model order) matched by ``spec``; ``None`` selects all. Every pattern must match something."""
    if spec is None:
        return list(names)
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if not patterns:
        raise LayerSelectionError("layers=[] selects nothing; pass None for all layers or at least one pattern")
    chosen: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise LayerSelectionError(f"layers must be regex strings over module names, got {pattern!r}")
        regex = _component_regex(pattern)
        hits = [n for n in names if regex.search(n)]
        if not hits:
            raise LayerSelectionError(
                f"layers pattern {pattern!r} matches no attention layer. Patterns match whole dot-separated parts "
                f"of module names (e.g. 'transformer_blocks.1' or 'attn1'). Valid names: {_preview(list(names))}"
            )
        chosen.update(hits)
    return [n for n in names if n in chosen]


@dataclass(frozen=True)
class StepSchedule:
    """Denoising steps on which a method acts (0 = first, noisiest step); other steps stay dense.

    Build it with :meth:`parse`: ``None`` = every step; an int, a ``range`` or an iterable of ints = those steps;
    a float ``f`` in ``[0, 1)`` = dense warm-up over the first ``ceil(f * num_steps)`` steps, the method after.
    """

    indices: frozenset[int] | None = None
    warmup_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.indices is not None and self.warmup_fraction is not None:
            raise LayerSelectionError("StepSchedule takes either step indices or a warm-up fraction, not both")
        if self.indices is not None and any(i < 0 for i in self.indices):
            raise LayerSelectionError(f"step indices must be >= 0, got {sorted(self.indices)}")
        if self.warmup_fraction is not None and not 0.0 <= self.warmup_fraction < 1.0:
            raise LayerSelectionError(
                f"a warm-up fraction must be in [0, 1), got {self.warmup_fraction}; e.g. steps=0.25 keeps the first "
                "quarter of the schedule dense"
            )

    @classmethod
    def parse(cls, spec: StepSpec) -> StepSchedule:
        if spec is None:
            return cls()
        if isinstance(spec, StepSchedule):
            return spec
        if isinstance(spec, bool):
            raise LayerSelectionError("steps must be None, an int, a range, a list of ints or a float fraction")
        if isinstance(spec, float):
            return cls(warmup_fraction=spec)
        if isinstance(spec, int):
            return cls(indices=frozenset({spec}))
        try:
            indices = frozenset(spec)
        except TypeError:
            raise LayerSelectionError(
                f"steps={spec!r} is not understood; pass None, an int, a range, a list of ints or a float fraction"
            ) from None
        if not indices or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
            raise LayerSelectionError(f"steps must be a non-empty collection of ints, got {spec!r}")
        return cls(indices=indices)

    @property
    def needs_num_steps(self) -> bool:
        return self.warmup_fraction is not None

    def first_active(self, num_steps: int) -> int:
        return math.ceil((self.warmup_fraction or 0.0) * num_steps - 1e-9)

    def is_active(self, step: int, num_steps: int | None) -> bool:
        if self.indices is not None:
            return step in self.indices
        if self.warmup_fraction is None:
            return True
        if num_steps is None:
            raise LayerSelectionError(
                "steps was given as a fraction of the schedule but the schedule length is unknown: apply diffattn to "
                "the pipeline (not only its model), or pass num_steps= to diffattn.apply"
            )
        return step >= self.first_active(num_steps)
