"""Parity of the editing methods with their authors' code (issue #29): each authors' rule is written out here from the
repository's construction (google/prompt-to-prompt), never through diffattn's helpers, and compared with the method's
option that follows it.

- Step rounding (rule 1): the authors' cross-attention schedule is a table of ``n + 1`` rows whose rows below
  ``int(c * (n + 1))`` are set; step i reads row i. Self-attention is replaced while ``int(0 * n) <= i < int(s * n)``.
  ``PromptToPrompt(rounding="authors")``; diffattn's default replaces steps ``i < ceil(f * n)``.
- Re-weight window (rule 2): the authors scale the replaced map (the source's) inside the cross-attention schedule
  only; after it the target's own map is used unscaled. ``PromptToPrompt(reweight_steps="cross_replace")``.
- Refine (rule 4): the authors align the two token sequences (score: gap 0, match 1, mismatch -1; traceback
  preferring a target gap, then a source gap, then the diagonal); a target token with a partner reads the partner's
  map, a new one keeps its own, positions after the target's tokens read the same position of the source.
  ``PromptToPrompt(mode="refine")`` with :func:`diffattn.methods.token_align.align_tokens`.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diffattn
from diffattn.context import AttentionContext
from diffattn.errors import LayoutError
from diffattn.layout import TokenLayout
from diffattn.methods.token_align import REFINE_MAP, RefineMap, align_tokens

TEXT = 6


def make_ctx(role: str, step: int, num_steps: int) -> AttentionContext:
    grid = TokenLayout((2, 2))
    kv = TokenLayout(text_len=TEXT) if role == "cross" else grid
    return AttentionContext(
        layer="up_blocks.0.attentions.0.transformer_blocks.0.attn2",
        role=role,
        step=step,
        num_steps=num_steps,
        q_layout=grid,
        kv_layout=kv,
        batch_roles=("cond", "cond"),
        attn_mask=None,
        scale=None,
        enable_gqa=False,
        dense=lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        branches=("source", "target"),
    )


def qkv(role: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    keys = TEXT if role == "cross" else 4
    q = torch.randn(2, 2, 4, 8, generator=g)
    return q, torch.randn(2, 2, keys, 8, generator=g), torch.randn(2, 2, keys, 8, generator=g)


def acting_steps(method, role: str, num_steps: int) -> set[int]:
    """The steps on which the method changes the target's output (maps of distinct random entries: a replaced map
    always changes it)."""
    q, k, v = qkv(role)
    out = set()
    for step in range(num_steps):
        got = method(q, k, v, make_ctx(role, step, num_steps))
        assert torch.equal(got[0], F.scaled_dot_product_attention(q, k, v)[0]), "the source is never edited"
        if not torch.allclose(got[1], F.scaled_dot_product_attention(q, k, v)[1], rtol=0, atol=1e-6):
            out.add(step)
    return out


# ------------------------------------------------------------------------------------------------ rule 1: rounding


def authors_cross_steps(fraction: float, num_steps: int) -> set[int]:
    """The authors' cross-attention schedule: ``n + 1`` rows, the rows from int(0 * rows) to int(c * rows) set to 1
    (a float ``c`` is the window (0, c)); step i uses row i."""
    rows = num_steps + 1
    table = torch.zeros(rows)
    start, end = int(0.0 * rows), int(fraction * rows)
    table[start:end] = 1
    return {i for i in range(num_steps) if table[i] == 1}


def authors_self_steps(fraction: float, num_steps: int) -> set[int]:
    """The authors' self-attention window: ``int(n * 0) <= step < int(n * s)``."""
    low, high = int(num_steps * 0.0), int(num_steps * fraction)
    return {i for i in range(num_steps) if low <= i < high}


FRACTIONS = [0.0, 0.05, 0.1, 0.2, 0.25, 0.29, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]


def test_authors_rounding_replaces_the_authors_step_sets():
    for n in range(1, 51):
        for f in FRACTIONS:
            method = diffattn.PromptToPrompt(cross_replace=f, self_replace=f, rounding="authors")
            assert set(range(method.replace_steps(n, "cross"))) == authors_cross_steps(f, n), (f, n)
            assert set(range(method.replace_steps(n, "self"))) == authors_self_steps(f, n), (f, n)


