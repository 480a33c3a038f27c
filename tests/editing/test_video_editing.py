"""Editing on a video pipeline (Wan): the cond and uncond passes are separate model calls inside
``transformer.cache_context("cond" / "uncond")``, so each call's batch holds one role and both branches. Prompt-to-
Prompt and MasaCtrl must see those facts and act; the word masks, which are 2-D, are refused for videos."""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import pytest
import torch

import diffattn
from diffattn.api import attention_modules
from diffattn.editing import edit
from diffattn.errors import LayoutError
from diffattn.methods.edit_maps import BlendStore
from diffattn.testing import tiny_pipeline

SOURCE, TARGET = "a red circle on the left", "a blue circle on the left"
STEPS = 3


@functools.cache
def wan():
    pipe = tiny_pipeline("wan", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(source: str, target: str, method, **extra):
    kwargs = dict(num_inference_steps=STEPS, num_frames=5, height=32, width=32, guidance_scale=5.0)
    kwargs.update(extra)
    return edit(wan(), source, target, method, seed=0, **kwargs)


def spying(base: type, seen: list) -> type:
    """``base`` recording what each attention call tells it (layer role, step, batch roles, branches)."""

    class Spy(base):
        def __call__(self, q, k, v, ctx):
            seen.append((ctx.role, ctx.step, ctx.num_steps, ctx.batch_roles, ctx.branches))
            return super().__call__(q, k, v, ctx)

    return Spy


def test_prompt_to_prompt_acts_on_wans_separate_cond_and_uncond_calls():
    seen: list = []
    method = spying(diffattn.PromptToPrompt, seen)(cross_replace=1.0, self_replace=1.0, self_max_tokens=4096)
    plain = run(SOURCE, TARGET, None)
    edited = run(SOURCE, TARGET, method)
    assert edited.target.ndim == 4, "a video: frames x height x width x 3"
    assert np.array_equal(edited.source, plain.source), "the source branch is untouched (invariant 23)"
    assert np.abs(edited.target - plain.target).max() > 1e-5, "the target takes the source's maps"
    calls = Counter((role, roles, branches) for role, _, _, roles, branches in seen)
    layers = len(attention_modules(wan().transformer)) // 2  # one self and one cross per block
    for role in ("self", "cross"):
        for half in ("cond", "uncond"):
            assert calls[(role, (half, half), ("source", "target"))] == layers * STEPS, (role, half, calls)
    assert {(step, n) for _, step, n, _, _ in seen} == {(i, STEPS) for i in range(STEPS)}


def test_prompt_to_prompt_replace_with_the_source_prompt_is_the_identity_on_video():
    same = run(SOURCE, SOURCE, diffattn.PromptToPrompt(cross_replace=1.0, self_replace=1.0, self_max_tokens=4096))
    np.testing.assert_allclose(same.target, same.source, rtol=0, atol=1e-5)


def test_masactrl_acts_on_wans_later_blocks_in_both_cfg_calls():
    seen: list = []
    method = spying(diffattn.MutualSelfAttention, seen)(start_step=0)
    target = "a red circle on the right"
    plain = run(SOURCE, target, None)
    edited = run(SOURCE, target, method)
    assert np.array_equal(edited.source, plain.source)
    assert np.abs(edited.target - plain.target).max() > 1e-5, "the target reads the source's keys and values"
    halves = Counter(roles for role, _, _, roles, branches in seen if branches == ("source", "target"))
    assert halves[("cond", "cond")] == halves[("uncond", "uncond")] > 0 and len(halves) == 2
    assert all(role == "self" for role, *_ in seen)
    same = run(SOURCE, SOURCE, diffattn.MutualSelfAttention(start_step=0))
    np.testing.assert_allclose(same.target, same.source, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "method",
    [
        diffattn.PromptToPrompt(local_blend=diffattn.LocalBlend(words=("circle",))),
        diffattn.MutualSelfAttention(start_step=0, mask_words=("circle",)),
    ],
    ids=["local_blend", "mask_words"],
)
def test_word_masks_are_refused_on_video_pipelines_with_the_reason(method):
    with pytest.raises(ValueError, match="makes videos .*num_frames.* not supported; run "):
        run(SOURCE, TARGET, method)


def test_blend_store_refuses_a_video_grid_instead_of_skipping_it():
    store = BlendStore({"source": (1,)}, (4, 4), diffattn.LocalBlend(words=("x",)))
    with pytest.raises(LayoutError, match="word maps are 2-D"):
        store.add("source", 0, torch.rand(2, 2 * 4 * 4, 3).softmax(-1), (2, 4, 4), layer="blocks.0.attn2")
    store.add("source", 0, torch.rand(2, 16, 3).softmax(-1), (4, 4), layer="up_blocks.0.attn2")
    assert store.recorded
