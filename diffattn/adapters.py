"""Model-family knowledge, in one place: which attention module plays which role, and the visual token grid.

Each supported diffusers model class has one small :class:`FamilyAdapter` entry. Everything diffattn needs from a
model beyond its attention modules comes from here: the role of every attention module (self, cross, joint text +
image, and where the text sits in a joint sequence) and the grid of visual tokens (after patching) read from the
model's own forward inputs. Add a family with :func:`register_adapter`.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .context import Role
from .errors import LayoutError, UnsupportedModelError

__all__ = ["RoleRule", "FamilyAdapter", "adapter_for", "register_adapter", "supported_models", "ModelInputs"]

ModelInputs = dict[str, Any]
GridFn = Callable[[torch.nn.Module, ModelInputs], tuple[int, ...]]


@dataclass(frozen=True)
class RoleRule:
    """Attention modules whose name fully matches ``pattern`` play ``role``; ``text_first`` places text in joint
    calls."""

    pattern: str
    role: Role
    text_first: bool = False

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None


@dataclass(frozen=True)
class FamilyAdapter:
    """One model family: its class name, role rules, visual grid and how classifier-free guidance is batched.

    ``multiscale``: the grid shrinks by 2 per resolution level (UNets); a call's grid is found from its length.
    ``cfg_in_batch``: the family's pipelines stack [uncond, cond] in one batch when guidance is on.
    ``timestep_scale``: multiplies the model's timestep input onto the schedulers' 0..1000 scale (Flux's pipelines
    pass t / 1000).
    """

    family: str
    model_class: str
    rules: tuple[RoleRule, ...]
    grid: GridFn
    multiscale: bool = False
    cfg_in_batch: bool = True
    timestep_scale: float = 1.0

    def rule_for(self, name: str) -> RoleRule | None:
        return next((r for r in self.rules if r.matches(name)), None)

    def grid_for_length(self, base: tuple[int, ...], num_tokens: int, layer: str) -> tuple[int, ...]:
        """The visual grid of a call whose visual part has ``num_tokens`` tokens."""
        if not self.multiscale:
            return base
        for rounding in (math.ceil, math.floor):
            grid = base
            for _ in range(8):
                if math.prod(grid) == num_tokens:
                    return grid
                grid = tuple(max(1, int(rounding(n / 2))) for n in grid)
        raise LayoutError(
            f"{layer}: {num_tokens} visual tokens do not fit any resolution level of the input grid {base}; "
            "the model's blocks resample in a way this adapter does not know (register a custom adapter)."
        )


def _bound_inputs(model: torch.nn.Module, args: tuple, kwargs: dict) -> ModelInputs:
    signature = inspect.signature(type(model).forward)
    bound = signature.bind_partial(model, *args, **kwargs)
    inputs = dict(bound.arguments)
    inputs.pop(next(iter(signature.parameters)), None)
    inputs.update(inputs.pop("kwargs", {}) or {})
    return inputs


def _require(inputs: ModelInputs, name: str, family: str) -> Any:
    value = inputs.get(name)
    if value is None:
        raise LayoutError(f"{family}: the model was called without `{name}`, which diffattn needs for the token grid")
    return value


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _image_grid(patch: Callable[[torch.nn.Module], int]) -> GridFn:
    def grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
        x = _require(inputs, "hidden_states" if "hidden_states" in inputs else "sample", type(model).__name__)
        p = patch(model)
        return (x.shape[-2] // p, x.shape[-1] // p)

    return grid


def _unet_grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
    sample = _require(inputs, "sample", "UNet2DConditionModel")
    return (int(sample.shape[-2]), int(sample.shape[-1]))


def _flux_grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
    ids = _require(inputs, "img_ids", "FluxTransformer2DModel")
    ids = ids[0] if ids.ndim == 3 else ids
    tokens = _require(inputs, "hidden_states", "FluxTransformer2DModel").shape[1]
    own = ids[ids[:, 0] == 0] if ids.shape[-1] == 3 else ids
    h, w = int(own[:, 1].max()) + 1, int(own[:, 2].max()) + 1
    if h * w != tokens:
        raise LayoutError(
            f"FluxTransformer2DModel: img_ids describe a {h}x{w} grid but hidden_states has {tokens} tokens; "
            "reference-image conditioning (Kontext-style) is not supported by this adapter yet."
        )
    return (h, w)


def _video_grid(channels_first: bool) -> GridFn:
    """Grid of ``(B, C, F, H, W)`` (channels_first) or ``(B, F, C, H, W)`` latents, using the config's patch sizes."""

    def grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
        x = _require(inputs, "hidden_states", type(model).__name__)
        frames = x.shape[2] if channels_first else x.shape[1]
        cfg = model.config
        patch = cfg.patch_size
        if isinstance(patch, (tuple, list)):
            pt, ph, pw = patch
        else:
            pt, ph, pw = getattr(cfg, "patch_size_t", None) or 1, patch, patch
        return (frames // pt, x.shape[-2] // ph, x.shape[-1] // pw)

    return grid


def _ltx_grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
    cfg = model.config
    pt, p = cfg.patch_size_t, cfg.patch_size
    f, h, w = (int(_require(inputs, k, "LTXVideoTransformer3DModel")) for k in ("num_frames", "height", "width"))
    return (f // pt, h // p, w // p)


_SELF_CROSS = (RoleRule(r".*\.attn1", "self"), RoleRule(r".*\.attn2", "cross"))

_ADAPTERS: dict[str, FamilyAdapter] = {}


def register_adapter(adapter: FamilyAdapter) -> None:
    """Register (or replace) the adapter of a model class, keyed by the class name."""
    _ADAPTERS[adapter.model_class] = adapter


for _adapter in (
    FamilyAdapter("unet", "UNet2DConditionModel", _SELF_CROSS, _unet_grid, multiscale=True),
    FamilyAdapter(
        "sd3",
        "SD3Transformer2DModel",
        (RoleRule(r"transformer_blocks\.\d+\.attn", "joint", text_first=False), RoleRule(r".*\.attn2", "self")),
        _image_grid(lambda m: m.config.patch_size),
    ),
    FamilyAdapter(
        "flux",
        "FluxTransformer2DModel",
        (RoleRule(r"(single_)?transformer_blocks\.\d+\.attn", "joint", text_first=True),),
        _flux_grid,
        cfg_in_batch=False,
        timestep_scale=1000.0,
    ),
    FamilyAdapter("wan", "WanTransformer3DModel", _SELF_CROSS, _video_grid(channels_first=True), cfg_in_batch=False),
    FamilyAdapter(
        "cogvideox",
        "CogVideoXTransformer3DModel",
        (RoleRule(r"transformer_blocks\.\d+\.attn1", "joint", text_first=True),),
        _video_grid(channels_first=False),
    ),
    FamilyAdapter(
        "hunyuan_video",
        "HunyuanVideoTransformer3DModel",
        (RoleRule(r"(single_)?transformer_blocks\.\d+\.attn", "joint", text_first=False),),
        _video_grid(channels_first=True),
    ),
    FamilyAdapter("ltx_video", "LTXVideoTransformer3DModel", _SELF_CROSS, _ltx_grid),
):
    register_adapter(_adapter)


def supported_models() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_for(model: torch.nn.Module) -> FamilyAdapter:
    """The adapter of ``model``'s class (or of its nearest registered base class)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile(model)
    for cls in type(model).__mro__:
        if cls.__name__ in _ADAPTERS:
            return _ADAPTERS[cls.__name__]
    raise UnsupportedModelError(
        f"diffattn has no adapter for {type(model).__name__}. Supported models: {', '.join(supported_models())}. "
        "If the model uses diffusers attention modules, describe it with diffattn.adapters.register_adapter("
        "FamilyAdapter(...)): the role of each attention module and how to read the token grid from its inputs."
    )


def model_inputs(model: torch.nn.Module, args: tuple, kwargs: dict) -> ModelInputs:
    """The model's forward arguments by name."""
    return _bound_inputs(model, args, kwargs)
