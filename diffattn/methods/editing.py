"""Editing methods: a source and a target branch run in one batch (``ctx.branches`` names each entry; see
:func:`diffattn.editing.edit`), and the method makes the target borrow from the source inside attention."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ..context import AttentionContext
from ..errors import LayoutError
from .base import AttentionMethod, check_roles

__all__ = ["MutualSelfAttention", "source_rows"]

_SELF_AND_JOINT = frozenset({"self", "joint"})


def source_rows(ctx: AttentionContext, batch: int, source: str, target: str) -> Tensor | None:
    """For every batch entry, the entry whose keys/values it reads: a target entry reads the source entry at the same
    place in the same CFG half (same role, same copy index); every other entry reads itself. None without a target."""
    branches = ctx.branches
    if branches is None or len(branches) != batch:
        raise LayoutError(
            f"{ctx.layer}: an editing method needs the branch of each batch entry (source / target), but this call "
            f"declares {branches}. Run it through diffattn.editing.edit(pipe, source=..., target=..., method=...)"
        )
    roles = ctx.batch_roles if ctx.batch_roles is not None and len(ctx.batch_roles) == batch else ("?",) * batch
    index = list(range(batch))
    found = False
    for role in dict.fromkeys(roles):
        members = [i for i in range(batch) if roles[i] == role]
        sources = [i for i in members if branches[i] == source]
        targets = [i for i in members if branches[i] == target]
        if targets and len(sources) != len(targets):
            raise LayoutError(f"{ctx.layer}: {len(targets)} {target} entries but {len(sources)} {source} entries in "
                              f"the {role} entries of this call; edit one source per target")
        for s, t in zip(sources, targets):
            index[t] = s
            found = True
    return torch.tensor(index) if found else None


@dataclass(frozen=True)
class MutualSelfAttention(AttentionMethod):
    """MasaCtrl's mutual self-attention: from ``start_step`` on, the target branch's self-attention queries the
    source branch's keys and values (per CFG half), so the target keeps the source's content and identity while its
    prompt changes layout or pose; the source reconstructs itself exactly.

    Layers are chosen with ``layers=`` (MasaCtrl: SD's decoder self-attention, ``up_blocks``; the default of
    :func:`diffattn.editing.edit` for UNets; the later half of the blocks for transformers). On joint attention
    (SD3, Flux) only the visual keys/values are taken from the source: the target's text tokens still condition it.
    Runs on SD1.5, SDXL, SD3 and Flux (tested); any model with self- or joint-attention works the same way.
    """

    start_step: int = 4
    source: str = "source"
    target: str = "target"
    roles: frozenset[str] = field(default=_SELF_AND_JOINT)
    stack_level: ClassVar[int] = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "roles", check_roles(self.roles, self.name, _SELF_AND_JOINT))
        if isinstance(self.start_step, bool) or not isinstance(self.start_step, int) or self.start_step < 0:
            raise ValueError(f"{self.name}: start_step must be an int >= 0, got {self.start_step!r}")

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        if ctx.step is not None and ctx.step < self.start_step:
            return ctx.dense(q, k, v)
        index = source_rows(ctx, q.shape[0], self.source, self.target)
        if index is None:
            return ctx.dense(q, k, v)
        index = index.to(k.device)
        if ctx.role == "joint":  # target text keys stay the target's; its image keys/values are the source's
            visual = ctx.kv_layout.visual_slice
            k, v = k.clone(), v.clone()
            k[:, :, visual] = k.index_select(0, index)[:, :, visual]
            v[:, :, visual] = v.index_select(0, index)[:, :, visual]
        else:
            k, v = k.index_select(0, index), v.index_select(0, index)
        return ctx.dense(q, k, v)
