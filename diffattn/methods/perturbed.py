"""The base of the perturbed-attention methods for guidance (:class:`PerturbedAttention`; the methods are
:class:`~diffattn.methods.pag.PAG`, :class:`~diffattn.methods.pag.SoftPAG` and :class:`~diffattn.methods.seg.SEG`).

Each acts only on the batch entries whose role is ``"perturbed"`` (the copies of the conditional entries that
:func:`diffattn.guidance.enable` appends to the batch); every other entry, and every head a method does not select,
gets the stock attention core unchanged (bitwise). They act on self-attention and on joint text + image attention,
never on cross-attention. Besides the attention change, each carries its guidance settings (``scale``,
``adaptive_scale``, ``layers``, ``heads``, ``steps``), which :func:`diffattn.guidance.enable` reads.

``heads`` restricts the perturbation to chosen heads (HeadHunter's head-level guidance): ``None`` = all heads, a
sequence of head indices = those heads in every selected layer, or a mapping ``{layer pattern: head indices}``
whose patterns (matched like ``layers``) are then the selected layers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
from torch import Tensor

from ..context import AttentionContext
from ..errors import LayerSelectionError, LayoutError
from ..schedule import StepSchedule, StepSpec, _component_regex
from .base import AttentionMethod
from .checks import check_roles_arg, given

__all__ = ["PerturbedAttention", "HeadSpec", "PERTURBED"]


#: The batch role of the entries a perturbed-attention method changes.
PERTURBED = "perturbed"


HeadSpec = Sequence[int] | Mapping[str, Sequence[int]] | None
#: ``heads`` as ``__post_init__`` stores it: ``None`` (all heads), head indices, or ``(layer pattern, head indices)``
#: pairs.
_Heads = tuple[int, ...] | tuple[tuple[str, tuple[int, ...]], ...] | None


_GUIDANCE_ROLES = frozenset({"self", "joint"})


def _normalise_heads(heads: HeadSpec, owner: str) -> _Heads:
    def indices(value: Any, where: str) -> tuple[int, ...]:  # Any: whatever the caller passed, checked here
        if isinstance(value, int) and not isinstance(value, bool):
            value = (value,)
        try:
            out = tuple(value)
        except TypeError:
            out = ()
        if not out or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in out):
            raise ValueError(f"{owner}: heads{where} must be non-empty head indices (ints >= 0), got {value!r}")
        return tuple(sorted(set(out)))

    if heads is None:
        return None
    if _is_pairs(heads):  # the stored form, as dataclasses.replace passes it back
        heads = dict(heads)
    if isinstance(heads, Mapping):
        if not heads:
            raise ValueError(f"{owner}: heads={{}} selects nothing; pass None for all heads")
        pairs = []
        for pattern, value in heads.items():
            if not isinstance(pattern, str):
                raise ValueError(f"{owner}: heads keys must be layer patterns (str), got {pattern!r}")
            _component_regex(pattern)  # validates the regex
            pairs.append((pattern, indices(value, f"[{pattern!r}]")))
        return tuple(pairs)
    return indices(heads, "")


def _is_pairs(heads: Any) -> bool:
    return (
        isinstance(heads, tuple)
        and bool(heads)
        and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in heads)
    )


@functools.lru_cache(maxsize=256)
def _layer_matches(pattern: str, layer: str) -> bool:
    return _component_regex(pattern).search(layer) is not None


@dataclass(frozen=True, kw_only=True)
class PerturbedAttention(AttentionMethod):
    """Base of the guidance methods: guidance settings plus "perturb the ``perturbed`` entries, leave the rest".

    ``scale``: guidance scale s of ``s * (cond - perturbed)`` (diffusers' ``pag_scale``); 0 disables the extra
    branch. ``adaptive_scale``: a of ``s_t = max(0, s - a * (1000 - t))`` on the 1000-step timestep scale
    (diffusers' ``pag_adaptive_scale``; 0 = constant s). ``layers``: anchored regexes over attention-module names
    (``None`` = the family's default, see :mod:`diffattn.guidance`). ``steps``: as in :func:`diffattn.apply`.
    """

    stack_level: ClassVar[int] = 0  # outermost: it expands the batch that the methods under it see
    expands_batch: ClassVar[bool] = True

    scale: float = 3.0
    adaptive_scale: float = 0.0
    layers: str | Sequence[str] | None = None
    heads: HeadSpec = None
    steps: StepSpec = None
    roles: frozenset[str] = field(default=_GUIDANCE_ROLES)

    def __post_init__(self) -> None:
        name = type(self).__name__
        for attr in ("scale", "adaptive_scale"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: {attr} must be a finite number >= 0, got {value!r}")
            object.__setattr__(self, attr, float(value))
        roles = check_roles_arg(self.roles, name)
        if not roles <= _GUIDANCE_ROLES:
            raise ValueError(
                f"{name}: guidance perturbs self-attention and joint attention only (cross-attention is never "
                f"perturbed); roles must be a subset of {sorted(_GUIDANCE_ROLES)}, got {sorted(roles)}"
            )
        object.__setattr__(self, "roles", roles)
        layers = self.layers
        if layers is not None:
            patterns = [layers] if isinstance(layers, str) else layers
            if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
                raise TypeError(
                    f"{name}: layers takes a regex string over attention-module names (e.g. 'mid_block') or a list "
                    f"of them, or None for the family's default layers; got {given(layers)}"
                )
            for pattern in patterns:
                _component_regex(pattern)  # a LayerSelectionError saying which pattern is not a regex
            layers = layers if isinstance(layers, str) else tuple(layers)
        heads = _normalise_heads(self.heads, name)
        if heads is not None and isinstance(heads[0], tuple):
            if layers is not None and layers != tuple(pattern for pattern, _ in heads):  # replace() passes them back
                raise ValueError(
                    f"{name}: heads given per layer ({{pattern: heads}}) already choose the layers; leave layers=None"
                )
            layers = tuple(pattern for pattern, _ in heads)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "heads", heads)
        object.__setattr__(self, "steps", StepSchedule.parse(self.steps))

    # -- guidance settings ---------------------------------------------------------------------------------------
    def scale_at(self, timestep: float) -> float:
        """The guidance scale at timestep ``t`` (on the 1000-step scale): ``max(0, s - a (1000 - t))``."""
        if self.adaptive_scale > 0 and self.scale > 0:
            return max(0.0, self.scale - self.adaptive_scale * (1000.0 - timestep))
        return self.scale

    @property
    def perturbs(self) -> bool:
        """False when the perturbed branch would equal the conditional one by construction (nothing to run)."""
        return self.scale > 0

    def heads_for(self, layer: str) -> tuple[int, ...] | None:
        """Global head indices perturbed in ``layer``; ``None`` = all heads."""
        heads = cast(_Heads, self.heads)  # the field is typed as given (HeadSpec); __post_init__ stored this form
        if heads is None or not isinstance(heads[0], tuple):
            return heads
        chosen: set[int] = set()
        for pattern, indices in heads:
            if _layer_matches(pattern, layer):
                chosen.update(indices)
        return tuple(sorted(chosen))

    # -- the attention core ---------------------------------------------------------------------------------------
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        roles = ctx.batch_roles
        if roles is None or PERTURBED not in roles:
            return ctx.dense(q, k, v)
        if len(roles) != q.shape[0]:
            raise LayoutError(
                f"{ctx.layer}: the attention call has batch {q.shape[0]} but the batch roles are {roles}; "
                "guidance needs the pipeline's own batch layout"
            )
        rows = torch.tensor([i for i, r in enumerate(roles) if r == PERTURBED], device=q.device)
        heads = self._local_heads(ctx, q.shape[1])
        if heads is not None and heads.numel() == 0:
            return ctx.dense(q, k, v)
        return self._perturb(q, k, v, ctx, rows, heads)

    def _perturb(
        self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext, rows: Tensor, heads: Tensor | None
    ) -> Tensor:
        raise NotImplementedError

    def _local_heads(self, ctx: AttentionContext, num_heads: int) -> Tensor | None:
        """The selected heads as indices into this call's heads (under Ulysses a call holds a slice of them)."""
        wanted = self.heads_for(ctx.layer)
        if wanted is None:
            return None
        offset = getattr(ctx, "head_offset", 0)
        total = getattr(ctx, "total_heads", None) or num_heads
        if max(wanted) >= total:
            raise LayerSelectionError(
                f"{type(self).__name__}: head {max(wanted)} requested on {ctx.layer}, which has {total} heads"
            )
        local = [h - offset for h in wanted if offset <= h < offset + num_heads]
        return torch.tensor(local, dtype=torch.long)


def _replace(out: Tensor, new: Tensor, rows: Tensor, heads: Tensor | None) -> Tensor:
    """``out`` with entries ``rows`` (and only ``heads`` of them, if given) taken from ``new`` (which has ``rows``)."""
    out = out.clone()
    if heads is None:
        out[rows] = new
    else:
        heads = heads.to(out.device)
        out[rows[:, None], heads[None, :]] = new[:, heads]
    return out
