"""Bad or unusual input to the editing functions and methods (issue #26): it works as documented or raises at the
call, saying how to fix it; an error leaves nothing applied; no method picks a default for a fact it does not know
(the step of the call, the role of each batch entry, the number of steps that run)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import diffattn
from diffattn.editing import edit, erase, invert, layout
from diffattn.methods.edit_maps import BlendStore
from diffattn.runtime.model_hook import existing_state
from diffattn.testing import tiny_pipeline

KW = dict(num_inference_steps=2, height=32, width=32, guidance_scale=5.0)
LEFT = (0.0, 0.0, 0.5, 1.0)


@functools.cache
def pipeline(kind: str):
    pipe = tiny_pipeline(kind, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.cache
def heun_pipeline():
    """The tiny SD pipeline with Heun's scheduler: its loop makes 2n - 1 model calls (and step ends) for n steps."""
    from diffusers import HeunDiscreteScheduler

    pipe = tiny_pipeline("sd", seed=0)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe


def nothing_applied(pipe) -> bool:
    models = [getattr(pipe, name, None) for name in ("unet", "transformer")]
    return all(existing_state(m) is None for m in models if m is not None)


def image32(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (32, 32, 3)).astype(np.float32)


def square_mask() -> np.ndarray:
    mask = np.zeros((32, 32), bool)
    mask[8:20, 8:20] = True
    return mask


def ctx(
    *,
    role="self",
    step=0,
    num_steps=4,
    roles=("cond", "cond"),
    branches=("source", "target"),
    grid=(4, 4),
    text=0,
):
    visual = (
        diffattn.TokenLayout(grid, text_len=text, text_first=True) if role == "joint" else diffattn.TokenLayout(grid)
    )
    kv = diffattn.TokenLayout((), text_len=text) if role == "cross" else visual
    return diffattn.AttentionContext(
        layer="l",
        role=role,
        step=step,
        num_steps=num_steps,
        q_layout=visual,
        kv_layout=kv,
        batch_roles=roles,
        attn_mask=None,
        scale=None,
        enable_gqa=False,
        dense=lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v),
        branches=branches,
    )


def qkv(batch=2, queries=16, keys=16):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch, 2, queries, 8, generator=g),
        torch.randn(batch, 2, keys, 8, generator=g),
        torch.randn(batch, 2, keys, 8, generator=g),
    )


# ----------------------------------------------------------------------------------------------------------------
# 1. an error leaves nothing applied
# ----------------------------------------------------------------------------------------------------------------
def test_edit_that_raises_leaves_nothing_applied():
    pipe = pipeline("sd")
    with pytest.raises(ValueError, match="square"):
        edit(pipe, "a red circle", "a blue circle", diffattn.MutualSelfAttention(start_step=0, mask_words=("square",)))
    assert nothing_applied(pipe)
    with pytest.raises(ValueError, match="triangle"):
        blend = diffattn.LocalBlend(words=("triangle",))
        edit(pipe, "a red circle", "a blue circle", diffattn.PromptToPrompt(local_blend=blend), **KW)
    assert nothing_applied(pipe)

    def fails(*args):
        raise RuntimeError("the user's callback failed")

    masa = diffattn.MutualSelfAttention(start_step=0, mask_words=("circle",))
    with pytest.raises(RuntimeError, match="the user's callback failed"):
        edit(pipe, "a red circle", "a blue circle", masa, callback_on_step_end=fails, **KW)
    assert nothing_applied(pipe)
    # and everything runs as before
    assert np.isfinite(pipe("a red circle", output_type="np", **KW).images).all()
    invert(pipe, image32(), "a red circle", 2, height=32, width=32)
    edit(pipe, "a red circle", "a blue circle", diffattn.MutualSelfAttention(start_step=0), **KW)
    assert nothing_applied(pipe)


