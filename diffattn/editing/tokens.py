"""Prompt tokens as the denoiser's attention sees them: which tokenizer makes the text sequence, where a word's
tokens sit, and the checks an edit makes on its prompts before anything runs."""

from __future__ import annotations

import difflib
from typing import Any

from ..methods.token_align import RefineMap, align_tokens

__all__ = [
    "text_tokenizer",
    "sequence_tokenizers",
    "find_tokens",
    "token_indices",
    "check_prompt_to_prompt",
    "refine_map",
]


def text_tokenizer(pipe: Any) -> Any:
    """The tokenizer whose tokens index the text sequence of the denoiser's attention: T5's for Flux (its joint
    attention sees T5 tokens only), the (first) CLIP tokenizer otherwise (SD3's sequence starts with CLIP's)."""
    if type(pipe).__name__.startswith("Flux") and getattr(pipe, "tokenizer_2", None) is not None:
        return pipe.tokenizer_2
    return pipe.tokenizer


def sequence_tokenizers(pipe: Any) -> tuple[Any, ...]:
    """Every tokenizer whose tokens take places in the text the denoiser attends to (SDXL's two CLIPs side by side,
    SD3's CLIPs then T5; Flux: T5 only, its CLIP gives the pooled embedding)."""
    if type(pipe).__name__.startswith("Flux") and getattr(pipe, "tokenizer_2", None) is not None:
        return (pipe.tokenizer_2,)
    return tuple(t for t in (getattr(pipe, f"tokenizer{s}", None) for s in ("", "_2", "_3")) if t is not None)


def _ids(tokenizer: Any, text: str, special: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special).input_ids)


def find_tokens(tokenizer: Any, ids: list[int], word: str) -> tuple[int, ...] | None:
    """The indices of the first run of ``word``'s tokens in ``ids``, or None."""
    word_ids = _ids(tokenizer, word, special=False)
    if not word_ids:
        return None
    for start in range(len(ids) - len(word_ids) + 1):
        if ids[start : start + len(word_ids)] == word_ids:
            return tuple(range(start, start + len(word_ids)))
    return None


def token_indices(pipe: Any, prompt: str, word: str) -> tuple[int, ...]:
    """The indices of the tokens of ``word`` in ``prompt`` in the text sequence the denoiser attends to (the
    tokenizer of :func:`text_tokenizer`: CLIP's, BOS = 0; Flux: T5's, no BOS), for :class:`~diffattn.PromptToPrompt`'s
    ``reweight``."""
    tokenizer = text_tokenizer(pipe)
    ids = _ids(tokenizer, prompt)
    found = find_tokens(tokenizer, ids, word)
    if found is None:
        raise ValueError(f"{word!r} is not a run of tokens of {prompt!r} for this tokenizer (tokens: {ids})")
    return found


def _count(tokenizer: Any, text: str) -> int:
    n = len(_ids(tokenizer, text))
    limit = getattr(tokenizer, "model_max_length", None)
    return min(n, limit) if isinstance(limit, int) and limit > 0 else n


def _tokens(n: int) -> str:
    return f"{n} token" + ("" if n == 1 else "s")


def _changed_words(tokenizer: Any, source: str, target: str) -> str:
    """The words that differ between the prompts, with their token counts: ``'red' (1 token) -> 'purple' (6
    tokens)``."""
    a, b = source.split(), target.split()

    def shown(words: list[str]) -> str:
        if not words:
            return "nothing"
        text = " ".join(words)
        return f"{text!r} ({_tokens(len(_ids(tokenizer, text, special=False)))})"

    changes = [
        f"{shown(a[i0:i1])} -> {shown(b[j0:j1])}"
        for op, i0, i1, j0, j1 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes()
        if op != "equal"
    ]
    return "; ".join(changes) if changes else "the same words, tokenized differently"


def _limited_ids(tokenizer: Any, text: str) -> list[int]:
    ids = _ids(tokenizer, text)
    limit = getattr(tokenizer, "model_max_length", None)
    return ids[:limit] if isinstance(limit, int) and limit > 0 else ids


def refine_map(pipe: Any, source: str, target: str) -> RefineMap:
    """The pairing of ``target``'s text tokens with ``source``'s (:func:`~diffattn.methods.token_align.align_tokens`)
    on the text sequence the denoiser attends to: CLIP's positions (SD1.5, SDXL: its two CLIPs share them; SD3's
    first ``model_max_length`` positions), then SD3's T5 positions after them; Flux: T5's."""
    first = text_tokenizer(pipe)
    segments = [(0, align_tokens(_limited_ids(first, source), _limited_ids(first, target)))]
    tokenizers = sequence_tokenizers(pipe)
    if first is pipe.tokenizer and len(tokenizers) == 3:  # SD3: CLIP-L and CLIP-G side by side, then T5
        t5, offset = tokenizers[2], getattr(first, "model_max_length", None)
        if not isinstance(offset, int) or offset <= 0:
            raise ValueError(f"refine: the CLIP tokenizer of {type(pipe).__name__} states no model_max_length")
        segments.append((offset, align_tokens(_limited_ids(t5, source), _limited_ids(t5, target))))
    return RefineMap(tuple(segments))


def check_prompt_to_prompt(pipe: Any, source: str, target: str, method: Any) -> None:
    """Refuse what Prompt-to-Prompt cannot do with these prompts: replacing cross-attention maps (copied token by
    token in word-swap mode) between prompts of different token counts, and re-weighting tokens the target prompt
    does not have."""
    if method.cross_replace > 0 and method.mode == "replace":
        for tokenizer in sequence_tokenizers(pipe):
            n_source, n_target = _count(tokenizer, source), _count(tokenizer, target)
            if n_source != n_target:
                raise ValueError(
                    f"{method.name}: the token counts differ ({type(tokenizer).__name__}: {n_source} in the source "
                    f"{source!r}, {n_target} in the target {target!r}): {_changed_words(tokenizer, source, target)}. "
                    f"Replacing cross-attention maps (cross_replace={method.cross_replace}) copies them token by "
                    "token, so swapped words must have the same number of tokens: choose such words "
                    "(diffattn.editing.token_indices shows a word's tokens). To add or remove words ('a red "
                    "circle' -> 'a big red circle'), use the refine mode, PromptToPrompt(mode='refine'), which "
                    "aligns the tokens and lets new words keep their own maps; or pass cross_replace=0.0 to keep "
                    "only self-attention injection and re-weighting"
                )
    if method.reweight:
        tokenizer = text_tokenizer(pipe)
        n = _count(tokenizer, target)
        outside = sorted({i for i, _ in method.reweight if i >= n})
        if outside:
            raise ValueError(
                f"{method.name}: reweight token indices {outside} are not tokens of the target {target!r}, which has "
                f"{_tokens(n)} (indices 0..{n - 1}); diffattn.editing.token_indices(pipe, target, word) gives a "
                "word's"
            )
