"""Token alignment for Prompt-to-Prompt's refinement edit ("a red circle" -> "a big red circle").

The paper (Hertz et al., Prompt-to-Prompt, Sec. 3.2, "Adding a new phrase") pairs each token of the target prompt
with the token of the source prompt it corresponds to, or with none: a target token that has a partner takes the
partner's cross-attention map, a new token keeps its own. :func:`align_tokens` finds that pairing as an alignment of
the two token sequences that keeps the most tokens paired (tokens pair only with equal tokens, order kept: a longest
common subsequence). :class:`RefineMap` places the pairing on the text sequence a layer attends to, and
``REFINE_MAP`` holds the one of the running :func:`diffattn.editing.edit` call."""

from __future__ import annotations

import contextvars
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["align_tokens", "RefineMap", "REFINE_MAP"]


def align_tokens(source: Sequence[Hashable], target: Sequence[Hashable]) -> tuple[int | None, ...]:
    """For each position of ``target``, the position of the ``source`` token it is paired with, or None (a new
    token).

    Pairs join equal tokens, keep the order of both sequences, and are as many as possible. Where several pairings
    have that many pairs (repeated tokens: "a photo of a cat" -> "a photo of a cat and a dog"), the one found
    walking both sequences back from their ends, leaving a target token unpaired whenever that loses no pair, else
    a source token, else pairing the two: the later copies of a repeated token stay new, the earlier ones are
    paired (the tie rule of the authors' aligner, which scores a gap 0, a match 1 and a mismatch -1: a mismatch
    never pays, so theirs keeps the most pairs too)."""
    src, tgt = list(source), list(target)
    n, m = len(src), len(tgt)
    # best[i][j]: the most pairs between src[:i] and tgt[:j]
    best = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, above = best[i], best[i - 1]
        for j in range(1, m + 1):
            row[j] = max(row[j - 1], above[j], above[j - 1] + 1 if src[i - 1] == tgt[j - 1] else 0)
    paired: list[int | None] = [None] * m
    i, j = n, m
    while i > 0 and j > 0:
        if best[i][j] == best[i][j - 1]:
            j -= 1  # target token j - 1 stays new
        elif best[i][j] == best[i - 1][j]:
            i -= 1  # source token i - 1 is dropped
        else:  # only pairing keeps the count: the tokens are equal
            i, j = i - 1, j - 1
            paired[j] = i
    return tuple(paired)


@dataclass(frozen=True)
class RefineMap:
    """The pairing of the target's text tokens with the source's, for each run of positions one tokenizer fills:
    ``segments`` holds ``(offset, pairing)``, the pairing as :func:`align_tokens` gives it for the target tokens at
    ``offset, offset + 1, ...`` (source positions counted from the same offset). Every other position (the padding
    after the target's tokens) reads the source at the same position, as in the authors' mapper."""

    segments: tuple[tuple[int, tuple[int | None, ...]], ...]

    def tensors(self, text_len: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """``(index, alpha)`` over ``text_len`` text positions: target position j takes the source's map at
        ``index[j]`` where ``alpha[j] == 1`` and keeps its own where ``alpha[j] == 0``."""
        index = torch.arange(text_len)
        alpha = torch.ones(text_len)
        for offset, pairing in self.segments:
            for j, s in enumerate(pairing):
                position = offset + j
                if position >= text_len:
                    break
                if s is None or offset + s >= text_len:
                    alpha[position] = 0.0
                else:
                    index[position] = offset + s
        return index.to(device), alpha.to(device)


REFINE_MAP: contextvars.ContextVar[RefineMap | None] = contextvars.ContextVar("diffattn_refine_map", default=None)