def test_erase_and_layout_that_raise_leave_nothing_applied():
    pipe = pipeline("sd")

    class Failing(diffattn.AttentiveEraser):
        def __call__(self, q, k, v, ctx):
            raise RuntimeError("the method failed")

    with pytest.raises(RuntimeError, match="the method failed"):
        erase(pipe, image32(), square_mask(), num_inference_steps=2, method=Failing())
    assert nothing_applied(pipe)

    def fails(*args):
        raise RuntimeError("the user's callback failed")

    for guided in (0, 1):
        with pytest.raises(RuntimeError, match="the user's callback failed"):
            layout(pipe, "a red circle", [("circle", LEFT)], guidance_steps=guided, callback_on_step_end=fails, **KW)
        assert nothing_applied(pipe)


def test_edit_refuses_the_arguments_it_sets_itself():
    with pytest.raises(ValueError, match="seed="):
        edit(pipeline("sd"), "a", "b", None, generator=torch.Generator(), **KW)
    with pytest.raises(ValueError, match="prompt"):
        edit(pipeline("sd"), "a", "b", None, prompt="c", **KW)
    with pytest.raises(ValueError, match="one entry"):
        edit(pipeline("sd"), "a", "b", None, latents=torch.zeros(2, 4, 4, 4), **KW)


# ----------------------------------------------------------------------------------------------------------------
# 2. the user's step-end callback is chained, not replaced
# ----------------------------------------------------------------------------------------------------------------
def test_edit_chains_the_users_step_end_callback(monkeypatch):
    pipe = pipeline("sd")
    blended = []
    original = BlendStore.mask
    monkeypatch.setattr(BlendStore, "mask", lambda self, copy: blended.append(copy) or original(self, copy))
    seen = []

    def user(p, i, t, outputs):
        seen.append((i, sorted(outputs)))
        if i == 1:  # the last step: what the user returns is what the pipeline decodes
            latents = outputs["latents"]
            outputs["latents"] = torch.stack([latents[0], latents[0]])
        return outputs

    method = diffattn.PromptToPrompt(local_blend=diffattn.LocalBlend(words=("circle",), start=0.0))
    result = edit(
        pipe,
        "a red circle",
        "a blue circle",
        method,
        callback_on_step_end=user,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
        **KW,
    )
    assert seen == [(0, ["latents", "prompt_embeds"]), (1, ["latents", "prompt_embeds"])]
    assert blended == [0, 0], "LocalBlend still blends after every step"
    assert np.array_equal(result.source, result.target), "the user's latents pass through"


def test_edit_chains_a_pipeline_callback_object():
    from diffusers.callbacks import PipelineCallback

    seen = []

    class Record(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            seen.append(step_index)
            return callback_kwargs

    method = diffattn.PromptToPrompt(local_blend=diffattn.LocalBlend(words=("circle",), start=0.0))
    edit(pipeline("sd"), "a red circle", "a blue circle", method, callback_on_step_end=Record(), **KW)
    assert seen == [0, 1]


def test_layout_chains_the_users_step_end_callback():
    for guided in (0, 1):
        seen = []

        def user(p, i, t, outputs, seen=seen):
            seen.append(i)
            return outputs

        out = layout(
            pipeline("sd"),
            "a red circle",
            [("circle", LEFT)],
            guidance_steps=guided,
            iterations=1,
            callback_on_step_end=user,
            **KW,
        )
        assert seen == [0, 1] and np.isfinite(out).all()


# ----------------------------------------------------------------------------------------------------------------
# 3. Prompt-to-Prompt's token counts, indices and weights
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd", "sd3", "flux"])
def test_prompt_to_prompt_replace_refuses_swapped_words_of_different_token_counts(kind):
    pipe = pipeline(kind)
    with pytest.raises(ValueError, match=r"token counts differ.*'red' \(1 token\) -> 'purple' \(6 tokens\)"):
        edit(pipe, "a red circle", "a purple circle", diffattn.PromptToPrompt(), **KW)
    assert nothing_applied(pipe)


def test_prompt_to_prompt_without_replace_takes_prompts_of_any_token_counts():
    method = diffattn.PromptToPrompt(cross_replace=0.0, self_replace=0.5)
    result = edit(pipeline("sd"), "a red circle", "a purple circle", method, **KW)
    assert np.isfinite(result.target).all()


def test_prompt_to_prompt_reweight_indices_are_tokens_of_the_target_prompt():
    with pytest.raises(ValueError, match=">= 0"):
        diffattn.PromptToPrompt(reweight=((-1, 2.0),))
    pipe = pipeline("sd")
    method = diffattn.PromptToPrompt(cross_replace=0.0, self_replace=0.0, reweight=((100, 2.0),))
    with pytest.raises(ValueError, match=r"\[100\].*5 tokens"):
        edit(pipe, "a red circle", "a red circle", method, **KW)
    assert nothing_applied(pipe)
    # applied without edit(): the layer's text tokens bound the index
    with pytest.raises(diffattn.MethodConfigError, match="100"):
        method.validate(ctx(role="cross", text=77))
    method.validate(ctx(role="self"))  # self-attention has no text tokens to re-weight


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -float("inf")])
def test_prompt_to_prompt_reweight_weights_are_finite(weight):
    with pytest.raises(ValueError, match="finite"):
        diffattn.PromptToPrompt(reweight=((2, weight),))


