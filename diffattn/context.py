"""What a method knows about one attention call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from .layout import TokenLayout

__all__ = ["Role", "AttentionContext", "ROLES"]

Role = Literal["self", "cross", "joint"]
ROLES: frozenset[str] = frozenset({"self", "cross", "joint"})


@dataclass(frozen=True)
class AttentionContext:
    """Everything a method may use besides q, k, v.

    ``q``/``k``/``v`` reach the method as ``(B, H, S, D)`` (SDPA layout). ``attn_mask``, ``scale`` and ``enable_gqa``
    are the stock call's arguments; ``dense(q, k, v)`` runs the stock attention core with them, unchanged.
    ``batch_roles`` names each batch entry (``"uncond"``, ``"cond"``) when the pipeline tells, else ``None``.

    Under Ulysses context parallelism a call holds ``q.shape[1]`` of the layer's ``total_heads`` heads, starting at
    ``head_offset`` (per-head parameters are sliced with them); without it ``head_offset`` is 0 and ``total_heads``
    is ``None`` (all heads are here). ``q_range = (start, stop)`` says the call holds only those query tokens of
    ``q_layout`` (a cross-attention call diffusers runs on this rank's sequence shard); ``None`` means all of them.
    """

    layer: str
    role: Role
    step: int
    num_steps: int | None
    q_layout: TokenLayout
    kv_layout: TokenLayout
    batch_roles: tuple[str, ...] | None
    attn_mask: Tensor | None
    scale: float | None
    enable_gqa: bool
    dense: Callable[[Tensor, Tensor, Tensor], Tensor]
    report: Callable[..., None] = lambda **metrics: None
    # ``report(density=0.1, ...)`` records per-layer numbers that ``handle.metrics()`` averages.
    head_offset: int = 0
    total_heads: int | None = None
    q_range: tuple[int, int] | None = None
    # The timestep of this call on the 0..1000 scale of diffusers' schedulers (Flux's model input t / 1000 is scaled
    # back) and the visual grid of the model's input (a UNet's highest resolution); ``None`` when unknown. Used by
    # ToDo's timestep gate and resolution levels.
    timestep: float | None = None
    input_grid: tuple[int, ...] | None = None
    # The branch of each batch entry (e.g. "source" / "target" in an edit), when the call declares them
    # (diffattn.editing); None otherwise.
    branches: tuple[str, ...] | None = None
    # Which application of the method this call belongs to (one per method and denoiser: Wan 2.2's two transformers
    # get two), for methods that keep state across calls (Rettention's calibration cache).
    application_id: int | None = None
