"""Where and when a method acts: layer selection by module name, step selection over the denoising schedule."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import LayerSelectionError, StepSelectionError

__all__ = ["select_layers", "StepSchedule"]

LayerSpec = str | Sequence[str] | None


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

    Build it with :meth:`parse` or :meth:`timesteps`: ``None`` = every step; an int, a ``range`` or an iterable of
    ints = those steps; a float ``f`` in ``[0, 1)`` = dense warm-up over the first ``ceil(f * num_steps)`` steps, the
    method after; a pair of floats ``(start, stop)`` = the steps from ``ceil(start * n)`` up to ``ceil(stop * n)``
    (exclusive); :meth:`timesteps` ``(low, high)`` = the steps whose scheduler timestep ``t`` (0..1000 scale) has
    ``low <= t <= high``, as diffusers' PAB and PAG guiders select. ``n`` is the number of steps that will actually run
    in this pipeline call (img2img's ``strength`` included).
    """

    indices: frozenset[int] | None = None
    warmup_fraction: float | None = None
    fraction_range: tuple[float, float] | None = None
    timestep_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.indices, self.warmup_fraction, self.fraction_range, self.timestep_range)]
        if sum(given) > 1:
            raise LayerSelectionError(
                "StepSchedule takes one of: step indices, a warm-up fraction, a fraction range or a timestep range"
            )
        if self.indices is not None and any(i < 0 for i in self.indices):
            raise LayerSelectionError(f"step indices must be >= 0, got {sorted(self.indices)}")
        if self.warmup_fraction is not None and not 0.0 <= self.warmup_fraction < 1.0:
            raise LayerSelectionError(
                f"a warm-up fraction must be in [0, 1), got {self.warmup_fraction}; e.g. steps=0.25 keeps the first "
                "quarter of the schedule dense"
            )
        if self.fraction_range is not None:
            start, stop = self.fraction_range
            if not 0.0 <= start < stop <= 1.0:
                raise LayerSelectionError(
                    f"steps=(start, stop) needs 0 <= start < stop <= 1, got {self.fraction_range}"
                )
        if self.timestep_range is not None:
            low, high = self.timestep_range
            if not low <= high:
                raise LayerSelectionError(f"a timestep range needs low <= high, got {self.timestep_range}")

    @classmethod
    def timesteps(cls, low: float, high: float) -> StepSchedule:
        """Act on the steps whose scheduler timestep t satisfies ``low <= t <= high`` (0..1000 scale)."""
        return cls(timestep_range=(float(low), float(high)))

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
        if isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(x, float) for x in spec):
            return cls(fraction_range=(spec[0], spec[1]))
        try:
            indices = frozenset(spec)
        except TypeError:
            raise LayerSelectionError(
                f"steps={spec!r} is not understood; pass None, an int, a range, a list of ints, a float fraction, a "
                "(start, stop) pair of fractions or StepSchedule.timesteps(low, high)"
            ) from None
        if not indices or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
            raise LayerSelectionError(f"steps must be a non-empty collection of ints, got {spec!r}")
        return cls(indices=indices)

    @property
    def every_step(self) -> bool:
        return self == StepSchedule()

    @property
    def needs_num_steps(self) -> bool:
        return self.warmup_fraction is not None or self.fraction_range is not None

    def first_active(self, num_steps: int) -> int:
        return math.ceil((self.warmup_fraction or 0.0) * num_steps - 1e-9)

    def describe(self) -> str:
        if self.indices is not None:
            return f"steps={sorted(self.indices)}"
        if self.warmup_fraction is not None:
            return f"steps={self.warmup_fraction} (dense warm-up fraction)"
        if self.fraction_range is not None:
            return f"steps={self.fraction_range} (fraction range)"
        if self.timestep_range is not None:
            return f"timesteps in {list(self.timestep_range)}"
        return "every step"

    def is_active(self, step: int | None, num_steps: int | None, timestep: float | None = None) -> bool:
        """Whether the method acts at this loop position; raises when the position needed is unknown."""
        if self.every_step:
            return True
        if self.timestep_range is not None:
            if timestep is None:
                raise StepSelectionError(
                    f"{self.describe()}: the scheduler timestep of this model call is unknown. Call the model through "
                    "a diffusers pipeline, or inside diffattn.denoising_step(i, num_steps, timestep=t)"
                )
            return self.timestep_range[0] <= timestep <= self.timestep_range[1]
        if step is None or (self.needs_num_steps and num_steps is None):
            raise StepSelectionError(
                f"{self.describe()}: the denoising step of this model call is unknown (the model was not called from "
                "a diffusers pipeline's loop). Wrap each call in diffattn.denoising_step(i, num_steps), or apply "
                "with steps=None"
            )
        if self.indices is not None:
            return step in self.indices
        if self.warmup_fraction is not None:
            return step >= self.first_active(num_steps)
        start, stop = self.fraction_range
        return math.ceil(start * num_steps - 1e-9) <= step < math.ceil(stop * num_steps - 1e-9)

    def check_selects(self, num_steps: int | None, timesteps: Sequence[float] | None, where: str) -> None:
        """Raise :class:`StepSelectionError` when no step of this loop (``num_steps`` long, with ``timesteps``) is
        selected; nothing when the loop is not known."""
        if self.every_step:
            return
        if self.timestep_range is not None:
            if timesteps is None:
                return
            hits = [t for t in timesteps if self.timestep_range[0] <= t <= self.timestep_range[1]]
        else:
            if num_steps is None:
                return
            hits = [s for s in range(num_steps) if self.is_active(s, num_steps)]
        if not hits:
            seen = (
                f"timesteps {min(timesteps):.0f}..{max(timesteps):.0f}"
                if self.timestep_range is not None
                else f"steps 0..{num_steps - 1}"
            )
            raise StepSelectionError(
                f"{where}: {self.describe()} selects none of the {num_steps} steps this pipeline call runs ({seen}), "
                "so the method would never act. Choose steps inside that range (or steps=None for all)"
            )


StepSpec = int | float | range | Iterable[int] | StepSchedule | None
