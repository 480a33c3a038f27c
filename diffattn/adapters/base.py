"""What every model-family adapter is made of: :class:`RoleRule` and :class:`FamilyAdapter`, the model's forward
inputs by name (:func:`model_inputs`), and the pieces several families share (the self / cross rules of
``attn1`` / ``attn2`` models, the image and video grid readers)."""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..context import Role
from ..errors import LayoutError

__all__ = ["RoleRule", "FamilyAdapter", "ModelInputs", "model_inputs"]


ModelInputs = dict[str, Any]
GridFn = Callable[[torch.nn.Module, ModelInputs], tuple[int, ...]]


@dataclass(frozen=True)
class RoleRule:
    """Attention modules whose name fully matches ``pattern`` play ``role``; ``text_first`` places text in joint
    calls. ``axes``: which axes of the model's ``(frames, height, width)`` grid one call holds: ``"all"`` (the
    whole grid), ``"per_frame"`` (video UNets' spatial attention: one frame's ``(h, w)`` per batch entry, a batch of
    B x F) or ``"temporal"`` (their motion modules: the frames of one pixel, a batch of B x h x w)."""

    pattern: str
    role: Role
    text_first: bool = False
    axes: str = "all"

    def __post_init__(self) -> None:
        if self.axes not in ("all", "per_frame", "temporal"):
            raise ValueError(f"RoleRule.axes is 'all', 'per_frame' or 'temporal', got {self.axes!r}")

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None


@dataclass(frozen=True)
class FamilyAdapter:
    """One model family: its class name, role rules, visual grid and how classifier-free guidance is batched.

    ``multiscale``: the grid shrinks by 2 per resolution level (UNets); a call's grid is found from its length.
    ``cfg_in_batch``: the family's pipelines stack both CFG branches in one batch when guidance is on, in
    ``cfg_order`` (``("uncond", "cond")``; Z-Image: ``("cond", "uncond")``).
    ``timestep_scale``: multiplies the model's timestep input onto the schedulers' 0..1000 scale (Flux's pipelines
    pass t / 1000).
    ``timestep_map``: when set, maps the model's timestep input onto the 0..1000 scale instead (``reversed_unit_time``
    for pipelines that pass ``1 - t / 1000``); ``timestep_input``: the name of that input (``"t"``, ``"timesteps"``).
    ``unbatched_inputs``: forward inputs without a batch dimension although their first size may equal the batch
    (WanVACE's per-layer ``control_hidden_states_scale``): guidance never appends entries to them.
    ``frame_folded_inputs``: inputs with one entry per (video, frame), frames of a video together (AnimateDiff's
    ``encoder_hidden_states``, repeated per frame by its pipeline); the grid's first axis is the frame count.
    ``listed_inputs``: inputs that are a list with one tensor per batch entry (Z-Image's ``x`` and ``cap_feats``).
    ``text_call(module)``: which SDPA call (1-based) of a cross-attention module's call attends the text; the
    module's other calls (IP-Adapter's, Wan image-to-video's image-prompt attention) get the role ``image_prompt``,
    which no method acts on. Default: the first.
    """

    family: str
    model_class: str
    rules: tuple[RoleRule, ...]
    grid: GridFn
    multiscale: bool = False
    cfg_in_batch: bool = True
    timestep_scale: float = 1.0
    timestep_map: Callable[[float], float] | None = None
    cfg_order: tuple[str, str] = ("uncond", "cond")
    unbatched_inputs: frozenset[str] = frozenset()
    frame_folded_inputs: frozenset[str] = frozenset()
    listed_inputs: frozenset[str] = frozenset()
    timestep_input: str = "timestep"
    text_call: Callable[[torch.nn.Module], int] = lambda module: 1

    def timestep_1000(self, timestep: float) -> float:
        """The model's timestep input on the schedulers' 0..1000 scale."""
        return self.timestep_map(timestep) if self.timestep_map is not None else timestep * self.timestep_scale

    @property
    def grid_source(self) -> str:
        """Where the grid comes from, for people: the first line of the grid reader's docstring."""
        doc = (self.grid.__doc__ or "").strip()
        return doc.splitlines()[0].rstrip(".") if doc else "the model's inputs"

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


def model_inputs(model: torch.nn.Module, args: tuple, kwargs: dict) -> ModelInputs:
    """The model's forward arguments by name."""
    return _bound_inputs(model, args, kwargs)


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

    grid.__doc__ = "(height, width) of the latents / the patch size"
    return grid


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

    grid.__doc__ = "(frames, height, width) of the latents / the patch sizes"
    return grid


def ids_grid(ids_key: str = "img_ids", tokens_key: str = "hidden_states") -> GridFn:
    """The ``(h, w)`` grid spanned by the position ids of the generated image: rows ``(modality, row, col)`` whose
    modality is the first row's (reference images carry another modality id and are not supported), each axis
    counted from its smallest id (LongCat starts the image ids after the text's)."""

    def grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
        name = type(model).__name__
        ids = _require(inputs, ids_key, name)
        ids = ids[0] if ids.ndim == 3 else ids
        tokens = _require(inputs, tokens_key, name).shape[1]
        own = ids[ids[:, 0] == ids[0, 0]]
        h = int(own[:, 1].max() - own[:, 1].min()) + 1
        w = int(own[:, 2].max() - own[:, 2].min()) + 1
        if h * w != tokens or own.shape[0] != tokens:
            raise LayoutError(
                f"{name}: {ids_key} describe a {h}x{w} image grid but {tokens_key} has {tokens} tokens; "
                "reference-image conditioning (edit pipelines that append image tokens) is not supported by this "
                "adapter."
            )
        return (h, w)

    grid.__doc__ = f"(height, width) from the image rows of ``{ids_key}``"
    return grid


def reversed_unit_time(timestep: float) -> float:
    """``1000 (1 - t)``: the 0..1000 timestep of a model whose pipeline passes ``1 - t / 1000`` (Lumina, Z-Image)."""
    return 1000.0 * (1.0 - timestep)


def image_call_first(module: torch.nn.Module) -> int:
    """The text call of Wan-style cross-attention: second when the module has image-prompt projections
    (``add_k_proj``, image-to-video checkpoints), whose attention over the CLIP image tokens runs first."""
    return 2 if getattr(module, "add_k_proj", None) is not None else 1


_SELF_CROSS = (RoleRule(r".*\.attn1", "self"), RoleRule(r".*\.attn2", "cross"))