def test_token_indices_count_the_tokens_the_denoiser_attends_to():
    """Flux's joint attention sees T5's tokens (no BOS), not CLIP's."""
    pipe = pipeline("flux")
    ids = pipe.tokenizer_2("a red circle").input_ids
    (index,) = diffattn.editing.token_indices(pipe, "a red circle", "red")
    assert ids[index] == pipe.tokenizer_2("red", add_special_tokens=False).input_ids[0]
    (index,) = diffattn.editing.token_indices(pipeline("sd"), "a red circle", "red")
    assert index == 2  # BOS, "a", "red"


# ----------------------------------------------------------------------------------------------------------------
# 4. a plain string names one word
# ----------------------------------------------------------------------------------------------------------------
def test_a_plain_string_names_one_word():
    assert diffattn.LocalBlend(words="square").split() == (("square",), ("square",))
    assert diffattn.LocalBlend(words=["circle", "square"]).split() == (("circle", "square"),) * 2
    assert diffattn.LocalBlend(words=("circle", ("square",))).split() == (("circle",), ("square",))
    assert diffattn.MutualSelfAttention(mask_words="circle").mask_words == ("circle",)
    assert diffattn.MutualSelfAttention(mask_words=(["circle"], "square")).mask_words == (("circle",), ("square",))
    for bad in [("circle", 3), (("a",), ("b",), ("c",)), 7]:
        with pytest.raises(ValueError, match="words"):
            diffattn.LocalBlend(words=bad)


def test_every_blend_word_must_be_in_its_prompt():
    pipe = pipeline("sd")
    blend = diffattn.LocalBlend(words=("circle", "sqaure"))
    with pytest.raises(ValueError, match="'sqaure'"):
        edit(pipe, "a red circle", "a red square", diffattn.PromptToPrompt(local_blend=blend), **KW)
    auto = diffattn.MutualSelfAttention(mask_words="circle")
    with pytest.raises(ValueError, match="each prompt"):
        edit(pipe, "a red circle", "a red square", auto, **KW)
    assert nothing_applied(pipe)


