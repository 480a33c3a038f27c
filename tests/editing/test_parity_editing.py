"""Parity of the editing methods with their authors' code (issue #29, rules 3, 5 and 6): each authors' rule is written
out here from their repositories' construction (never through diffattn's helpers) and compared with diffattn's
``faithful=True`` mode; the defaults keep diffattn's own rules, which the tests pin too.

- Attentive Eraser (Anonym0u3/AttentiveEraser, ``AAS.attn_batch``): similarity suppression while
  ``cur_step <= ss_steps`` (``cur_step`` counts from 0).
- Prompt-to-Prompt's LocalBlend (google/prompt-to-prompt, ``LocalBlend.__call__``): the word maps of the down- and
  up-block layers at 16 x 16 (no mid block), averaged over heads and layers, summed over the steps so far; a 3 x 3
  max-pool (stride 1, padding 1) at 16 x 16; nearest upsampling to the latents; divided by the max; ``> th``; the
  union of the source's and the target's; blended from the step whose 1-based counter exceeds
  ``int(start_blend * steps)``.
- MasaCtrl's automatic masks (TencentARC/MasaCtrl, ``MutualSelfAttentionControlMaskAuto``): the current step's
  cross maps at 16 x 16 of the layers already run, head means averaged over layers, the words' columns summed,
  min-max normalised, nearest-resized to the layer's own grid, ``>= thres``; layers counted as transformer blocks
  in the order the UNet runs them (``cur_att_layer // 2``), from ``start_layer`` on.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diffattn


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ Attentive Eraser


def _eraser_ctx(step: int) -> diffattn.AttentionContext:
    layout = diffattn.TokenLayout((4, 4))
    return diffattn.AttentionContext(
        layer="up_blocks.1.attentions.0.transformer_blocks.0.attn1",
        role="self",
        step=step,
        num_steps=12,
        q_layout=layout,
        kv_layout=layout,
        batch_roles=("cond", "cond"),
        attn_mask=None,
        scale=None,
        enable_gqa=False,
        dense=lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        branches=("wo", "w"),
    )


def _suppressed_steps(method, steps: int) -> set[int]:
    """The steps on which ``method``'s output differs from removal without similarity suppression."""
    q, k, v = randn(2, 2, 16, 8, seed=1), randn(2, 2, 16, 8, seed=2), randn(2, 2, 16, 8, seed=3)
    mask = np.zeros((8, 8), bool)
    mask[:4, 2:6] = True
    method = method.with_mask(mask)
    plain = diffattn.AttentiveEraser(ss_steps=0, ss_scale=method.ss_scale).with_mask(mask)
    found = set()
    for step in range(steps):
        ctx = _eraser_ctx(step)
        if not torch.equal(method(q, k, v, ctx), plain(q, k, v, ctx)):
            found.add(step)
    return found


@pytest.mark.parametrize("ss_steps", [0, 1, 3, 9])
def test_eraser_faithful_suppresses_while_step_le_ss_steps(ss_steps):
    steps = 12
    authors = {cur_step for cur_step in range(steps) if cur_step <= ss_steps}  # ss_steps + 1 steps
    ours = {cur_step for cur_step in range(steps) if cur_step < ss_steps}
    assert _suppressed_steps(diffattn.AttentiveEraser(ss_steps=ss_steps, faithful=True), steps) == authors
    assert _suppressed_steps(diffattn.AttentiveEraser(ss_steps=ss_steps), steps) == ours
    assert len(authors) == ss_steps + 1 and len(ours) == ss_steps


def test_eraser_authors_defaults_suppress_ten_steps():
    method = diffattn.AttentiveEraser(faithful=True)
    assert method.ss_steps == 9 and [s for s in range(50) if method.suppresses(s)] == list(range(10))
    assert [s for s in range(50) if diffattn.AttentiveEraser().suppresses(s)] == list(range(9))


def test_eraser_faithful_is_checked():
    with pytest.raises(TypeError, match="faithful must be True or False"):
        diffattn.AttentiveEraser(faithful=1)