@pytest.mark.parametrize("fraction, num_steps", [(0.35, 10), (0.8, 10), (0.4, 10), (0.29, 100), (1.0, 4), (0.5, 3)])
def test_authors_rounding_in_the_attention_calls(fraction, num_steps):
    """What the method does at each step (cross and self roles), against the authors' sets."""
    cross = diffattn.PromptToPrompt(cross_replace=fraction, self_replace=0.0, rounding="authors")
    self_ = diffattn.PromptToPrompt(cross_replace=0.0, self_replace=fraction, rounding="authors")
    assert acting_steps(cross, "cross", num_steps) == authors_cross_steps(fraction, num_steps)
    assert acting_steps(self_, "self", num_steps) == authors_self_steps(fraction, num_steps)


def test_default_rounding_is_ceil_and_differs_where_the_issue_says():
    # 0.35 of 10 steps: the authors replace steps 0-2, diffattn's default 0-3 (issue #29)
    default = diffattn.PromptToPrompt(cross_replace=0.35, self_replace=0.35)
    assert default.rounding == "ceil"
    assert acting_steps(default, "cross", 10) == {0, 1, 2, 3}
    assert acting_steps(default, "self", 10) == {0, 1, 2, 3}
    assert authors_cross_steps(0.35, 10) == {0, 1, 2} == authors_self_steps(0.35, 10)
    # the rules part often: count the (fraction, steps) pairs of the grid where the step sets differ
    differ = {
        kind: sum(
            set(range(math.ceil(f * n - 1e-9))) != authors(f, n) for n in range(1, 51) for f in FRACTIONS if f > 0
        )
        for kind, authors in (("cross", authors_cross_steps), ("self", authors_self_steps))
    }
    assert differ["cross"] > 100 and differ["self"] > 100, differ


# ------------------------------------------------------------------------------------------------ rule 2: re-weight


def authors_reweight_output(q, k, v, step, num_steps, cross, token, weight):
    """The target's cross-attention output in the authors' AttentionReweight (word swap of equal prompts, no
    previous controller): inside the schedule the source's map times the equaliser, else its own map as is."""
    scale = q.shape[-1] ** -0.5
    own = (q[1] @ k[1].transpose(-1, -2) * scale).softmax(-1)
    base = (q[0] @ k[0].transpose(-1, -2) * scale).softmax(-1)
    equalizer = torch.ones(k.shape[-2])
    equalizer[token] = weight
    rows = num_steps + 1
    in_schedule = step < int(cross * rows)
    attn = base * equalizer if in_schedule else own
    return attn @ v[1]


@pytest.mark.parametrize("cross", [0.0, 0.35, 0.8, 1.0])
def test_reweight_inside_the_replace_schedule_equals_the_authors(cross):
    num_steps, token, weight = 10, 2, 3.0
    method = diffattn.PromptToPrompt(
        cross_replace=cross,
        self_replace=0.0,
        reweight=((token, weight),),
        rounding="authors",
        reweight_steps="cross_replace",
    )
    q, k, v = qkv("cross", seed=1)
    for step in range(num_steps):
        got = method(q, k, v, make_ctx("cross", step, num_steps))[1]
        expected = authors_reweight_output(q, k, v, step, num_steps, cross, token, weight)
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)


def test_default_reweight_scales_every_step():
    num_steps, token, weight = 10, 2, 3.0
    method = diffattn.PromptToPrompt(cross_replace=0.35, self_replace=0.0, reweight=((token, weight),))
    assert method.reweight_steps == "all"
    q, k, v = qkv("cross", seed=1)
    scale = 8**-0.5
    own = (q[1] @ k[1].transpose(-1, -2) * scale).softmax(-1)
    own[..., token] *= weight
    for step in (5, 9):  # after the window: the target's own map, scaled (not the authors' rule)
        got = method(q, k, v, make_ctx("cross", step, num_steps))[1]
        torch.testing.assert_close(got, own @ v[1], rtol=0, atol=2e-6)
        assert not torch.allclose(got, authors_reweight_output(q, k, v, step, num_steps, 0.35, token, weight))


