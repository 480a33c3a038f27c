"""Where and when a method acts: layer selection by module name, step selection over the denoising schedule."""

from __future__ import annotations

import math
import numbers
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


_LAYERS_TAKE = (
    "layers takes a regex string over attention-module names (e.g. 'attn1' or r'down_blocks\\.0') or a list of "
    "them, or None for every layer"
)


def select_layers(spec: LayerSpec, names: Sequence[str]) -> list[str]:
    """Names (in model order) matched by ``spec``; ``None`` selects all. Every pattern must match something."""
    if spec is None:
        return list(names)
    if isinstance(spec, str):
        patterns = [spec]
    else:
        try:
            patterns = None if isinstance(spec, (bytes, bytearray)) else list(spec)
        except TypeError:
            patterns = None
        if patterns is None:
            raise LayerSelectionError(f"{_LAYERS_TAKE}; got {spec!r} ({type(spec).__name__})")
    if not patterns:
        raise LayerSelectionError("layers=[] selects nothing; pass None for all layers or at least one pattern")
    chosen: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise LayerSelectionError(f"{_LAYERS_TAKE}; got {pattern!r} ({type(pattern).__name__}) in layers={spec!r}")
        regex = _component_regex(pattern)
        hits = [n for n in names if regex.search(n)]
        if not hits:
            raise LayerSelectionError(
                f"layers pattern {pattern!r} matches no attention layer. Patterns match whole dot-separated parts "
                f"of module names (e.g. 'transformer_blocks.1' or 'attn1'). Valid names: {_preview(list(names))}"
            )
        chosen.update(hits)
    return [n for n in names if n in chosen]


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_float(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (numbers.Integral, bool))


_STEPS_TAKE = (
    "steps takes None (every step), an int step index, a range or a list / tuple of int indices, a float f in [0, 1) "
    "(the first ceil(f * n) steps dense), a (start, stop) tuple of two float fractions, or "
    "StepSchedule.timesteps(low, high)"
)

#: Longest ``range`` of step indices taken: a denoising loop runs far fewer steps, and the indices are stored.
MAX_RANGE_STEPS = 1_000_000


