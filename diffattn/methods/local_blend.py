"""Prompt-to-Prompt's local blending: :class:`LocalBlend`, the words whose region of the target may change."""

from __future__ import annotations

from dataclasses import dataclass

from .checks import check_int, check_number, check_words

__all__ = ["LocalBlend"]


@dataclass(frozen=True)
class LocalBlend:
    """Prompt-to-Prompt's local blending: the cross-attention maps of ``words`` (in the source and in the target
    prompt: a word found in either counts; or ``(source_words, target_words)``) are summed over heads, layers with at
    most ``max_tokens`` queries and the steps so far, max-pooled 3 x 3, resized to the latents, max-normalised and
    thresholded at ``threshold``; the mask is the union of the source's and the target's. From ``start`` (fraction
    of the steps) on, after every step the target's latents become ``source + mask * (target - source)``: outside
    the mask they are the source's exactly. Run by :func:`diffattn.editing.edit` with a
    :class:`PromptToPrompt` whose ``local_blend`` is set."""

    words: tuple[str, ...] | tuple[tuple[str, ...], tuple[str, ...]] = ()
    threshold: float = 0.3
    start: float = 0.2
    max_tokens: int = 256

    def __post_init__(self) -> None:
        check_words("LocalBlend", "words", self.words, example="('circle', 'square')")
        check_number(
            "LocalBlend", "threshold", self.threshold, low=0.0, high=1.0, low_open=True, high_open=True, example=0.3
        )
        check_number(
            "LocalBlend", "start", self.start, low=0.0, high=1.0, example=0.2, meaning="a fraction of the steps"
        )
        check_int("LocalBlend", "max_tokens", self.max_tokens, minimum=1, example=256, meaning="a query count")
        if not self.words:
            raise ValueError(
                "LocalBlend: name the words whose region may change, e.g. LocalBlend(words=('circle', "
                "'square')) for 'a red circle' -> 'a red square'"
            )
        if not 0.0 < self.threshold < 1.0 or not 0.0 <= self.start <= 1.0:
            raise ValueError(f"LocalBlend: threshold in (0, 1) and start in [0, 1], got {self.threshold}, {self.start}")

    def split(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        if all(isinstance(w, str) for w in self.words):
            words = tuple(w for w in self.words if isinstance(w, str))  # all of them; the filter types them as str
            return words, words
        source, target = self.words
        return tuple(source), tuple(target)
