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

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import make_ctx

import diffattn


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ Attentive Eraser


def _eraser_ctx(step: int) -> diffattn.AttentionContext:
    ctx, _ = make_ctx(
        diffattn.TokenLayout((4, 4)),
        layer="up_blocks.1.attentions.0.transformer_blocks.0.attn1",
        step=step,
        num_steps=12,
        batch_roles=("cond", "cond"),
    )
    return dataclasses.replace(ctx, branches=("wo", "w"))


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


# ------------------------------------------------------------------------------------------------------ LocalBlend


def _softmax_maps(heads: int, side: int, text: int, seed: int, centre=(0.3, 0.6)) -> torch.Tensor:
    """Noisy maps where tokens 2..4 peak around ``centre`` (fractions of the grid), as a word's map does."""
    ys, xs = torch.meshgrid(torch.arange(side) / side, torch.arange(side) / side, indexing="ij")
    bump = torch.exp(-((ys - centre[0]) ** 2 + (xs - centre[1]) ** 2) / 0.02).flatten()
    logits = randn(heads, side * side, text, seed=seed)
    logits[..., 2:5] += 6 * bump[:, None]
    return logits.softmax(-1)


def _authors_max_pool_3x3(m: torch.Tensor) -> torch.Tensor:
    """``max_pool2d(kernel 3, stride 1, padding 1)``: each cell the max of its 3 x 3 neighbourhood inside the map."""
    h, w = m.shape
    padded = torch.full((h + 2, w + 2), -float("inf"), dtype=m.dtype)
    padded[1:-1, 1:-1] = m
    shifts = [padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]
    return torch.stack(shifts).amax(0)


