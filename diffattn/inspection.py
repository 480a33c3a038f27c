"""``diffattn.inspect``: what diffattn sees in a model — every attention module, its role, the token grid and text of
its calls, and the methods that can act on it. The first thing to run on a new model.

Roles come from the model's adapter. Grids and text lengths are facts of a call, so they are filled in when
``run`` is given: a function that calls the pipeline or model once (e.g. one denoising step); each attention call is
then recorded by a probe that computes the stock attention (the output is unchanged).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from . import methods as _methods
from .adapters import adapter_for
from .api import _denoisers, attach, attention_modules
from .context import ROLES, AttentionContext
from .errors import UnsupportedModelError
from .methods.base import AttentionMethod

__all__ = ["inspect", "LayerReport", "ModelReport", "Inspection", "acting_methods"]

#: Methods listed as able to act on a layer (guidance methods act through ``diffattn.guidance``).
_LISTED = (
    "Dense",
    "SlidingWindowAttention",
    "SlidingTileAttention",
    "ShiftedWindowAttention",
    "RadialAttention",
    "DynamicSparseAttention",
    "PyramidSparseAttention",
    "Rettention",
    "TokenDownsampling",
    "EntropyScaling",
    "PAG",
    "SEG",
    "PromptToPrompt",
    "MutualSelfAttention",
    "BoundedAttention",
    "AttentiveEraser",
)


def _default_roles(cls: type) -> frozenset[str]:
    for f in dataclasses.fields(cls):
        if f.name == "roles":
            if f.default is not dataclasses.MISSING:
                return frozenset(f.default)
            if f.default_factory is not dataclasses.MISSING:
                return frozenset(f.default_factory())
    return frozenset()


def _grid_kind(grid: tuple[int, ...] | None) -> str | None:
    if grid is None:
        return None
    return {3: "video", 2: "image", 1: "sequence"}.get(len(grid))


def acting_methods(role: str | None, grid: tuple[int, ...] | None = None) -> tuple[str, ...]:
    """Names of the listed methods whose default roles include ``role`` and whose grid kinds include the grid's."""
    if role is None:
        return ()
    kind = _grid_kind(grid)
    names = []
    for name in _LISTED:
        cls = getattr(_methods, name, None)
        if cls is None:
            from .methods import pag, seg

            cls = getattr(pag, name, None) or getattr(seg, name)
        if role in _default_roles(cls) and (kind is None or kind in cls.grid_kinds):
            names.append(name)
    return tuple(names)


@dataclass(frozen=True)
class LayerReport:
    """One attention module: ``role`` (``None``: diffattn leaves it alone), ``text_first`` for joint layers, and,
    from a recorded call, its visual ``grid`` and ``text_len``."""

    name: str
    role: str | None
    text_first: bool = False
    grid: tuple[int, ...] | None = None
    text_len: int | None = None

    @property
    def methods(self) -> tuple[str, ...]:
        return acting_methods(self.role, self.grid)

    def text(self) -> str:
        if self.role == "self" or self.role is None:
            return "-"
        if self.text_len is None:
            return "first" if self.role == "joint" and self.text_first else ("last" if self.role == "joint" else "keys")
        side = "keys" if self.role == "cross" else ("first" if self.text_first else "last")
        return f"{self.text_len} {side}"


@dataclass(frozen=True)
class ModelReport:
    """One denoiser: its class, family and grid source, its layers, or why diffattn refuses it."""

    model_class: str
    family: str | None
    grid_source: str | None
    layers: tuple[LayerReport, ...] = ()
    refused: str | None = None

    def table(self) -> str:
        if self.refused is not None:
            return f"{self.model_class}: refused: {self.refused}"
        head = f"{self.model_class} (family {self.family}; grid: {self.grid_source})"
        rows = [("layer", "role", "text", "grid", "methods that act")]
        for layer in self.layers:
            grid = "-" if layer.grid is None else "x".join(map(str, layer.grid))
            rows.append((layer.name, layer.role or "left alone", layer.text(), grid, ", ".join(layer.methods) or "-"))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [head] + ["  " + "  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4] for row in rows]
        return "\n".join(lines)


@dataclass(frozen=True)
class Inspection:
    models: tuple[ModelReport, ...]

    def __str__(self) -> str:
        return "\n\n".join(m.table() for m in self.models)


@dataclass(frozen=True)
class _Probe(AttentionMethod):
    """The stock attention core, recording each layer's grid and text length."""

    seen: dict = field(default_factory=dict, compare=False)
    roles: frozenset[str] = field(default=ROLES)
    position_free: ClassVar[bool] = False

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        text = ctx.kv_layout.text_len if ctx.role != "self" else None
        self.seen.setdefault(ctx.layer, set()).add((ctx.q_layout.grid, text))
        return ctx.dense(q, k, v)


def _report(model: torch.nn.Module) -> ModelReport:
    name = type(getattr(model, "_orig_mod", model)).__name__
    try:
        adapter = adapter_for(model)
    except UnsupportedModelError as error:
        return ModelReport(name, None, None, refused=str(error))
    layers = []
    for module_name, _ in attention_modules(model):
        rule = adapter.rule_for(module_name)
        layers.append(
            LayerReport(module_name, None if rule is None else rule.role, bool(rule is not None and rule.text_first))
        )
    return ModelReport(name, adapter.family, adapter.grid_source, tuple(layers))


def _with_calls(report: ModelReport, seen: dict) -> ModelReport:
    layers = []
    for layer in report.layers:
        calls = sorted(seen.get(layer.name, ()), key=lambda c: -(c[0] and len(c[0]) or 0))
        if calls:
            grid, text = calls[0]
            layer = dataclasses.replace(layer, grid=tuple(grid) if grid else None, text_len=text)
        layers.append(layer)
    return dataclasses.replace(report, layers=tuple(layers))


def inspect(target: Any, *, run: Callable[[], Any] | None = None) -> Inspection:
    """The attention modules of a pipeline's denoiser(s) or of a model, each with its role and the methods that can
    act on it; with ``run`` (called once, e.g. ``lambda: pipe("a cat", num_inference_steps=1)``), also the grid and
    text length of each module's calls. ``print(diffattn.inspect(pipe))`` shows the table."""
    models, _ = _denoisers(target)
    reports = [_report(model) for model in models]
    if run is None:
        return Inspection(tuple(reports))
    probe = _Probe()
    handles = []
    for model, report in zip(models, reports, strict=True):
        if report.refused is None and any(layer.role for layer in report.layers):
            handles.append(attach(model, probe))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return Inspection(tuple(_with_calls(report, probe.seen) for report in reports))
