"""Bad requests fail with errors that say what to do; the method acts whatever attention backend is set."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import global_attention_backend_restored
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_dispatch import attention_backend
from diffusers.models.attention_processor import AttnProcessor
from test_models_layout import hide_mask, run

import diffattn
from diffattn import adapters
from diffattn.testing import tiny_inputs
from diffattn.testing import tiny_model as build_tiny_model


def test_unsupported_model_says_what_is_supported():
    from diffusers.models.attention_processor import Attention

    class MyDenoiser(torch.nn.Module):  # a model class no adapter knows
        def __init__(self):
            super().__init__()
            self.attn = Attention(16, heads=2, dim_head=8)

    with pytest.raises(diffattn.UnsupportedModelError, match="Supported models: .*UNet2DConditionModel"):
        diffattn.apply(MyDenoiser(), diffattn.Dense())
    with pytest.raises(diffattn.UnsupportedModelError, match="neither a diffusers model nor a pipeline"):
        diffattn.apply(object(), diffattn.Dense())
    with pytest.raises(TypeError, match="diffattn method"):
        diffattn.apply(torch.nn.Linear(2, 2), lambda q, k, v, ctx: q)


def test_layers_matching_nothing_lists_valid_names(tiny_model):
    model = tiny_model("wan")
    with pytest.raises(diffattn.LayerSelectionError, match=r"'blocks\.7' matches no attention layer.*blocks\.0\.attn1"):
        diffattn.apply(model, diffattn.Dense(), layers="blocks.7")
    with pytest.raises(diffattn.LayerSelectionError, match="not a valid regular expression"):
        diffattn.apply(model, diffattn.Dense(), layers="blocks.(")
    with pytest.raises(diffattn.LayerSelectionError, match=r"acts on \['joint'\]"):
        diffattn.apply(model, diffattn.Masked(hide_mask, roles={"joint"}))
    with diffattn.apply(model, diffattn.Dense(), steps=0.25):  # a bare model outside a pipeline: say how to fix
        with pytest.raises(diffattn.StepSelectionError, match="denoising_step"):
            run(model, tiny_inputs("wan", (2, 4, 4)))
    assert not any(
        getattr(m, "_diffusers_hook", None) and any(n.startswith("diffattn") for n in m._diffusers_hook.hooks)
        for m in model.modules()
    )


def test_layer_patterns_match_whole_name_parts():
    from diffattn.schedule import select_layers

    names = [f"blocks.{i}.attn1" for i in range(12)] + ["transformer_blocks.1.attn", "single_transformer_blocks.1.attn"]
    assert select_layers("blocks.1", names) == ["blocks.1.attn1"]
    assert select_layers(r"blocks\.1\d", names) == ["blocks.10.attn1", "blocks.11.attn1"]
    assert select_layers("transformer_blocks.1", names) == ["transformer_blocks.1.attn"]
    assert select_layers("attn1", names) == names[:12]
    assert select_layers(None, names) == names


@pytest.mark.parametrize(
    "spec,step,num_steps,active",
    [
        (None, 7, None, True),
        (3, 3, None, True),
        (3, 4, None, False),
        (range(2, 4), 3, None, True),
        (0.25, 2, 10, False),
        (0.25, 3, 10, True),
        (0.24, 12, 50, True),
        (0.24, 11, 50, False),
        ([0, 5], 5, 9, True),
    ],
)
def test_step_schedule(spec, step, num_steps, active):
    assert diffattn.StepSchedule.parse(spec).is_active(step, num_steps) is active


@pytest.mark.parametrize("bad", [1.5, -0.1, [], ["a"], True, [-1], "0:3"])
def test_bad_step_specs_are_refused(bad):
    with pytest.raises(diffattn.LayerSelectionError):
        diffattn.StepSchedule.parse(bad)


def test_processor_without_sdpa_core_raises_instead_of_running_without_effect(tiny_model):
    model = tiny_model("unet_sd15")
    model.set_attn_processor(AttnProcessor())  # classic processor: softmax by hand, no SDPA to replace
    diffattn.apply(model, diffattn.Dense())
    with pytest.raises(diffattn.InterceptionError, match="set_default_attn_processor"):
        run(model, tiny_inputs("unet_sd15", (8, 8)))


def test_layout_mismatch_is_an_error_not_a_silent_wrong_mask(tiny_model):
    model = tiny_model("wan")
    wrong = adapters.FamilyAdapter(
        "wan", "WanTransformer3DModel", adapters.adapter_for(model).rules, grid=lambda m, inputs: (1, 2, 2)
    )
    handle = diffattn.apply(model, diffattn.Masked(hide_mask))
    for application in handle.applications:
        application.state.adapter = wrong
    with pytest.raises(diffattn.LayoutError, match="does not fit the layout"):
        run(model, tiny_inputs("wan", (2, 4, 4)))


def test_unknown_layout_fields_are_refused():
    with pytest.raises(ValueError, match="positive integers"):
        diffattn.TokenLayout((4, 0))
    with pytest.raises(ValueError, match="needs a visual grid"):
        diffattn.TokenLayout(())


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_method_acts_under_the_flex_backend(family):
    model = build_tiny_model(family)
    inputs = tiny_inputs(family, (2, 4, 4) if family == "wan" else (4, 4), text_len=7)
    masked_native = None
    with global_attention_backend_restored():
        with diffattn.apply(model, diffattn.Masked(hide_mask)):
            masked_native = run(model, inputs)
        stock_native = run(model, inputs)
        model.set_attention_backend("flex")
        stock_flex = run(model, inputs)
        torch.testing.assert_close(stock_flex, stock_native, rtol=1e-4, atol=1e-4)
        with diffattn.apply(model, diffattn.Masked(hide_mask)) as handle:
            assert torch.equal(run(model, inputs), masked_native)
            assert handle.acted()
        with diffattn.apply(model, diffattn.Dense()):
            torch.testing.assert_close(run(model, inputs), stock_native, rtol=1e-5, atol=1e-5)
        procs = [m.processor for _, m in diffattn.attention_modules(model)]
        assert all(p._attention_backend == "flex" for p in procs), "the user's backend must be restored"
        model.reset_attention_backend()


def test_global_backend_processors_are_routed_too():
    """HunyuanVideo's processor follows the global backend (no per-processor setting)."""
    model = build_tiny_model("hunyuan_video")
    inputs = tiny_inputs("hunyuan_video", (2, 4, 4), text_len=7)
    with diffattn.apply(model, diffattn.Masked(hide_mask)):
        native = run(model, inputs)
        with attention_backend("flex"):
            assert torch.equal(run(model, inputs), native)


