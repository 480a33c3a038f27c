"""The batch of an editing method: a source and a target branch run in one batch (``ctx.branches`` names each entry;
see :func:`diffattn.editing.edit`); :func:`source_rows` pairs each target entry with the source entry it reads."""

from __future__ import annotations

import torch
from torch import Tensor

from ..context import AttentionContext
from ..errors import LayoutError

__all__ = ["source_rows"]


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
            raise LayoutError(
                f"{ctx.layer}: {len(targets)} {target} entries but {len(sources)} {source} entries in "
                f"the {role} entries of this call; edit one source per target"
            )
        for s, t in zip(sources, targets):
            index[t] = s
            found = True
    return torch.tensor(index) if found else None
