"""A tuned profile: per layer, step range and head, the budget of a sparse method chosen by :func:`~diffattn.tune`
against dense attention, and :class:`ProfiledSparseAttention`, the method that runs it. Saved as safetensors (the
budgets and measured errors, float64, so a reloaded profile is bitwise the one saved) beside a JSON file (model
class, grids, method parameters, error target, diffattn version)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..context import AttentionContext
from ..errors import MethodConfigError
from ..methods.base import AttentionMethod
from ..methods.checks import COMPUTE_DTYPES
from ..methods.dynamic_common import _ROLES
from ..methods.dynamic_sparse import DynamicSparseAttention

__all__ = ["LayerBudget", "TunedProfile", "ProfiledSparseAttention", "PROFILE_FORMAT", "dense_in"]

PROFILE_FORMAT = 1
_JSON = "profile.json"
_TENSORS = "profile.safetensors"


@dataclass(frozen=True)
class LayerBudget:
    """One attention layer's tuned budgets: ``budgets[r][h]`` the top-k fraction of step range ``r`` and head ``h``
    (1.0: dense), ``errors[r][h]`` the mean relative L1 error of the attention output measured at that budget on
    the calibration prompts (0.0 where dense), on the visual token ``grid`` it was tuned at; ``costs[i]`` the time of
    the profile's candidate ``i`` as a fraction of dense attention's on this layer, as timed while tuning (empty when
    the budgets were chosen without costs)."""

    name: str
    grid: tuple[int, ...]
    budgets: tuple[tuple[float, ...], ...]
    errors: tuple[tuple[float, ...], ...]
    costs: tuple[float, ...] = ()

    @property
    def heads(self) -> int:
        return len(self.budgets[0])


@dataclass(frozen=True)
class TunedProfile:
    """What :func:`~diffattn.tune` found for one model: a budget per layer, step range and head.

    ``family``: the tuned method (``"dynamic-topk"``: :class:`~diffattn.DynamicSparseAttention` with a top-k budget,
    ``block_size`` and ``tile``); ``step_ranges``: the number of equal parts the denoising steps are cut into (a
    call's range is ``step * step_ranges // num_steps``); ``error_target``: the relative L1 error of the attention
    output each head's budget keeps within (found by the search when ``psnr_target`` was given; ``calibration_psnr``
    is then the profile's PSNR against dense on the calibration prompts); ``candidates``: the top-k fractions tuning
    chose from (the layers' ``costs`` follow their order); ``compute_dtype``: ``"bfloat16"`` when every head, dense
    or sparse, computes on q, k, v cast to bf16 (``tune(..., compute_dtype=torch.bfloat16)``), else ``None``;
    ``cache``: the diffusers step cache the PSNR search ran under (``tune(..., cache=...)``), meant to be enabled with
    the profile, else ``None``. ``diffattn.apply(pipe, profile)`` applies
    it to the layers it lists; it refuses another model class or another token grid."""

    model_class: str
    family: str
    block_size: int
    tile: Any
    step_ranges: int
    error_target: float
    layers: tuple[LayerBudget, ...]
    calibration: tuple[str, ...] = ()
    num_inference_steps: int | None = None
    diffattn_version: str = ""
    psnr_target: float | None = None
    calibration_psnr: float | None = None
    candidates: tuple[float, ...] = ()
    compute_dtype: str | None = None
    cache: str | None = None

    def __post_init__(self) -> None:
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise MethodConfigError(
                f"a tuned profile's compute_dtype is None or one of {', '.join(COMPUTE_DTYPES)} (a torch dtype's "
                f"name), got {self.compute_dtype!r}: fix it in the profile's JSON, or tune again with "
                "diffattn.tune(..., compute_dtype=torch.bfloat16)"
            )

    def layer(self, name: str) -> LayerBudget | None:
        return next((layer for layer in self.layers if layer.name == name), None)

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    def mean_budget(self) -> float:
        """The mean top-k fraction over layers, step ranges and heads (a layer's share of compute is not weighed)."""
        values = [b for layer in self.layers for row in layer.budgets for b in row]
        return sum(values) / len(values)

    def method(self) -> ProfiledSparseAttention:
        return ProfiledSparseAttention(self)

    def layer_patterns(self) -> list[str]:
        """``diffattn.apply``'s ``layers=``: each tuned layer by its exact name."""
        return [f"^{re.escape(name)}$" for name in self.layer_names]

    def check_model(self, model: torch.nn.Module) -> None:
        found = type(model).__name__
        if found != self.model_class:
            raise MethodConfigError(
                f"this profile was tuned for {self.model_class}, not {found}: tune this model with "
                "diffattn.tune(pipe, ...) and apply that profile"
            )

    # ------------------------------------------------------------------------------------------------------------
    # saving and loading
    # ------------------------------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``profile.json`` and ``profile.safetensors`` into ``folder`` (made if missing); returns it."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        for i, layer in enumerate(self.layers):
            tensors[f"budgets.{i}"] = torch.tensor(layer.budgets, dtype=torch.float64)
            tensors[f"errors.{i}"] = torch.tensor(layer.errors, dtype=torch.float64)
            if layer.costs:
                tensors[f"costs.{i}"] = torch.tensor(layer.costs, dtype=torch.float64)
        save_file(tensors, str(folder / _TENSORS))
        meta = {
            "format": PROFILE_FORMAT,
            "model_class": self.model_class,
            "family": self.family,
            "block_size": self.block_size,
            "tile": list(self.tile) if isinstance(self.tile, tuple) else self.tile,
            "step_ranges": self.step_ranges,
            "error_target": self.error_target,
            "calibration": list(self.calibration),
            "num_inference_steps": self.num_inference_steps,
            "diffattn_version": self.diffattn_version,
            "psnr_target": self.psnr_target,
            "calibration_psnr": self.calibration_psnr,
            "candidates": list(self.candidates),
            "compute_dtype": self.compute_dtype,
            "cache": self.cache,
            "layers": [{"name": layer.name, "grid": list(layer.grid)} for layer in self.layers],
        }
        (folder / _JSON).write_text(json.dumps(meta, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> TunedProfile:
        """The profile :meth:`save` wrote into ``folder``."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / _JSON).is_file() or not (folder / _TENSORS).is_file():
            raise FileNotFoundError(
                f"{folder} holds no tuned profile ({_JSON} and {_TENSORS}); make one with diffattn.tune(...) and "
                "profile.save(folder)"
            )
        meta = json.loads((folder / _JSON).read_text())
        if meta.get("format") != PROFILE_FORMAT:
            raise ValueError(
                f"{folder / _JSON} has profile format {meta.get('format')!r}; this diffattn reads format "
                f"{PROFILE_FORMAT}: tune again"
            )
        tensors = load_file(str(folder / _TENSORS))
        layers = tuple(
            LayerBudget(
                entry["name"],
                tuple(entry["grid"]),
                tuple(tuple(row) for row in tensors[f"budgets.{i}"].tolist()),
                tuple(tuple(row) for row in tensors[f"errors.{i}"].tolist()),
                tuple(tensors[f"costs.{i}"].tolist()) if f"costs.{i}" in tensors else (),
            )
            for i, entry in enumerate(meta["layers"])
        )
        tile = meta["tile"]
        return cls(
            model_class=meta["model_class"],
            family=meta["family"],
            block_size=int(meta["block_size"]),
            tile=tuple(tile) if isinstance(tile, list) else tile,
            step_ranges=int(meta["step_ranges"]),
            error_target=float(meta["error_target"]),
            layers=layers,
            calibration=tuple(meta.get("calibration", ())),
            num_inference_steps=meta.get("num_inference_steps"),
            diffattn_version=meta.get("diffattn_version", ""),
            psnr_target=meta.get("psnr_target"),
            calibration_psnr=meta.get("calibration_psnr"),
            candidates=tuple(meta.get("candidates", ())),
            compute_dtype=meta.get("compute_dtype"),
            cache=meta.get("cache"),
        )


def step_range(ctx: AttentionContext, ranges: int) -> int:
    """The step range ``ctx.step`` falls in when the call's ``ctx.num_steps`` steps are cut into ``ranges``."""
    return min(ctx.step * ranges // max(ctx.num_steps, 1), ranges - 1)


@dataclass(frozen=True)
class ProfiledSparseAttention(AttentionMethod):
    """Runs a :class:`TunedProfile`: on each tuned layer, :class:`~diffattn.DynamicSparseAttention` with the
    profile's per-head top-k budget of the call's step range. A layer whose grid differs from the profile's, or a
    layer the profile does not list, is refused with the way to fix it."""

    profile: TunedProfile
    roles: frozenset[str] = field(default=_ROLES)
    _methods: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    requires_step = True

    def __post_init__(self) -> None:
        if not isinstance(self.profile, TunedProfile):
            raise TypeError(f"{self.name} takes a TunedProfile (diffattn.tune), got {type(self.profile).__name__}")

    def _layer(self, ctx: AttentionContext) -> LayerBudget:
        layer = self.profile.layer(ctx.layer)
        if layer is None:
            raise MethodConfigError(
                f"the tuned profile has no budget for {ctx.layer}; apply it with diffattn.apply(pipe, profile), "
                "which selects its layers, or tune this layer too"
            )
        return layer

    def validate(self, ctx: AttentionContext) -> None:
        layer = self._layer(ctx)
        grid = tuple(ctx.q_layout.grid)
        if grid != layer.grid:
            raise MethodConfigError(
                f"the profile was tuned on token grid {layer.grid} at {ctx.layer}, this call has grid {grid} (another "
                "size or frame count): tune again at this size with diffattn.tune(pipe, ..., height=, width=)"
            )

    @property
    def _dtype(self) -> torch.dtype | None:
        return None if self.profile.compute_dtype is None else getattr(torch, self.profile.compute_dtype)

    def _method(self, budgets: tuple[float, ...]) -> DynamicSparseAttention:
        """The dynamic method with these per-head budgets, made once per budgets."""
        method = self._methods.get(budgets)
        if method is None:
            method = DynamicSparseAttention(
                topk=budgets,
                block_size=self.profile.block_size,
                tile=self.profile.tile,
                roles=self.roles,
                compute_dtype=self._dtype,
            )
            self._methods[budgets] = method
        return method

    def method_for(self, layer: str, index: int) -> DynamicSparseAttention:
        """The dynamic method of ``layer``'s step range ``index``."""
        return self._method(tuple(self.profile.layer(layer).budgets[index]))

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        layer = self._layer(ctx)
        heads = ctx.total_heads or q.shape[1]
        if heads != layer.heads:
            raise MethodConfigError(
                f"the profile has {layer.heads} head budgets for {ctx.layer}, this call has {heads} heads: it was "
                f"tuned for another {self.profile.model_class} configuration; tune this one"
            )
        index = step_range(ctx, self.profile.step_ranges)
        budgets = layer.budgets[index][ctx.head_offset : ctx.head_offset + q.shape[1]]
        dense = [h for h, b in enumerate(budgets) if b >= 1.0]
        if not dense or not _splittable(q, k, ctx):
            return self.method_for(ctx.layer, index)(q, k, v, ctx)
        if len(dense) == q.shape[1]:  # every head dense: the stock core, no selection
            ctx.report(density=1.0, selection_seconds=0.0, attention_seconds=0.0)
            return dense_in(self._dtype, q, k, v, ctx)
        return self._split(q, k, v, ctx, budgets, dense)

    def _split(
        self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext, budgets: tuple[float, ...], dense: list[int]
    ) -> Tensor:
        """Dense heads through the stock core, the others through the dynamic method with their budgets."""
        sparse = [h for h in range(q.shape[1]) if h not in dense]
        method = self._method(tuple(budgets[h] for h in sparse))
        metrics: dict[str, float] = {}
        inner = replace(ctx, head_offset=0, total_heads=None, report=lambda **m: metrics.update(m))
        out = torch.empty_like(q)
        d, s = torch.tensor(dense, device=q.device), torch.tensor(sparse, device=q.device)
        out[:, s] = method(q[:, s], k[:, s], v[:, s], inner)
        out[:, d] = dense_in(self._dtype, q[:, d], k[:, d], v[:, d], ctx)
        share = len(sparse) / q.shape[1]
        ctx.report(**{**metrics, "density": share * metrics.get("density", 1.0) + (1 - share)})
        return out


def _splittable(q: Tensor, k: Tensor, ctx: AttentionContext) -> bool:
    """Whether heads can run apart: the same number of query and key heads, and a mask shared by all heads."""
    mask = ctx.attn_mask
    return k.shape[1] == q.shape[1] and (mask is None or mask.ndim < 4 or mask.shape[1] == 1)


def dense_in(dtype: torch.dtype | None, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
    """The stock core on q, k, v cast to ``dtype`` (``None``: as they come) and cast back. A call with a float mask
    stays in its own dtype: SDPA takes such a mask only in the dtype of q, and the stock call's mask is fixed."""
    if dtype is None or dtype == q.dtype or (ctx.attn_mask is not None and ctx.attn_mask.is_floating_point()):
        return ctx.dense(q, k, v)
    return ctx.dense(q.to(dtype), k.to(dtype), v.to(dtype)).to(q.dtype)