# ------------------------------------------------------------------------------------------------ rule 4: refine


def authors_alignment(x: list, y: list) -> list[tuple[int, int]]:
    """The authors' global alignment of source ``x`` and target ``y``: a score table (gap 0, match 1, mismatch
    -1), traced back from the end preferring a step left (target token unpaired), then up (source token dropped),
    then the diagonal; returns (target position, source position or -1) for every target position."""
    gap, match, mismatch = 0, 1, -1
    score = np.zeros((len(x) + 1, len(y) + 1), dtype=np.int64)
    score[0, :] = np.arange(len(y) + 1) * gap
    score[:, 0] = np.arange(len(x) + 1) * gap
    move = np.zeros_like(score)
    move[0, 1:], move[1:, 0] = 1, 2
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            options = (
                score[i, j - 1] + gap,
                score[i - 1, j] + gap,
                score[i - 1, j - 1] + (match if x[i - 1] == y[j - 1] else mismatch),
            )
            score[i, j] = max(options)
            move[i, j] = 1 + options.index(score[i, j])  # first of left, up, diagonal reaching the best
    pairs = []
    i, j = len(x), len(y)
    while i > 0 or j > 0:
        if move[i, j] == 3:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif move[i, j] == 1:
            j -= 1
            pairs.append((j, -1))
        else:
            i -= 1
    return pairs[::-1]