def test_word_maps_that_no_layer_records_raise_instead_of_doing_nothing():
    """LocalBlend and MasaCtrl's automatic masks record maps on layers of at most max_tokens queries; with none
    (Flux at 1024 px has 4096 per layer), they silently did nothing."""
    pipe = pipeline("sd")
    blend = diffattn.PromptToPrompt(local_blend=diffattn.LocalBlend(words="circle", start=0.0, max_tokens=1))
    with pytest.raises(diffattn.LayoutError, match="max_tokens=1"):
        edit(pipe, "a red circle", "a blue circle", blend, **KW)
    auto = diffattn.MutualSelfAttention(start_step=0, mask_words="circle", mask_max_tokens=1)
    with pytest.raises(diffattn.LayoutError, match="max_tokens=1"):
        edit(pipe, "a red circle", "a blue circle", auto, **KW)
    assert nothing_applied(pipe)


# ----------------------------------------------------------------------------------------------------------------
# 5. erase: image range, one mask threshold
# ----------------------------------------------------------------------------------------------------------------
def test_erase_refuses_float_images_outside_0_1():
    with pytest.raises(ValueError, match="uint8.*255"):
        erase(pipeline("sd"), image32() * 255, square_mask(), num_inference_steps=2)


def test_erase_reads_soft_masks_with_one_threshold():
    pipe = pipeline("sd")
    with pytest.raises(ValueError, match="selects nothing: values >= 0.5 mark the object"):
        erase(pipe, image32(), np.full((32, 32), 0.3), num_inference_steps=2)
    soft = np.zeros((32, 32), np.float32)
    soft[4:24, 4:24] = 0.3  # a feathered edge below the threshold: background for the blend and the eraser alike
    soft[8:20, 8:20] = 0.8
    hard = soft >= 0.5
    assert torch.equal(diffattn.AttentiveEraser().with_mask(soft).mask, torch.from_numpy(hard))
    np.testing.assert_array_equal(
        erase(pipe, image32(), soft, num_inference_steps=2), erase(pipe, image32(), hard, num_inference_steps=2)
    )
    with pytest.raises(ValueError, match="height and width"):
        erase(pipe, image32(), hard.T[:16], num_inference_steps=2)


# ----------------------------------------------------------------------------------------------------------------
# 6. unknown facts raise; the step count is the running call's
# ----------------------------------------------------------------------------------------------------------------
def _eraser():
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True
    return diffattn.AttentiveEraser().with_mask(mask)


@pytest.mark.parametrize("name", ["masactrl", "eraser", "prompt-to-prompt"])
def test_editing_methods_refuse_an_unknown_step(name):
    method, branches = {
        "masactrl": (diffattn.MutualSelfAttention(start_step=2), ("source", "target")),
        "eraser": (_eraser(), ("wo", "w")),
        "prompt-to-prompt": (diffattn.PromptToPrompt(), ("source", "target")),
    }[name]
    assert type(method).requires_step and type(method).requires_roles
    with pytest.raises(diffattn.StepSelectionError, match=r"diffattn.denoising_step\(i, n\)"):
        method(*qkv(), ctx(step=None, num_steps=None, branches=branches))


@pytest.mark.parametrize("name", ["masactrl", "prompt-to-prompt", "blend store", "bounded cross", "bounded refine"])
def test_editing_methods_refuse_unknown_batch_roles(name):
    from diffattn.methods.bounded import _REFINER, MaskRefiner

    bounded = diffattn.BoundedAttention(boxes=(LEFT,), subject_tokens=((1,),))
    assert type(bounded).requires_roles
    token = _REFINER.set(MaskRefiner(bounded, ["l"], [0])) if name == "bounded refine" else None
    try:
        with pytest.raises(diffattn.LayoutError, match="batch_roles="):
            _call_without_roles(name, bounded)
    finally:
        if token is not None:
            _REFINER.reset(token)
    # self-attention masks apply to every entry: no role needed
    bounded(*qkv(), ctx(roles=None))


def _call_without_roles(name, bounded):
    if name == "masactrl":
        diffattn.MutualSelfAttention(start_step=0)(*qkv(), ctx(roles=None))
    elif name == "prompt-to-prompt":
        diffattn.PromptToPrompt()(*qkv(), ctx(roles=None))
    elif name == "blend store":
        BlendStore({"source": (1,)}, (4, 4), diffattn.LocalBlend(words="x")).entries(ctx(roles=None), 2)
    elif name == "bounded cross":
        bounded(*qkv(keys=5), ctx(role="cross", text=5, roles=None))
    else:
        bounded(*qkv(), ctx(roles=None))


