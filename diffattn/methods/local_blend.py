"""Prompt-to-Prompt's local blending: :class:`LocalBlend`, the words whose region of the target may change."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .checks import check_bool, check_int, check_number

__all__ = ["LocalBlend", "WordSpec", "word_spec", "split_words"]

#: Words of both prompts (``("circle", "square")``), or of each (``(source_words, target_words)``).
WordSpec = tuple[str, ...] | tuple[tuple[str, ...], tuple[str, ...]]


def _bad_words(words: object, owner: str, field: str) -> ValueError:
    return ValueError(
        f"{owner}: {field} are words (str) or one tuple of words per prompt, got {words!r}; e.g. "
        f"{field}='circle', {field}=('circle', 'square') or {field}=(('circle',), ('square',))"
    )


def _word_group(words: object, owner: str, field: str) -> tuple[str, ...]:
    if isinstance(words, str):
        return (words,)
    if isinstance(words, Sequence) and all(isinstance(w, str) for w in words):
        return tuple(words)
    raise _bad_words(words, owner, field)


def word_spec(words: object, owner: str, field: str = "words") -> WordSpec:
    """``words`` in canonical form: a plain string is one word (never its letters); a sequence of strings is words
    of both prompts; a pair whose items are a string or a sequence of strings is ``(source_words, target_words)``."""
    if isinstance(words, str) or (isinstance(words, Sequence) and all(isinstance(w, str) for w in words)):
        spec: WordSpec = _word_group(words, owner, field)
    elif isinstance(words, Sequence) and len(words) == 2:
        spec = (_word_group(words[0], owner, field), _word_group(words[1], owner, field))
    else:
        raise _bad_words(words, owner, field)
    if any(not w.strip() for group in split_words(spec) for w in group):
        raise ValueError(f"{owner}: {field} holds an empty word: {words!r}; name words of the prompts")
    return spec


def split_words(words: WordSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(source_words, target_words)`` of a canonical :func:`word_spec`."""
    if all(isinstance(w, str) for w in words):
        same = tuple(w for w in words if isinstance(w, str))  # all of them; the filter types them as str
        return same, same
    source, target = words
    return tuple(source), tuple(target)


@dataclass(frozen=True)
class LocalBlend:
    """Prompt-to-Prompt's local blending: the cross-attention maps of ``words`` (in the source and in the target
    prompt: a word found in either counts; or ``(source_words, target_words)``; a plain string is one word) are
    summed over heads, layers with at most ``max_tokens`` queries and the steps so far, max-pooled 3 x 3, resized to
    the latents, max-normalised and thresholded at ``threshold``; the mask is the union of the source's and the
    target's. From ``start`` (fraction of the steps the pipeline call runs) on, after every step the target's
    latents become ``source + mask * (target - source)``: outside the mask they are the source's exactly. Run by
    :func:`diffattn.editing.edit` with a :class:`PromptToPrompt` whose ``local_blend`` is set.

    ``faithful=True``: the authors' rule. Only the layers with exactly ``max_tokens`` queries outside the mid block
    (SD1.5 at 512 px: the five 16 x 16 layers of ``down_blocks.2`` and ``up_blocks.1``) are summed, at their own
    grid; the sum is max-pooled 3 x 3 there, upsampled nearest to the latents, divided by its max and thresholded
    (``> threshold``); blending starts at step ``int(start * n)`` (0-based; their counter exceeds
    ``int(start_blend * n)``), not ``ceil(start * n) - 1``. The default (``False``) sums every layer with at most
    ``max_tokens`` queries (mid block included), each resized bilinearly to the latents, then max-pools 3 x 3 on
    the latent grid (a dilation by one latent pixel)."""

    words: WordSpec = ()
    threshold: float = 0.3
    start: float = 0.2
    max_tokens: int = 256
    faithful: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "words", word_spec(self.words, "LocalBlend"))
        check_number(
            "LocalBlend", "threshold", self.threshold, low=0.0, high=1.0, low_open=True, high_open=True, example=0.3
        )
        check_number(
            "LocalBlend", "start", self.start, low=0.0, high=1.0, example=0.2, meaning="a fraction of the steps"
        )
        check_int("LocalBlend", "max_tokens", self.max_tokens, minimum=1, example=256, meaning="a query count")
        check_bool("LocalBlend", "faithful", self.faithful, "True: the authors' 16 x 16 mask and start step")
        if not any(self.split()):
            raise ValueError(
                "LocalBlend: name the words whose region may change, e.g. LocalBlend(words=('circle', "
                "'square')) for 'a red circle' -> 'a red square'"
            )
        if not 0.0 < self.threshold < 1.0 or not 0.0 <= self.start <= 1.0:
            raise ValueError(f"LocalBlend: threshold in (0, 1) and start in [0, 1], got {self.threshold}, {self.start}")

    def starts_at(self, step: int, num_steps: int) -> bool:
        """Whether the blending runs after step ``step`` (0-based) of ``num_steps``: from ``ceil(start * n) - 1`` on,
        or with ``faithful`` from the authors' ``int(start * n)`` on."""
        if self.faithful:
            return step >= int(self.start * num_steps)
        return step + 1 >= math.ceil(self.start * num_steps - 1e-9)

    def split(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``(source_words, target_words)``."""
        return split_words(self.words)