def authors_mapper(x_ids: list[int], y_ids: list[int], max_len: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    """Their mapper and alphas over ``max_len`` text positions: aligned positions first, then position p -> p."""
    pairs = torch.tensor(authors_alignment(x_ids, y_ids), dtype=torch.int64)
    alphas = torch.ones(max_len)
    alphas[: len(pairs)] = (pairs[:, 1] != -1).float()
    mapper = torch.zeros(max_len, dtype=torch.int64)
    mapper[: len(pairs)] = pairs[:, 1]
    mapper[len(pairs) :] = len(y_ids) + torch.arange(max_len - len(y_ids))
    return mapper, alphas


# the paper's refinement edits ("adding a new phrase"), words as tokens; BOS / EOS as the tokenizer adds them
PAPER_EXAMPLES = [
    ("a red circle", "a big red circle", [0, 1, None, 2, 3, 4]),
    ("a car on the side of the street", "a crushed car on the side of the street", [0, 1, None, *range(2, 10)]),
    (
        "a photo of a house on a mountain",
        "a photo of a house on a mountain at winter",
        [*range(0, 9), None, None, 9],
    ),
    ("a big red circle", "a red circle", [0, 1, 3, 4, 5]),  # removing a word: every target token has a partner
    ("a cat", "a cat and a cat", [0, 1, 2, None, None, None, 3]),  # repeats: the earlier copies are paired
    ("a cat", "a dog", [0, 1, None, 3]),  # a swap is "drop cat, add dog" (no mismatch pairs)
]


@pytest.mark.parametrize("source, target, expected", PAPER_EXAMPLES, ids=[e[1] for e in PAPER_EXAMPLES])
def test_aligner_on_the_papers_examples(source, target, expected):
    x, y = ["<bos>", *source.split(), "<eos>"], ["<bos>", *target.split(), "<eos>"]
    got = align_tokens(x, y)
    assert list(got) == expected
    assert [s if s is not None else -1 for s in got] == [s for _, s in authors_alignment(x, y)]


def test_aligner_equals_the_authors_on_random_sequences():
    rng = np.random.default_rng(0)
    for _ in range(300):
        x = rng.integers(0, 4, rng.integers(0, 9)).tolist()
        y = rng.integers(0, 4, rng.integers(0, 9)).tolist()
        got = [s if s is not None else -1 for s in align_tokens(x, y)]
        assert got == [s for _, s in authors_alignment(x, y)], (x, y)


@functools.cache
def sd_pipeline():
    from diffattn.testing import tiny_pipeline

    pipe = tiny_pipeline("sd", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("source, target", [(s, t) for s, t, _ in PAPER_EXAMPLES])
def test_refine_map_equals_the_authors_mapper_on_clip_tokens(source, target):
    pipe = sd_pipeline()
    encode = pipe.tokenizer.encode
    mapper, alphas = authors_mapper(encode(source), encode(target))
    index, alpha = diffattn.editing.refine_map(pipe, source, target).tensors(77)
    assert torch.equal(alpha, alphas)
    kept = alphas == 1
    assert torch.equal(index[kept], mapper[kept])  # where alpha is 0 the authors index -1: never read


def test_refine_output_equals_the_authors_refinement():
    """Cross-attention of one target entry: the source's map gathered through the mapper where alpha is 1, its own
    map where alpha is 0 (the authors' AttentionRefine), inside the schedule; its own map after."""
    pairing = RefineMap(((0, (0, None, 1, 2)),))  # 4 target tokens, the second new; positions 4, 5 read 4, 5
    method = diffattn.PromptToPrompt(cross_replace=0.5, self_replace=0.0, mode="refine", rounding="authors")
    mapper = torch.tensor([0, -1, 1, 2, 4, 5])
    alphas = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    q, k, v = qkv("cross", seed=2)
    scale = 8**-0.5
    own = (q[1] @ k[1].transpose(-1, -2) * scale).softmax(-1)
    base = (q[0] @ k[0].transpose(-1, -2) * scale).softmax(-1)
    token = REFINE_MAP.set(pairing)
    try:
        for step in range(10):
            got = method(q, k, v, make_ctx("cross", step, 10))[1]
            attn = base[..., mapper] * alphas + own * (1 - alphas) if step < int(0.5 * 11) else own
            torch.testing.assert_close(got, attn @ v[1], rtol=0, atol=2e-6)
    finally:
        REFINE_MAP.reset(token)
    with pytest.raises(LayoutError, match="mode='refine' needs the pairing"):
        method(q, k, v, make_ctx("cross", 0, 10))


def _run(source, target, method, kind="sd"):
    pipe = sd_pipeline() if kind == "sd" else _pipeline(kind)
    return diffattn.editing.edit(
        pipe, source, target, method, seed=0, num_inference_steps=3, height=32, width=32, guidance_scale=5.0
    )


@functools.cache
def _pipeline(kind):
    from diffattn.testing import tiny_pipeline

    pipe = tiny_pipeline(kind, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3", "flux"])
def test_refine_edit_keeps_the_source_and_changes_the_target(kind):
    method = diffattn.PromptToPrompt(mode="refine", cross_replace=1.0, self_replace=0.0)
    plain = _run("a red circle", "a big red circle", None, kind)
    refined = _run("a red circle", "a big red circle", method, kind)
    assert np.array_equal(refined.source, plain.source), "the source branch is bit-identical"
    assert np.abs(refined.target - plain.target).max() > 1e-5
    assert np.isfinite(refined.target).all()


def test_refine_with_equal_prompts_is_word_swap():
    """Equal token sequences pair every token with itself: refine is the word-swap replace, bitwise."""
    swap = _run("a red circle", "a red circle", diffattn.PromptToPrompt(cross_replace=1.0, self_replace=0.5))
    refine = _run(
        "a red circle", "a red circle", diffattn.PromptToPrompt(cross_replace=1.0, self_replace=0.5, mode="refine")
    )
    assert np.array_equal(swap.target, refine.target)


def test_word_swap_with_unequal_token_counts_refuses_and_names_refine():
    with pytest.raises(ValueError, match=r"token counts differ.*mode='refine'"):
        _run("a red circle", "a big red circle", diffattn.PromptToPrompt())


def test_new_parameters_are_checked():
    with pytest.raises(ValueError, match=r"mode must be one of \['replace', 'refine'\].*mode='refine'"):
        diffattn.PromptToPrompt(mode="add")
    with pytest.raises(TypeError, match="rounding must be one of"):
        diffattn.PromptToPrompt(rounding=1)
    with pytest.raises(ValueError, match=r"rounding must be one of \['ceil', 'authors'\]"):
        diffattn.PromptToPrompt(rounding="floor")
    with pytest.raises(ValueError, match=r"reweight_steps must be one of \['all', 'cross_replace'\]"):
        diffattn.PromptToPrompt(reweight_steps="window")
