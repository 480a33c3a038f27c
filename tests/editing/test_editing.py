"""Editing: source/target branches in one batch, MasaCtrl's mutual self-attention on SD1.5, SDXL, SD3 and Flux."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import diffattn
from diffattn.editing import default_layers, edit
from diffattn.testing import tiny_pipeline

KINDS = ["sd", "sdxl", "sd3", "flux"]


@functools.cache
def pipeline(kind: str):
    pipe = tiny_pipeline(kind, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(kind: str, source: str, target: str, method, **extra):
    kwargs = dict(num_inference_steps=3, height=32, width=32, guidance_scale=5.0)
    kwargs.update(extra)
    return edit(pipeline(kind), source, target, method, seed=0, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
def test_masactrl_keeps_the_source_exact_and_acts_on_the_target(kind):
    method = diffattn.MutualSelfAttention(start_step=0)  # tiny random models: the first step matters most
    plain = run(kind, "a red circle on the left", "a blue square on the right", None)
    edited = run(kind, "a red circle on the left", "a blue square on the right", method)
    assert np.array_equal(edited.source, plain.source), "the source branch must be bit-identical (invariant 23)"
    assert np.abs(edited.target - plain.target).max() > 1e-4, "the target must borrow from the source"
    assert np.isfinite(edited.target).all()


@pytest.mark.parametrize("kind", KINDS)
def test_masactrl_with_the_source_prompt_is_the_identity(kind):
    same = run(kind, "a red circle on the left", "a red circle on the left", diffattn.MutualSelfAttention(start_step=0))
    np.testing.assert_allclose(same.target, same.source, rtol=0, atol=1e-6)  # invariant 24


def test_branches_follow_cfg_halves_and_copies():
    seen = []

    class Spy(diffattn.Dense):
        def __call__(self, q, k, v, ctx):
            seen.append((ctx.batch_roles, ctx.branches))
            return ctx.dense(q, k, v)

    edit(
        pipeline("sd"),
        "a",
        "b",
        Spy(),
        layers="mid_block",
        num_inference_steps=1,
        height=32,
        width=32,
        guidance_scale=5.0,
        num_images_per_prompt=2,
    )
    assert set(seen) == {(("uncond",) * 4 + ("cond",) * 4, ("source", "source", "target", "target") * 2)}
    seen.clear()
    edit(pipeline("flux"), "a", "b", Spy(), num_inference_steps=1, height=32, width=32)
    assert {branches for _, branches in seen} == {("source", "target")}


def test_source_rows_pair_each_target_with_its_source_per_half():
    from diffattn.methods.edit_branches import source_rows

    layout = diffattn.TokenLayout((2, 2))
    ctx = diffattn.AttentionContext(
        layer="l",
        role="self",
        step=0,
        num_steps=1,
        q_layout=layout,
        kv_layout=layout,
        batch_roles=("uncond", "uncond", "cond", "cond"),
        attn_mask=None,
        scale=None,
        enable_gqa=False,
        dense=lambda q, k, v: q,
        branches=("source", "target", "source", "target"),
    )
    assert source_rows(ctx, 4, "source", "target").tolist() == [0, 0, 2, 2]


def test_editing_methods_need_branches():
    with diffattn.apply(pipeline("sd"), diffattn.MutualSelfAttention(start_step=0), layers="up_blocks"):
        with pytest.raises(diffattn.LayoutError, match="diffattn.editing.edit"):
            pipeline("sd")("a", num_inference_steps=1, height=32, width=32, output_type="np")


def test_default_layers_are_the_decoder_or_the_later_blocks():
    method = diffattn.MutualSelfAttention()
    assert default_layers(pipeline("sd").unet, method) == ("up_blocks",)
    flux = default_layers(pipeline("flux").transformer, method)
    assert flux and all("single_transformer_blocks" in p or "transformer_blocks" in p for p in flux)


def test_masactrl_stacks_with_sparse_attention():
    """MasaCtrl (editing level) runs outside the kernel-level method: its ctx.dense reaches the masked core."""
    local = diffattn.Masked(lambda q, kv, ctx: (q - kv).abs() < 6, roles={"self"})
    with diffattn.apply(pipeline("sd"), local) as handle:
        edited = run("sd", "a red circle", "a blue square", diffattn.MutualSelfAttention(start_step=0))
        plain = run("sd", "a red circle", "a blue square", None)
        assert handle.acted()
    assert np.array_equal(edited.source, plain.source)
    assert np.abs(edited.target - plain.target).max() > 1e-4


def test_inversion_replays_a_rendered_scene_on_the_embedded_model():
    """Invert a rendered ground-truth scene (not a sample of the model) and regenerate it: the source branch of an
    edit from the inverted noise reproduces the scene; plain noise gives another picture."""
    from diffattn_bench.embedded import load_image_pipeline
    from diffattn_bench.grammar import Scene, ShapeSpec
    from diffattn_bench.render import render_scene
    from diffattn_bench.scoring import psnr

    pipe = load_image_pipeline()
    pipe.set_progress_bar_config(disable=True)
    scene = Scene((ShapeSpec("square", "green", "top right"),), background="black")
    image, _ = render_scene(scene, 32, rng=0, jitter=False)
    prompt = "a green square at the top right"
    latents = diffattn.editing.invert(pipe, image, prompt, 20)
    replay = edit(pipe, prompt, prompt, None, latents=latents, num_inference_steps=20, guidance_scale=1.0)
    fresh = edit(pipe, prompt, prompt, None, seed=3, num_inference_steps=20, guidance_scale=1.0)
    truth = image.astype(np.float32) / 255
    assert psnr(replay.source, truth) >= 25, psnr(replay.source, truth)
    assert psnr(replay.source, truth) > psnr(fresh.source, truth) + 3


# ----------------------------------------------------------------------------------------------------------------
# Prompt-to-Prompt
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_prompt_to_prompt_replace_keeps_the_source_and_acts(kind):
    method = diffattn.PromptToPrompt(cross_replace=1.0, self_replace=1.0)
    plain = run(kind, "a red circle on the left", "a blue circle on the left", None)
    edited = run(kind, "a red circle on the left", "a blue circle on the left", method)
    assert np.array_equal(edited.source, plain.source)  # invariant 23
    assert np.abs(edited.target - plain.target).max() > 1e-5
    assert np.isfinite(edited.target).all()


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_to_prompt_trivial_edits_are_identities(kind):
    """Replace with identical prompts, and re-weight by 1 (invariant 24)."""
    same = run(kind, "a red circle", "a red circle", diffattn.PromptToPrompt(cross_replace=1.0, self_replace=1.0))
    np.testing.assert_allclose(same.target, same.source, rtol=0, atol=1e-5)
    plain = run(kind, "a red circle", "a blue circle", None)
    unit = run(
        kind,
        "a red circle",
        "a blue circle",
        diffattn.PromptToPrompt(cross_replace=0.0, self_replace=0.0, reweight=((2, 1.0),)),
    )
    np.testing.assert_allclose(unit.target, plain.target, rtol=0, atol=1e-5)


def test_prompt_to_prompt_reweight_changes_only_the_target():
    pipe = pipeline("sd")
    (token,) = diffattn.editing.token_indices(pipe, "a red circle", "red")
    plain = run("sd", "a red circle", "a red circle", None)
    louder = run(
        "sd",
        "a red circle",
        "a red circle",
        diffattn.PromptToPrompt(cross_replace=0.0, self_replace=0.0, reweight=((token, 3.0),)),
    )
    assert np.array_equal(louder.source, plain.source)
    assert np.abs(louder.target - plain.target).max() > 1e-4


def test_prompt_to_prompt_replace_window_follows_the_steps():
    """cross_replace = 0.5 of 4 steps acts on steps 0 and 1 only (and on the conditional target rows only)."""
    from diffattn.methods.prompt_to_prompt import PromptToPrompt

    acted = []

    class Spy(PromptToPrompt):
        def _replace(self, *args, **kwargs):
            acted.append(args[2].step)
            return PromptToPrompt._replace(*args, **kwargs)

    run("sd", "a red circle", "a blue circle", Spy(cross_replace=0.5, self_replace=0.0), num_inference_steps=4)
    assert set(acted) == {0, 1}


def test_prompt_to_prompt_parameters_are_checked():
    with pytest.raises(ValueError, match="fraction"):
        diffattn.PromptToPrompt(cross_replace=1.5)
    with pytest.raises(ValueError, match="not a run of tokens"):
        diffattn.editing.token_indices(pipeline("sd"), "a red circle", "green")


# ----------------------------------------------------------------------------------------------------------------
# Attentive Eraser
# ----------------------------------------------------------------------------------------------------------------
def _eraser_ctx(layout, step=0):
    return diffattn.AttentionContext(
        layer="up_blocks.0.attn1",
        role="self",
        step=step,
        num_steps=10,
        q_layout=layout,
        kv_layout=layout,
        batch_roles=("cond", "cond"),
        attn_mask=None,
        scale=None,
        enable_gqa=False,
        dense=lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v),
        branches=("wo", "w"),
    )


def test_attentive_eraser_hides_the_object_keys_in_the_w_branch_only():
    layout = diffattn.TokenLayout((4, 4))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 8, generator=g) for _ in range(3))
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True  # the top-left 2 x 2 cells of the 4 x 4 grid
    method = diffattn.AttentiveEraser(ss_steps=0).with_mask(mask)
    out = method(q, k, v, _eraser_ctx(layout, step=3))
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out[0], dense[0])  # wo: untouched
    inside = torch.zeros(16, dtype=torch.bool)
    inside[[0, 1, 4, 5]] = True
    expected = torch.nn.functional.scaled_dot_product_attention(q[1:, :, :, :], k[1:, :, ~inside], v[1:, :, ~inside])
    torch.testing.assert_close(out[1:], expected, rtol=1e-5, atol=1e-6)
    # similarity suppression composes fg * m + bg * (1 - m); ss_scale = 1 makes fg and bg coincide (invariant 25)
    same = diffattn.AttentiveEraser(ss_steps=5, ss_scale=1.0).with_mask(mask)(q, k, v, _eraser_ctx(layout, step=0))
    torch.testing.assert_close(same, out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fill", [False, True])
def test_attentive_eraser_never_empties_a_row(fill):
    layout = diffattn.TokenLayout((4, 4))
    q = k = v = torch.randn(2, 2, 16, 8)
    out = diffattn.AttentiveEraser().with_mask(np.full((8, 8), fill))(q, k, v, _eraser_ctx(layout))
    assert torch.isfinite(out).all()
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))  # invariant 21


def test_erase_removes_the_masked_object_on_the_embedded_model():
    from diffattn_bench.embedded import load_image_pipeline
    from diffattn_bench.grammar import Scene, ShapeSpec
    from diffattn_bench.render import render_scene
    from diffattn_bench.scoring import segment

    pipe = load_image_pipeline()
    pipe.set_progress_bar_config(disable=True)
    image, _ = render_scene(
        Scene((ShapeSpec("circle", "red", "left"), ShapeSpec("square", "blue", "right"))), 32, rng=0, jitter=False
    )
    red = next(c for c in segment(image).components if c.colour == "red")
    x0, y0, x1, y1 = red.bbox
    mask = np.zeros((32, 32), bool)
    mask[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1] = True
    out = diffattn.editing.erase(pipe, image, mask, num_inference_steps=20)
    found = segment((np.clip(out, 0, 1) * 255).round().astype(np.uint8)).components
    assert not any(c.colour == "red" for c in found)
    assert any(c.colour == "blue" and c.position == "right" for c in found)


def test_local_blend_keeps_the_source_latents_outside_the_mask_exactly():
    from diffattn.editing import _blend_step
    from diffattn.methods.edit_maps import BlendStore

    blend = diffattn.LocalBlend(words=("circle",), threshold=0.5, start=0.0)
    store = BlendStore({"source": (1,), "target": (1,)}, (4, 4), blend)
    heat = torch.zeros(4, 4)
    heat[0, 0] = 1.0  # one hot spot: after the 3x3 max-pool the mask is the top-left 2x2
    store.maps[("source", 0)] = heat
    latents = torch.randn(2, 3, 4, 4)
    source, target = latents[0].clone(), latents[1].clone()
    out = _blend_step(store, 1, 10)(None, 0, None, {"latents": latents})["latents"]
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:2, :2] = True
    assert torch.equal(out[0], source), "the source is never blended"
    assert torch.equal(out[1][:, ~mask], source[:, ~mask])  # invariant 26
    assert torch.equal(out[1][:, mask], target[:, mask])
    packed = torch.randn(2, 16, 5)  # Flux: (batch, tokens, channels)
    p_source = packed[0].clone()
    out = _blend_step(store, 1, 10)(None, 0, None, {"latents": packed})["latents"]
    assert torch.equal(out[1][~mask.flatten()], p_source[~mask.flatten()])


def test_local_blend_waits_for_its_start_step():
    from diffattn.editing import _blend_step
    from diffattn.methods.edit_maps import BlendStore

    store = BlendStore({"source": (1,)}, (4, 4), diffattn.LocalBlend(words=("x",), start=0.5))
    store.maps[("source", 0)] = torch.zeros(4, 4).index_put_((torch.tensor(0), torch.tensor(0)), torch.tensor(1.0))
    latents = torch.randn(2, 1, 4, 4)
    before = latents.clone()
    _blend_step(store, 1, 10)(None, 3, None, {"latents": latents})  # step 4 of 10 < 5
    assert torch.equal(latents, before)
    _blend_step(store, 1, 10)(None, 4, None, {"latents": latents})
    assert not torch.equal(latents, before)


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_to_prompt_with_local_blend_runs_and_blends(kind, monkeypatch):
    import diffattn.editing as editing

    stores = []
    original = editing._blend_step
    monkeypatch.setattr(editing, "_blend_step", lambda store, *a: stores.append(store) or original(store, *a))
    blend = diffattn.LocalBlend(words=("circle", "square"), start=0.0)
    plain = run(kind, "a red circle on the left", "a red square on the left", diffattn.PromptToPrompt())
    blended = run(
        kind, "a red circle on the left", "a red square on the left", diffattn.PromptToPrompt(local_blend=blend)
    )
    assert np.array_equal(blended.source, plain.source), "the source branch is untouched (invariant 23)"
    assert np.isfinite(blended.target).all()
    (store,) = stores
    assert set(store.maps) == {("source", 0), ("target", 0)}, "both prompts' word maps are recorded"
    assert store.mask(0) is not None and store.mask(0).shape == store.grid


def test_local_blend_words_must_be_in_the_prompts():
    with pytest.raises(ValueError, match="none of the words .* LocalBlend"):
        run(
            "sd",
            "a red circle",
            "a blue circle",
            diffattn.PromptToPrompt(local_blend=diffattn.LocalBlend(words=("triangle",))),
        )
    with pytest.raises(ValueError, match="name the words"):
        diffattn.LocalBlend(words=())


def _masa_ctx(role="self", grid=(4, 4), text=0):
    layout = diffattn.TokenLayout(grid, text_len=text, text_first=True)

    def dense(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return diffattn.AttentionContext(
        layer="l",
        role=role,
        step=10,
        num_steps=20,
        q_layout=layout,
        kv_layout=layout,
        batch_roles=("cond", "cond"),
        attn_mask=None,
        scale=None,
        enable_gqa=False,
        dense=dense,
        branches=("source", "target"),
    )


def _explicit(q, k, v, allowed):
    logits = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return logits.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("role", ["self", "joint"])
def test_mask_guided_masactrl_composes_object_and_background_attention(role):
    torch.manual_seed(0)
    text = 3 if role == "joint" else 0
    ctx = _masa_ctx(role, (4, 4), text)
    n = 16 + text
    q, k, v = (torch.randn(2, 2, n, 8) for _ in range(3))
    mask_s = torch.zeros(8, 8, dtype=torch.bool)
    mask_s[:4, :4] = True  # top-left quarter at 8 x 8 -> top-left 2 x 2 at 4 x 4 (nearest)
    mask_t = torch.zeros(8, 8, dtype=torch.bool)
    mask_t[4:, 4:] = True
    method = diffattn.MutualSelfAttention(start_step=0, mask_source=mask_s, mask_target=mask_t)
    out = method(q, k, v, ctx)
    inside_s = torch.zeros(4, 4, dtype=torch.bool)
    inside_s[:2, :2] = True
    inside_t = torch.zeros(4, 4, dtype=torch.bool)
    inside_t[2:, 2:] = True
    keys_fg = torch.cat([torch.ones(text, dtype=torch.bool), inside_s.flatten()])
    # the target's queries on the source's image keys (joint: and on its own text keys)
    k_read = torch.cat([k[1][:, :text], k[0][:, text:]], 1)
    v_read = torch.cat([v[1][:, :text], v[0][:, text:]], 1)
    fg = _explicit(q[1], k_read, v_read, keys_fg)
    bg = _explicit(q[1], k_read, v_read, torch.cat([torch.ones(text, dtype=torch.bool), ~inside_s.flatten()]))
    m = torch.cat([torch.zeros(text), inside_t.flatten().float()])[:, None]
    expected = fg * m + bg * (1 - m)  # invariant 25
    image = slice(text, None)
    torch.testing.assert_close(out[1][:, image], expected[:, image], rtol=1e-5, atol=1e-5)
    plain = diffattn.MutualSelfAttention(start_step=0)(q, k, v, ctx)
    torch.testing.assert_close(out[0], plain[0], rtol=0, atol=0)  # the source reads itself, unmasked
    if text:
        torch.testing.assert_close(out[1][:, :text], plain[1][:, :text], rtol=0, atol=0)


def test_mask_guided_masactrl_with_full_masks_is_plain_masactrl():
    torch.manual_seed(0)
    ctx = _masa_ctx()
    q, k, v = (torch.randn(2, 2, 16, 8) for _ in range(3))
    full = torch.ones(5, 5, dtype=torch.bool)
    masked = diffattn.MutualSelfAttention(start_step=0, mask_source=full, mask_target=full)(q, k, v, ctx)
    torch.testing.assert_close(masked, diffattn.MutualSelfAttention(start_step=0)(q, k, v, ctx), rtol=1e-6, atol=1e-6)


def test_mask_guided_masactrl_checks_its_masks():
    with pytest.raises(ValueError, match="needs both mask_source and mask_target"):
        diffattn.MutualSelfAttention(mask_source=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="2-D"):
        diffattn.MutualSelfAttention(mask_source=torch.ones(1, 4, 4), mask_target=torch.ones(1, 4, 4))


@pytest.mark.parametrize("kind", KINDS)
def test_mask_guided_masactrl_runs_on_every_family(kind):
    mask_s = np.zeros((32, 32), bool)
    mask_s[4:16, 2:14] = True
    mask_t = np.zeros((32, 32), bool)
    mask_t[4:16, 18:30] = True
    method = diffattn.MutualSelfAttention(
        start_step=0, mask_source=torch.from_numpy(mask_s), mask_target=torch.from_numpy(mask_t)
    )
    plain = run(
        kind, "a red circle on the left", "a red circle on the right", diffattn.MutualSelfAttention(start_step=0)
    )
    masked = run(kind, "a red circle on the left", "a red circle on the right", method)
    assert np.array_equal(masked.source, plain.source)
    assert np.isfinite(masked.target).all() and np.abs(masked.target - plain.target).max() > 1e-5


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_erase_runs_on_unet_families_and_keeps_the_outside(kind):
    pipe = pipeline(kind)
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (32, 32, 3)).astype(np.float32)
    mask = np.zeros((32, 32), bool)
    mask[8:20, 8:20] = True
    out = diffattn.editing.erase(pipe, image, mask, num_inference_steps=3)
    plain = diffattn.editing.erase(pipe, image, mask, num_inference_steps=3, guidance=0.0)
    assert out.shape == (32, 32, 3) and np.isfinite(out).all()
    assert np.abs(out - plain).max() > 1e-4, "attention redirection changes the result"


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_erase_refuses_transformer_pipelines_with_a_reason(kind):
    with pytest.raises(ValueError, match="UNet pipelines"):
        diffattn.editing.erase(pipeline(kind), np.zeros((32, 32, 3), np.float32), np.ones((32, 32), bool))


@pytest.mark.parametrize("kind", KINDS)
def test_masactrl_automatic_masks_come_from_the_words_cross_attention(kind, monkeypatch):
    from diffattn.methods.mutual import MutualSelfAttention

    used = []
    original = MutualSelfAttention._masked

    def spy(self, q, k, v, ctx, index, out, mask_s, mask_t, targets=None):
        used.append((mask_s.shape, mask_t.shape, targets))
        return original(self, q, k, v, ctx, index, out, mask_s, mask_t, targets)

    monkeypatch.setattr(MutualSelfAttention, "_masked", spy)
    auto = diffattn.MutualSelfAttention(start_step=1, mask_words=("circle",))
    plain = run(kind, "a red circle on the left", "a red circle on the right", None)
    edited = run(kind, "a red circle on the left", "a red circle on the right", auto)
    assert used, "the automatic masks were used once maps were recorded"
    assert np.array_equal(edited.source, plain.source)
    assert np.isfinite(edited.target).all()


def test_masactrl_mask_words_need_words_of_the_prompts_and_no_explicit_masks():
    with pytest.raises(ValueError, match="MasaCtrl's mask_words"):
        run("sd", "a red circle", "a blue circle", diffattn.MutualSelfAttention(mask_words=("square",)))
    with pytest.raises(ValueError, match="not both"):
        diffattn.MutualSelfAttention(mask_words=("circle",), mask_source=torch.ones(2, 2), mask_target=torch.ones(2, 2))


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_inversion_runs_on_unet_families(kind):
    pipe = pipeline(kind)
    image = np.random.default_rng(0).uniform(0, 1, (32, 32, 3)).astype(np.float32)
    latents = diffattn.editing.invert(pipe, image, "a red circle", 3, height=32, width=32)
    assert latents.shape[0] == 1 and torch.isfinite(latents).all()
    replay = edit(
        pipe,
        "a red circle",
        "a red circle",
        None,
        latents=latents,
        num_inference_steps=3,
        height=32,
        width=32,
        guidance_scale=1.0,
    )
    assert np.isfinite(replay.source).all() and np.array_equal(replay.source, replay.target)
