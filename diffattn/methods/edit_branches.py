"""The batch of an editing method: a source and a target branch run in one batch (``ctx.branches`` names each entry;
see :func:`diffattn.editing.edit`); :func:`source_rows` pairs each target entry with the source entry it reads.

Editing methods use the facts of the call only: :func:`require_step` and :func:`require_roles` raise, saying how to
declare the fact, when the step of the call or the role of each batch entry is unknown (never a default in its
place). The methods that need them say so with ``requires_step`` / ``requires_roles``."""

from __future__ import annotations

import torch
from torch import Tensor

from ..context import AttentionContext
from ..errors import LayoutError, StepSelectionError

__all__ = ["source_rows", "require_step", "require_roles"]


def require_step(ctx: AttentionContext, owner: str) -> tuple[int, int]:
    """``(step, num_steps)`` of this call; raises :class:`StepSelectionError` with the fix when either is unknown."""
    if ctx.step is None or ctx.num_steps is None:
        raise StepSelectionError(
            f"{owner} on {ctx.layer}: needs the denoising step of this model call (step i of n), which is unknown "
            "(the model was not called from a diffusers pipeline's loop). Call it through the pipeline "
            "(diffattn.editing.edit / erase), or declare the step around each model call: "
            "`with diffattn.denoising_step(i, n): model(...)`, or diffusers' "
            "`with model.cache_context('cond', step_index=i, num_inference_steps=n): model(...)`"
        )
    return ctx.step, ctx.num_steps


def require_roles(ctx: AttentionContext, batch: int, owner: str) -> tuple[str, ...]:
    """The role (``"uncond"`` / ``"cond"``) of each of the ``batch`` entries of this call; raises
    :class:`LayoutError` with the fix when they are unknown."""
    roles = ctx.batch_roles
    if roles is None or len(roles) != batch:
        raise LayoutError(
            f"{owner} on {ctx.layer}: needs the role of each of the {batch} batch entries of this call (uncond / "
            f"cond), but the call declares {roles}. Call the model through a diffusers pipeline "
            "(diffattn.editing.edit), or declare the roles around each model call: "
            "`with diffattn.denoising_step(i, n, batch_roles=('uncond', 'cond')): model(...)`, or diffusers' "
            "`with model.cache_context('cond'): model(...)` for a batch of conditional entries"
        )
    return roles


def source_rows(
    ctx: AttentionContext, batch: int, source: str, target: str, owner: str = "an editing method"
) -> Tensor:
    """For every batch entry, the entry whose keys/values it reads: a target entry reads the source entry at the same
    place in the same CFG half (same role, same copy index); every other entry reads itself. Raises when the call
    does not say the branch and role of each entry, or has no ``source`` and ``target`` entries."""
    branches = ctx.branches
    if branches is None or len(branches) != batch:
        raise LayoutError(
            f"{ctx.layer}: {owner} needs the branch of each batch entry ({source} / {target}), but this call "
            f"declares {branches}. Run it through diffattn.editing.edit(pipe, source=..., target=..., method=...)"
        )
    if source not in branches or target not in branches:
        raise LayoutError(
            f"{ctx.layer}: {owner} reads the {source!r} branch into the {target!r} branch, but this call's branches "
            f"are {branches}; name the branches the call declares (source=..., target=...)"
        )
    roles = require_roles(ctx, batch, owner)
    index = list(range(batch))
    for role in dict.fromkeys(roles):
        members = [i for i in range(batch) if roles[i] == role]
        sources = [i for i in members if branches[i] == source]
        targets = [i for i in members if branches[i] == target]
        if targets and len(sources) != len(targets):
            raise LayoutError(
                f"{ctx.layer}: {len(targets)} {target} entries but {len(sources)} {source} entries in "
                f"the {role} entries of this call; edit one source per target"
            )
        for s, t in zip(sources, targets):
            index[t] = s
    return torch.tensor(index)