def test_set_attention_backend_after_apply_keeps_the_method_acting():
    """The stock processors stay in place, so set_attention_backend reaches them; the method still acts (its calls
    are routed to SDPA through the processor's own setting, restored afterwards)."""
    model = build_tiny_model("flux")
    inputs = tiny_inputs("flux", (4, 4), text_len=7)
    with global_attention_backend_restored():
        with diffattn.apply(model, diffattn.Masked(hide_mask)):
            masked = run(model, inputs)
        with diffattn.apply(model, diffattn.Masked(hide_mask)) as handle:
            model.set_attention_backend("flex")
            assert all(m.processor._attention_backend == "flex" for _, m in diffattn.attention_modules(model))
            assert torch.equal(run(model, inputs), masked)
            assert handle.acted()
            assert all(m.processor._attention_backend == "flex" for _, m in diffattn.attention_modules(model))
        model.reset_attention_backend()


def test_hooked_module_keeps_the_stock_processor_signature(tiny_model):
    """diffusers filters keyword arguments by the processor's signature (image_rotary_emb on CogVideoX)."""
    import inspect

    model = tiny_model("cogvideox")
    diffattn.apply(model, diffattn.Dense())
    module = dict(diffattn.attention_modules(model))["transformer_blocks.0.attn1"]
    assert "image_rotary_emb" in inspect.signature(module.processor.__call__).parameters


class _ServeSecondCallFromCache(ModelHook):
    """A cache hook as diffusers' PyramidAttentionBroadcast is one: every second call returns the last output
    without running the module."""

    def initialize_hook(self, module):
        self.calls, self.cache = 0, None
        return module

    def new_forward(self, module, *args, **kwargs):
        self.calls += 1
        if self.cache is None or self.calls % 2 == 1:
            self.cache = self.fn_ref.original_forward(*args, **kwargs)
        return self.cache


def test_a_call_a_cache_hook_serves_is_not_an_sdpa_error_and_is_recorded_as_not_acted(tiny_model):
    """PyramidAttentionBroadcast / FasterCache registered before diffattn serve some calls from cache: the module
    computes no attention then, so there is nothing to replace (the cached output was computed with the method);
    a processor that computes attention without SDPA is still refused (the test above)."""
    model = tiny_model("wan")  # shared by the session: the cache hook goes again below
    name, module = diffattn.attention_modules(model)[0]
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(_ServeSecondCallFromCache(), "serve_from_cache")
    try:
        handle = diffattn.apply(model, diffattn.Dense(), layers=[f"^{re.escape(name)}$"])
        inputs = tiny_inputs("wan", (2, 4, 4))
        run(model, inputs)
        run(model, inputs)
        acted = [c.acted for c in handle.calls if c.layer == name]
        assert acted == [True, False], acted
    finally:
        diffattn.remove(model)
        registry.remove_hook("serve_from_cache", recurse=False)