def _authors_nearest(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(mode="nearest")``: output cell i reads input cell floor(i * in / out)."""
    rows = (torch.arange(size[0]) * m.shape[0]) // size[0]
    cols = (torch.arange(size[1]) * m.shape[1]) // size[1]
    return m[rows][:, cols]


# (layer, map side) as SD1.5 at 512 px runs its cross-attention: only the 16 x 16 layers outside the mid block count
_SD15_CROSS = [
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn2", 32),
    ("down_blocks.2.attentions.0.transformer_blocks.0.attn2", 16),
    ("down_blocks.2.attentions.1.transformer_blocks.0.attn2", 16),
    ("mid_block.attentions.0.transformer_blocks.0.attn2", 8),
    ("up_blocks.1.attentions.0.transformer_blocks.0.attn2", 16),
    ("up_blocks.1.attentions.1.transformer_blocks.0.attn2", 16),
    ("up_blocks.1.attentions.2.transformer_blocks.0.attn2", 16),
    ("up_blocks.2.attentions.0.transformer_blocks.0.attn2", 32),
]


@pytest.mark.parametrize("threshold", [0.3, 0.5])
@pytest.mark.parametrize("mid_side", [8, 16])  # a mid block at 16 x 16 (larger images) is left out by name
def test_local_blend_faithful_mask_equals_the_authors_cell_for_cell(threshold, mid_side):
    from diffattn.methods.edit_maps import BlendStore

    heads, text, steps = 2, 16, 3
    tokens = {"source": (2,), "target": (3, 4)}  # the target's word is two tokens
    blend = diffattn.LocalBlend(words=("x",), threshold=threshold, faithful=True)
    store = BlendStore(tokens, (64, 64), blend)
    layers = [(name, mid_side if "mid_block" in name else side) for name, side in _SD15_CROSS]
    recorded = {}  # (step, layer, branch) -> maps
    for step in range(steps):
        for li, (name, side) in enumerate(layers):
            for bi, branch in enumerate(("source", "target")):
                centre = (0.3, 0.6) if branch == "source" else (0.55, 0.35)
                p = _softmax_maps(heads, side, text, seed=1000 * step + 10 * li + bi, centre=centre)
                recorded[step, name, branch] = p
                store.add(branch, 0, p, (side, side), layer=name, step=step)
    # the authors: the 16 x 16 layers of down_cross[2:4] + up_cross[:3], summed over the steps (their store), words'
    # columns summed, mean over heads and layers, max-pooled at 16 x 16, nearest to 64 x 64, / max, > th, union
    used = [name for name, side in _SD15_CROSS if side == 16]
    expected = torch.zeros(64, 64, dtype=torch.bool)
    for branch in ("source", "target"):
        per_layer = [sum(recorded[s, name, branch] for s in range(steps)) for name in used]
        stacked = torch.stack([p.reshape(heads, 16, 16, text) for p in per_layer])  # (layers, heads, 16, 16, text)
        words = stacked[..., list(tokens[branch])].sum(-1).mean((0, 1))
        up = _authors_nearest(_authors_max_pool_3x3(words), (64, 64))
        expected |= up / up.max() > threshold
    assert torch.equal(store.mask(0), expected)
    assert 64 < int(expected.sum()) < 64 * 64 // 2, "a mask of the words, not of everything"
    # diffattn's default rule takes the mid block and the bilinear resize: a different mask from the same maps
    default = BlendStore(tokens, (64, 64), diffattn.LocalBlend(words=("x",), threshold=threshold))
    for (step, name, branch), p in recorded.items():
        side = int(p.shape[1] ** 0.5)
        default.add(branch, 0, p, (side, side), layer=name, step=step)
    assert not torch.equal(default.mask(0), expected)


def _blended_steps(blend, steps: int) -> set[int]:
    from diffattn.editing import _blend_step
    from diffattn.methods.edit_maps import BlendStore

    store = BlendStore({"source": (1,)}, (4, 4), blend, "diffattn")
    store.maps[("source", 0)] = torch.zeros(4, 4).index_put_((torch.tensor(0), torch.tensor(0)), torch.tensor(1.0))
    found = set()
    for i in range(steps):
        latents = randn(2, 1, 4, 4, seed=i)
        before = latents.clone()
        _blend_step(store, 1, steps)(None, i, None, {"latents": latents})
        if not torch.equal(latents, before):
            found.add(i)
    return found


@pytest.mark.parametrize("steps", [7, 10, 20, 50])
@pytest.mark.parametrize("start", [0.0, 0.2, 0.25, 0.3, 0.35, 0.29, 1.0])
def test_local_blend_faithful_start_step_is_the_authors(steps, start):
    counter_start = int(start * steps)  # their start_blend; counter = i + 1 after step i
    authors = {i for i in range(steps) if i + 1 > counter_start}
    ours = {i for i in range(steps) if i + 1 >= np.ceil(start * steps - 1e-9)}
    assert _blended_steps(diffattn.LocalBlend(words=("x",), start=start, faithful=True), steps) == authors
    assert _blended_steps(diffattn.LocalBlend(words=("x",), start=start), steps) == ours


def test_local_blend_faithful_start_at_the_defaults():
    """start_blend=0.2 with 50 steps: they blend from step 10 (0-based), diffattn's default from step 9."""
    assert min(_blended_steps(diffattn.LocalBlend(words=("x",), faithful=True), 50)) == 10
    assert min(_blended_steps(diffattn.LocalBlend(words=("x",)), 50)) == 9


def test_local_blend_faithful_is_checked_and_says_which_layers_it_records():
    from diffattn.methods.edit_maps import BlendStore

    with pytest.raises(TypeError, match="faithful must be True or False"):
        diffattn.LocalBlend(words=("x",), faithful="yes")
    store = BlendStore({"source": (1,)}, (8, 8), diffattn.LocalBlend(words=("x",), faithful=True))
    store.query_counts.update({64, 1024})
    with pytest.raises(diffattn.LayoutError, match=r"exactly max_tokens=256 .* outside the mid block.*\[64, 1024\]"):
        raise store.no_maps_error("LocalBlend")


# --------------------------------------------------------------------------------------------------------- MasaCtrl


def _sd15_shaped_unet():
    """SD1.5's block layout (16 transformer blocks) with tiny widths."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


@pytest.mark.parametrize("start_layer", [0, 6, 10, 15])
def test_masactrl_start_layer_counts_layers_as_the_authors(start_layer):
    from diffattn.editing import masactrl_layers

    unet = _sd15_shaped_unet()
    calls = []  # the authors count every attention call in the order the UNet runs them, self then cross
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, name=name: calls.append(name))
        for name, m in unet.named_modules()
        if name.endswith(("attn1", "attn2"))
    ]
    with torch.no_grad():
        unet(torch.zeros(1, 4, 16, 16), 1, encoder_hidden_states=torch.zeros(1, 3, 16))
    for h in hooks:
        h.remove()
    assert len(calls) == 32  # 16 transformer blocks
    authors = [name for i, name in enumerate(calls) if i // 2 >= start_layer and name.endswith("attn1")]
    method = diffattn.MutualSelfAttention(start_layer=start_layer)
    assert [n.replace("\\", "") for n in masactrl_layers(unet, method)] == authors
    if start_layer == 10:  # MasaCtrl's default: SD1.5's up_blocks.2 and up_blocks.3
        assert {n.split(".attentions")[0] for n in authors} == {"up_blocks.2", "up_blocks.3"}


def test_masactrl_start_layer_is_checked():
    from diffattn.editing import masactrl_layers

    with pytest.raises(ValueError, match="start_layer must be"):
        diffattn.MutualSelfAttention(start_layer=-1)
    with pytest.raises(TypeError, match="start_layer must be"):
        diffattn.MutualSelfAttention(start_layer=2.5)
    with pytest.raises(ValueError, match="lower start_layer"):
        masactrl_layers(_sd15_shaped_unet(), diffattn.MutualSelfAttention(start_layer=16))


def _masa_ctx(step: int, side: int) -> diffattn.AttentionContext:
    layout = diffattn.TokenLayout((side, side))
    return diffattn.AttentionContext(
        layer="up_blocks.2.attentions.0.transformer_blocks.0.attn1",
        role="self",
        step=step,
        num_steps=50,
        q_layout=layout,
        kv_layout=layout,
        batch_roles=("uncond", "uncond", "cond", "cond"),
        attn_mask=None,
        scale=None,
        enable_gqa=False,
        dense=lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        branches=("source", "target", "source", "target"),
    )


def _authors_masked_target(q_t, k_s, v_s, mask_s, mask_t):
    """Their ``attn_batch`` with the source mask on the keys (fg: inside, bg: outside), composed by the target mask."""
    logits = q_t @ k_s.transpose(-1, -2) / q_t.shape[-1] ** 0.5
    fg = logits.masked_fill(~mask_s, -float("inf")).softmax(-1) @ v_s
    bg = logits.masked_fill(mask_s, -float("inf")).softmax(-1) @ v_s
    m = mask_t.float()[:, None]
    return fg * m + bg * (1 - m)


def _authors_auto_mask(step_maps, idx, side, thres):
    """MaskAuto's ``aggregate_cross_attn_map`` for one entry, nearest-resized to ``side`` and binarised ``>= thres``."""
    mean = torch.stack([p.mean(0) for p in step_maps]).mean(0)  # head mean per layer, then over layers
    image = mean.reshape(16, 16, -1)[..., idx].sum(-1)
    image = (image - image.min()) / (image.max() - image.min())
    return _authors_nearest(image, (side, side)).flatten() >= thres


def test_masactrl_faithful_auto_masks_are_the_current_steps_at_the_layers_grid():
    from diffattn.methods.edit_maps import CROSS_MAPS, BlendStore

    heads, text, thres, side = 2, 16, 0.3, 32
    tokens = {"source": (2,), "target": (3, 4)}
    method = diffattn.MutualSelfAttention(start_step=0, mask_words=("x",), mask_threshold=thres, faithful=True)
    blend = diffattn.LocalBlend(words=("x",), threshold=thres, max_tokens=method.mask_max_tokens)
    store = BlendStore(tokens, (64, 64), blend, "masactrl")
    q, k, v = (randn(4, heads, side * side, 8, seed=s) for s in (5, 6, 7))
    recorded = {}

    def record(step, layer, side_of_layer, seed):
        for branch, centre in (("source", (0.3, 0.6)), ("target", (0.55, 0.35))):
            p = _softmax_maps(heads, side_of_layer, text, seed=seed + (branch == "target"), centre=centre)
            store.add(branch, 0, p, (side_of_layer, side_of_layer), layer=layer, step=step)
            if side_of_layer == 16:
                recorded.setdefault((step, branch), []).append(p)

    def expected_target(step):
        maps_s, maps_t = recorded.get((step, "source")), recorded.get((step, "target"))
        if maps_s is None:  # no 16 x 16 layer ran yet in this step: unmasked mutual attention
            return F.scaled_dot_product_attention(q[3], k[2], v[2])
        mask_s = _authors_auto_mask(maps_s, list(tokens["source"]), side, thres)
        mask_t = _authors_auto_mask(maps_t, list(tokens["target"]), side, thres)
        assert 0 < int(mask_s.sum()) < side * side and 0 < int(mask_t.sum()) < side * side
        return _authors_masked_target(q[3], k[2], v[2], mask_s, mask_t)

    token = CROSS_MAPS.set(store)
    try:
        record(0, "down_blocks.2.attentions.0.transformer_blocks.0.attn2", 16, seed=10)
        record(0, "down_blocks.2.attentions.1.transformer_blocks.0.attn2", 16, seed=20)
        record(0, "mid_block.attentions.0.transformer_blocks.0.attn2", 8, seed=30)  # not 16 x 16: left out
        out0 = method(q, k, v, _masa_ctx(0, side))
        # step 1: before any 16 x 16 layer ran, no mask; after one, that layer's maps alone (not step 0's)
        before = method(q, k, v, _masa_ctx(1, side))
        record(1, "down_blocks.2.attentions.0.transformer_blocks.0.attn2", 16, seed=40)
        out1 = method(q, k, v, _masa_ctx(1, side))
    finally:
        CROSS_MAPS.reset(token)
    for out, step in ((out0, 0), (out1, 1)):
        torch.testing.assert_close(out[3], expected_target(step), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(before[3], F.scaled_dot_product_attention(q[3], k[2], v[2]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out1[2], F.scaled_dot_product_attention(q[2], k[2], v[2]), rtol=1e-5, atol=1e-5)


def test_masactrl_faithful_and_start_layer_run_through_edit(monkeypatch):
    from diffattn.methods.mutual import MutualSelfAttention
    from diffattn.testing import tiny_pipeline

    pipe = tiny_pipeline("sd", seed=0)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=2, height=32, width=32, guidance_scale=5.0, seed=0)
    with pytest.raises(ValueError, match="not both"):
        method = diffattn.MutualSelfAttention(start_layer=3)
        diffattn.editing.edit(pipe, "a red circle", "a red square", method, layers="up_blocks", **kwargs)
    # the faithful masks take the layers with exactly mask_max_tokens queries: none has 7, the tiny UNet's
    # down_blocks.0 / up_blocks.1 have 16 x 16 = 256 (as SD1.5's at 512 px)
    auto = diffattn.MutualSelfAttention(start_step=0, mask_words=("circle",), faithful=True, mask_max_tokens=7)
    with pytest.raises(diffattn.LayoutError, match="exactly max_tokens=7"):
        diffattn.editing.edit(pipe, "a red circle", "a red circle on the right", auto, **kwargs)
    layers = []
    original = MutualSelfAttention._masked

    def spy(self, q, k, v, ctx, *args, **kw):
        layers.append((ctx.step, ctx.layer))
        return original(self, q, k, v, ctx, *args, **kw)

    monkeypatch.setattr(MutualSelfAttention, "_masked", spy)
    auto = diffattn.MutualSelfAttention(start_step=0, start_layer=3, mask_words=("circle",), faithful=True)
    plain = diffattn.editing.edit(pipe, "a red circle", "a red circle on the right", None, **kwargs)
    edited = diffattn.editing.edit(pipe, "a red circle", "a red circle on the right", auto, **kwargs)
    assert np.array_equal(edited.source, plain.source) and np.isfinite(edited.target).all()
    # run order: down_blocks.0 (layers 0, 1), mid_block (2), up_blocks.1 (3-5); masks once a 16 x 16 map ran
    assert layers and {layer.split(".attentions")[0] for _, layer in layers} == {"up_blocks.1"}
    assert {step for step, _ in layers} == {0, 1}