def test_local_blend_counts_the_steps_this_call_runs(monkeypatch):
    blended = []
    original = BlendStore.mask
    monkeypatch.setattr(BlendStore, "mask", lambda self, copy: blended.append(copy) or original(self, copy))
    method = diffattn.PromptToPrompt(local_blend=diffattn.LocalBlend(words=("circle",), start=0.5))
    edit(heun_pipeline(), "a red circle", "a blue circle", method, num_inference_steps=3, height=32, width=32)
    assert len(blended) == 3, "5 calls for 3 Heun steps: the blend acts from ceil(0.5 * 5) = 3, after calls 2, 3, 4"


def test_layout_refines_on_the_steps_this_call_runs(monkeypatch):
    import diffattn.methods.bounded as bounded

    refreshed = []
    original = bounded.MaskRefiner.refresh

    def spy(self):
        original(self)
        refreshed.append(self.refreshed)

    monkeypatch.setattr(bounded.MaskRefiner, "refresh", spy)
    layout(
        heun_pipeline(),
        "a red circle and a blue square",
        [("circle", LEFT), ("square", (0.5, 0.0, 1.0, 1.0))],
        guidance_steps=0,
        num_inference_steps=3,
        height=32,
        width=32,
        refine_start=0.5,
        refine_every=0.25,
    )
    assert max(refreshed) == 2, "5 calls: refinement from ceil(0.5 * 5) = 3 every round(0.25 * 5) = 1: calls 3, 4"


def test_layout_takes_the_pipelines_own_step_count(monkeypatch):
    """Without num_inference_steps, SD3 and Flux run 28 steps (their default), not 50."""
    import diffattn.methods.bounded as bounded

    made = []
    original = bounded.MaskRefiner.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(bounded.MaskRefiner, "__init__", spy)
    layout(pipeline("flux"), "a red circle", [("circle", LEFT)], guidance_steps=0, height=32, width=32)
    (refiner,) = made
    assert refiner.refreshed == len(range(9, 28, 3)), "from 0.3 of the 28 steps, every 0.1 of them: 9, 12, ..., 27"


# ----------------------------------------------------------------------------------------------------------------
# 7. clear errors at the call
# ----------------------------------------------------------------------------------------------------------------
def test_layout_refuses_several_images_per_prompt():
    with pytest.raises(ValueError, match="num_images_per_prompt=2 .*one image"):
        layout(pipeline("sd"), "a red circle", [("circle", LEFT)], num_images_per_prompt=2, **KW)


def test_invert_reads_grayscale_and_opaque_rgba_images_as_rgb():
    from PIL import Image

    pipe = pipeline("sd")
    gray = (image32()[..., 0] * 255).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, -1)

    def inverted(image):
        return invert(pipe, image, "a red circle", 2, height=32, width=32)

    expected = inverted(rgb)
    assert torch.equal(inverted(gray), expected)
    assert torch.equal(inverted(Image.fromarray(gray)), expected)
    opaque = np.concatenate([rgb, np.full((32, 32, 1), 255, np.uint8)], -1)
    assert torch.equal(inverted(opaque), expected)
    assert torch.equal(inverted(Image.fromarray(opaque)), expected)
    transparent = opaque.copy()
    transparent[:4, :4, 3] = 0
    with pytest.raises(ValueError, match="transparent"):
        inverted(Image.fromarray(transparent))
    with pytest.raises(ValueError, match="RGB"):
        inverted(np.zeros((32, 32, 2), np.uint8))
    with pytest.raises(ValueError, match="uint8.*255"):
        inverted(rgb.astype(np.float32))