@dataclass(frozen=True)
class StepSchedule:
    """Denoising steps on which a method acts (0 = first, noisiest step); other steps stay dense.

    Build it with :meth:`parse` or :meth:`timesteps`. What each form of ``steps`` means:

    - ``None``: every step.
    - an int, a ``range``, or a list / tuple / set of ints: those step indices (``steps=0`` is step 0 only;
      ``steps=(0, 1)`` and ``[0, 1]`` are steps 0 and 1).
    - a float ``f`` in ``[0, 1)``: dense warm-up over the first ``ceil(f * n)`` steps, the method after.
      ``steps=0.0`` is no warm-up: the method acts on every step, as with ``None``.
    - a tuple of two floats ``(start, stop)``, ``0 <= start < stop <= 1``: the steps from ``ceil(start * n)`` up to
      ``ceil(stop * n)`` (exclusive). Both must be floats: ``(0.0, 1)`` is refused (write ``(0.0, 1.0)`` for
      fractions or ``[0, 1]`` for indices).
    - :meth:`timesteps` ``(low, high)``: the steps whose scheduler timestep ``t`` (0..1000 scale) has
      ``low <= t <= high``, as diffusers' PAB and PAG guiders select.

    ``n`` is the number of steps that will actually run in this pipeline call (img2img's ``strength`` included).
    Anything else raises :class:`~diffattn.errors.StepSelectionError` saying how to write it.
    """

    indices: frozenset[int] | None = None
    warmup_fraction: float | None = None
    fraction_range: tuple[float, float] | None = None
    timestep_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.indices, self.warmup_fraction, self.fraction_range, self.timestep_range)]
        if sum(given) > 1:
            raise StepSelectionError(
                "StepSchedule takes one of: step indices, a warm-up fraction, a fraction range or a timestep range"
            )
        if self.indices is not None and any(i < 0 for i in self.indices):
            raise StepSelectionError(
                f"step indices must be >= 0 (0 is the first step), got {sorted(self.indices)}; for the last steps "
                "write a (start, stop) fraction pair, e.g. steps=(0.75, 1.0)"
            )
        if self.warmup_fraction is not None and not 0.0 <= self.warmup_fraction < 1.0:
            raise StepSelectionError(
                f"a warm-up fraction must be in [0, 1), got {self.warmup_fraction}; e.g. steps=0.25 keeps the first "
                "quarter of the schedule dense (steps=0.0: no warm-up); for step indices pass ints"
            )
        if self.warmup_fraction == 0.0:  # no warm-up: every step, so no step position is needed either
            object.__setattr__(self, "warmup_fraction", None)
        if self.fraction_range is not None:
            start, stop = self.fraction_range
            if not 0.0 <= start < stop <= 1.0:
                raise StepSelectionError(
                    f"steps=(start, stop) needs 0 <= start < stop <= 1, got {self.fraction_range}; e.g. "
                    "steps=(0.25, 1.0) acts from a quarter of the steps on"
                )
        if self.timestep_range is not None:
            low, high = self.timestep_range
            if not low <= high:
                raise StepSelectionError(
                    f"a timestep range needs low <= high, got {self.timestep_range}; e.g. "
                    "StepSchedule.timesteps(400, 1000) for the noisier steps"
                )

    @classmethod
    def timesteps(cls, low: float, high: float) -> StepSchedule:
        """Act on the steps whose scheduler timestep t satisfies ``low <= t <= high`` (0..1000 scale)."""
        if not (_is_int(low) or _is_float(low)) or not (_is_int(high) or _is_float(high)):
            raise StepSelectionError(
                f"StepSchedule.timesteps takes two numbers (scheduler timesteps, 0..1000 scale), got {low!r}, "
                f"{high!r}; e.g. StepSchedule.timesteps(400, 1000)"
            )
        return cls(timestep_range=(float(low), float(high)))

    @classmethod
    def parse(cls, spec: StepSpec) -> StepSchedule:
        """``steps=`` as a schedule, by the rules of the class docstring."""
        if spec is None:
            return cls()
        if isinstance(spec, StepSchedule):
            return spec
        if isinstance(spec, bool):
            raise StepSelectionError(f"steps={spec!r} is a bool; {_STEPS_TAKE}")
        if _is_int(spec):
            return cls(indices=frozenset({int(spec)}))
        if _is_float(spec):
            return cls(warmup_fraction=float(spec))
        if isinstance(spec, (str, bytes, bytearray)):
            raise StepSelectionError(
                f"steps={spec!r} is a string; {_STEPS_TAKE}. E.g. steps=range(0, 3) or steps=[0, 1, 2] for the "
                "first three steps"
            )
        if isinstance(spec, tuple) and len(spec) == 2 and any(_is_float(x) for x in spec):
            if all(_is_float(x) for x in spec):
                return cls(fraction_range=(float(spec[0]), float(spec[1])))
            if all(_is_int(x) or _is_float(x) for x in spec):
                raise StepSelectionError(
                    f"steps={spec!r} mixes an int and a float, so it is neither a (start, stop) pair of fractions "
                    "(two floats) nor step indices (ints): write (0.0, 1.0) for fractions or [0, 1] for indices"
                )
        if isinstance(spec, range) and len(spec) > MAX_RANGE_STEPS:
            raise StepSelectionError(
                f"steps={spec!r} holds {len(spec)} step indices, more than any denoising loop runs; give the steps "
                "that will run, e.g. range(10, num_inference_steps), or a fraction pair such as steps=(0.2, 1.0)"
            )
        try:
            items = list(spec)
        except TypeError:
            raise StepSelectionError(
                f"steps={spec!r} ({type(spec).__name__}) is not understood; {_STEPS_TAKE}"
            ) from None
        if not items:
            raise StepSelectionError(
                f"steps={spec!r} selects nothing; pass None for every step or at least one step index"
            )
        for item in items:
            if _is_int(item):
                continue
            if isinstance(item, bool):
                problem = f"{item!r} is a bool"
            else:
                problem = f"{item!r} ({type(item).__name__}) is not an int"
            fix = "give int step indices, e.g. [0, 1, 2]"
            if all(_is_float(x) for x in items):
                example = f"({items[0]!r}, {items[1]!r})" if len(items) == 2 else "(0.25, 0.75)"
                fix = f"for a (start, stop) range of fractions write a tuple of two floats, e.g. steps={example}"
            raise StepSelectionError(f"steps={spec!r}: step indices must be ints, but {problem}; {fix}")
        return cls(indices=frozenset(int(i) for i in items))

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
