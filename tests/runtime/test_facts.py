"""Facts the runtime uses are given or checked, never guessed (issue #26): the loop position read from a running
pipeline is cross-checked against the timestep the model receives, per-call state ends with its forward, and the
runtime keeps nothing alive or keyed by the id of a dead object."""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass, field

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from support import Recording, ip_adapter_unet

import diffattn
from diffattn.testing import tiny_inputs, tiny_model


class StepNamedLoop(DiffusionPipeline):
    """A custom pipeline whose denoising loop variable is ``step``; an earlier ``for i in range(2)`` leaves ``i``."""

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, inputs: dict, num_inference_steps: int = 4):
        warm_up = []
        for i in range(2):  # some set-up loop: i stays bound to 1
            warm_up.append(i)
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        sample = inputs["sample"]
        for step, t in enumerate(timesteps):
            del step
            sample = self.unet(**{**inputs, "sample": sample, "timestep": t})[0]
        return sample, i


def _custom_pipeline() -> StepNamedLoop:
    return StepNamedLoop(tiny_model("unet_sd15", seed=0), DDIMScheduler())


def test_stale_loop_variable_is_not_taken_for_the_step():
    """steps=[1] used to act on all 4 calls (i was 1 throughout); now the step is unknown and the call says why."""
    pipe = _custom_pipeline()
    method = Recording()
    with diffattn.apply(pipe.unet, method, steps=[1]):
        with pytest.raises(diffattn.StepSelectionError, match="loop variable i=1"):
            pipe(tiny_inputs("unet_sd15", (4, 4)))
    assert method.seen == []


def test_stale_loop_variable_with_every_step_still_runs():
    """A method that needs no step keeps working in such a loop (steps=None); its ctx.step is unknown except where
    the loop variable is checked right."""
    pipe = _custom_pipeline()
    method = Recording()
    with diffattn.apply(pipe.unet, method):
        pipe(tiny_inputs("unet_sd15", (4, 4)), num_inference_steps=3)
    # i=1 is taken only for the call it is right for (the second step: its timestep is timesteps[1])
    per_forward = len(method.seen) // 3
    assert method.seen == [None] * per_forward + [1] * per_forward + [None] * per_forward


def test_custom_loop_declares_its_step():
    """The documented fix: the loop says where it is, and the method acts on exactly the step asked for."""

    class Declared(StepNamedLoop):
        @torch.no_grad()
        def __call__(self, inputs: dict, num_inference_steps: int = 4):
            self.scheduler.set_timesteps(num_inference_steps)
            sample = inputs["sample"]
            for step, t in enumerate(self.scheduler.timesteps):
                with diffattn.denoising_step(step, num_inference_steps):
                    sample = self.unet(**{**inputs, "sample": sample, "timestep": t})[0]
            return sample

    pipe = Declared(tiny_model("unet_sd15", seed=0), DDIMScheduler())
    method = Recording()
    with diffattn.apply(pipe.unet, method, steps=[1]) as handle:
        pipe(tiny_inputs("unet_sd15", (4, 4)))
    assert {s for s, _ in handle.acted()} == {1}
    assert set(method.seen) == {1}


def test_no_phantom_state_after_a_forward():
    """A direct call of an attention submodule after a forward raises instead of reusing that forward's step/roles."""
    model = tiny_model("unet_sd15", seed=0)
    inputs = tiny_inputs("unet_sd15", (4, 4))
    method = Recording()
    with diffattn.apply(model, method) as handle:
        with diffattn.denoising_step(1, 4, batch_roles=("cond",) * inputs["sample"].shape[0]):
            model(**inputs)
        calls = len(handle.calls)
        attn = model.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1")
        hidden = torch.randn(inputs["sample"].shape[0], 16, attn.to_q.in_features)
        with pytest.raises(diffattn.LayoutError, match="outside the model's forward"):
            attn(hidden)
        assert len(handle.calls) == calls


def test_interrupted_forward_leaves_no_state():
    """A KeyboardInterrupt inside a forward ends that forward's state: the next forward is not affected."""
    model = tiny_model("unet_sd15", seed=0)
    inputs = tiny_inputs("unet_sd15", (4, 4))

    @dataclass(frozen=True)
    class Interrupting(diffattn.AttentionMethod):
        calls: list = field(default_factory=list, compare=False)
        roles: frozenset = frozenset({"self"})

        def __call__(self, q, k, v, ctx):
            self.calls.append(ctx.step)
            if len(self.calls) == 1:
                raise KeyboardInterrupt
            return ctx.dense(q, k, v)

    method = Interrupting()
    with diffattn.apply(model, method):
        with pytest.raises(KeyboardInterrupt):
            model(**inputs)
        state = model._diffusers_hook.get_hook("diffattn").state
        assert state.replace_current(None) is None, "the interrupted forward's state stayed current"
        model(**inputs)


def test_removed_model_is_freed():
    """After remove, nothing in diffattn keeps the model alive (no module-global registry of hooks)."""
    model = tiny_model("unet_sd15", seed=1)
    inputs = tiny_inputs("unet_sd15", (4, 4))
    handle = diffattn.apply(model, Recording())
    model(**inputs)
    ref = weakref.ref(model)
    handle.remove()
    del model, handle
    gc.collect()
    assert ref() is None, [type(r).__name__ for r in gc.get_referrers(ref())]


def test_applied_model_is_freed_without_remove():
    """A model dropped while still hooked is freed too (the op's table of hooks holds them weakly)."""
    model = tiny_model("unet_sd15", seed=1)
    inputs = tiny_inputs("unet_sd15", (4, 4))
    diffattn.apply(model, Recording())
    model(**inputs)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_interrupted_guided_forward_leaves_nothing_behind():
    """PAG's per-forward bookkeeping lives on the forward's call state (it used to be keyed by id(forward), which a
    later forward can reuse): after a KeyboardInterrupt mid-pipeline, the next run equals a fresh one."""
    import numpy as np

    from diffattn.testing import tiny_pipeline

    pipe = tiny_pipeline("sd", seed=0)

    def run():
        out = pipe(
            "a red circle",
            num_inference_steps=3,
            height=32,
            width=32,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        )
        return np.asarray(out.images)

    with diffattn.guidance.enable(pipe, diffattn.PAG(scale=3.0)):
        expected = run()

        @dataclass(frozen=True)
        class InterruptOnce(diffattn.AttentionMethod):
            """Dense, but raises KeyboardInterrupt inside the perturbed forward of step 1."""

            calls: list = field(default_factory=list, compare=False)
            roles: frozenset = frozenset({"self"})

            def __call__(self, q, k, v, ctx):
                self.calls.append(ctx.step)
                if ctx.step == 1 and self.calls.count(1) == 1:
                    raise KeyboardInterrupt
                return ctx.dense(q, k, v)

        with diffattn.apply(pipe, InterruptOnce()), pytest.raises(KeyboardInterrupt):
            run()
        assert pipe.unet._diffusers_hook.get_hook("diffattn").state.replace_current(None) is None
        assert np.array_equal(run(), expected)


def RecordingRoles() -> Recording:
    """Records (batch, batch roles) of every self / joint call."""
    return Recording(read=lambda q, k, ctx: (q.shape[0], ctx.batch_roles), roles=frozenset({"self", "joint"}))


def test_sd3_skip_layer_call_is_conditional():
    """SD3's skip-layer guidance calls the transformer again with the conditional latents only: with two images per
    prompt that call has 2 entries, both "cond" (it used to be labelled (uncond, cond))."""
    from diffattn.testing import tiny_pipeline

    pipe = tiny_pipeline("sd3", seed=0)
    method = RecordingRoles()
    with diffattn.apply(pipe, method):
        pipe(
            "a red circle",
            num_inference_steps=2,
            height=32,
            width=32,
            num_images_per_prompt=2,
            skip_guidance_layers=[0],
            skip_layer_guidance_start=0.0,
            skip_layer_guidance_stop=1.0,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )
    seen = set(method.seen)
    assert (4, ("uncond", "uncond", "cond", "cond")) in seen
    assert (2, ("cond", "cond")) in seen, seen
    assert all(roles is not None for _, roles in seen)


def test_pag_pipeline_batches_have_unknown_roles():
    """diffusers' own PAG pipeline batches [uncond, cond, perturbed] (or [cond, perturbed] without CFG): the runtime
    cannot name those entries, so it says unknown instead of calling an even batch (uncond, cond)."""
    from diffusers import StableDiffusionPAGPipeline

    from diffattn.testing import tiny_pipeline

    base = tiny_pipeline("sd", seed=0)
    pipe = StableDiffusionPAGPipeline(**base.components, pag_applied_layers=["mid"])
    for guidance_scale in (5.0, 1.0):
        method = RecordingRoles()
        with diffattn.apply(pipe, method):
            pipe(
                "a red circle",
                num_inference_steps=2,
                height=32,
                width=32,
                guidance_scale=guidance_scale,
                pag_scale=2.0,
                output_type="latent",
                generator=torch.Generator().manual_seed(0),
            )
        assert method.seen and {roles for _, roles in method.seen} == {None}
    with diffattn.guidance.enable(pipe, diffattn.PAG(scale=3.0)), pytest.raises(diffattn.LayoutError):
        pipe("a red circle", num_inference_steps=2, height=32, width=32, guidance_scale=1.0, pag_scale=2.0)


@dataclass(frozen=True)
class NeedsStepAndRoles(diffattn.AttentionMethod):
    """A method that cannot act without the step and the batch roles (as MasaCtrl and the eraser)."""

    requires_step = True
    requires_roles = True
    roles: frozenset = frozenset({"self"})

    def __call__(self, q, k, v, ctx):
        assert ctx.step is not None and ctx.batch_roles is not None
        return ctx.dense(q, k, v)


def test_method_that_needs_the_step_raises_when_it_is_unknown():
    model = tiny_model("unet_sd15", seed=0)
    inputs = tiny_inputs("unet_sd15", (4, 4))
    with diffattn.apply(model, NeedsStepAndRoles()):
        with pytest.raises(diffattn.StepSelectionError, match="denoising_step"):
            model(**inputs)
        batch = inputs["sample"].shape[0]
        with pytest.raises(diffattn.LayoutError, match="batch_roles"):
            with diffattn.denoising_step(0, 2):
                model(**inputs)
        with diffattn.denoising_step(0, 2, batch_roles=("cond",) * batch):
            model(**inputs)


@pytest.mark.parametrize("family", ["unet_sd15", "flux"])
def test_todo_timestep_gate_reads_the_scheduler_scale(family):
    """TokenDownsampling's gate compares t / 1000 with timestep_threshold_stop on every family: Flux's model receives
    t / 1000, which the gate used to divide again (it never acted on Flux)."""
    model = tiny_model(family, seed=0)
    grid = (8, 8)
    inputs = tiny_inputs(family, grid)
    scale = 1000.0 if family == "flux" else 1.0  # the model's own timestep input scale
    densities = {}
    for t in (900.0, 200.0):
        call = {
            **inputs,
            "timestep": torch.full_like(torch.as_tensor(inputs["timestep"], dtype=torch.float32), t / scale),
        }
        method = diffattn.TokenDownsampling(factor=2, timestep_threshold_stop=0.5)
        with diffattn.apply(model, method, layers=None) as handle:
            with diffattn.denoising_step(
                0, 1, batch_roles=("cond",) * call["hidden_states" if family == "flux" else "sample"].shape[0]
            ):
                model(**call)
            densities[t] = min(m["density"] for m in handle.metrics().values() if "density" in m)
    assert densities[900.0] < 1.0, densities  # acts early in the schedule
    assert densities[200.0] == 1.0, densities  # stops below the threshold


def test_rettention_keeps_one_cache_per_denoiser():
    """One Rettention instance on two denoisers with the same layer names (Wan 2.2's transformer and transformer_2,
    the second taking over at step 2): the second calibrates on its own instead of reusing the first one's cache."""
    first, second = tiny_model("wan", seed=0), tiny_model("wan", seed=1)
    inputs = tiny_inputs("wan", (2, 4, 4))
    roles = ("cond",) * inputs["hidden_states"].shape[0]
    base = diffattn.SlidingTileAttention(tile=(1, 2, 2), window=(1, 1, 1))

    def run(method, schedule):
        outs = []
        handles = [diffattn.apply(m, method) for m in {id(m): m for m, _ in schedule}.values()]
        try:
            for model, step in schedule:
                with diffattn.denoising_step(step, 4, batch_roles=roles):
                    outs.append(model(**inputs)[0])
        finally:
            for handle in handles:
                handle.remove()
        return outs

    shared = run(diffattn.Rettention(base=base), [(first, 0), (first, 1), (second, 2), (second, 3)])
    alone = run(diffattn.Rettention(base=base), [(second, 2), (second, 3)])
    torch.testing.assert_close(shared[2:], alone, rtol=0, atol=0)


def test_rettention_cache_holds_one_generation():
    """Generations at two resolutions under one application: the first one's per-shape entries go when the second
    starts, a repeat of the first gives a fresh instance's output, and removing the application empties the cache."""
    model = tiny_model("wan", seed=0)
    base = diffattn.SlidingTileAttention(tile=(1, 2, 2), window=(1, 1, 1))

    def generate(grid):
        inputs = tiny_inputs("wan", grid, batch=1, text_len=3)
        outs = []
        for step in range(3):
            with diffattn.denoising_step(step, 3, batch_roles=("cond",)):
                outs.append(model(**inputs)[0])
        return outs

    method = diffattn.Rettention(base=base)
    with diffattn.apply(model, method), torch.no_grad():
        generate((2, 4, 4))
        generate((2, 4, 8))
        assert {key[3][-2] for key in method._cache} == {2 * 4 * 8}  # the second grid's tokens only (the first had 32)
        again = generate((2, 4, 4))
    assert not method._cache and not method._calls
    with diffattn.apply(model, diffattn.Rettention(base=base)), torch.no_grad():
        torch.testing.assert_close(again, generate((2, 4, 4)), rtol=0, atol=0)


def _layer_skip(model, layer: str = "mid_block.attentions.0.transformer_blocks") -> None:
    from diffusers.hooks import LayerSkipConfig, apply_layer_skip

    config = LayerSkipConfig(indices=[0], fqn=layer, skip_attention=False, skip_attention_scores=True, skip_ff=False)
    apply_layer_skip(model, config)


def test_layer_skip_then_diffattn_is_refused_at_apply():
    """diffusers' layer-skip hook (skip_attention_scores) and diffattn both catch the SDPA call of
    mid_block...attn1: whichever registered first would win silently. Applying diffattn there is refused."""
    model = tiny_model("unet_sd15", seed=0)
    _layer_skip(model)
    with pytest.raises(diffattn.InterceptionError, match="layer-skip"):
        diffattn.apply(model, diffattn.Dense(), layers="mid_block")
    diffattn.apply(model, diffattn.Dense(), layers="down_blocks").remove()  # other layers are fine


def test_diffattn_then_layer_skip_is_refused_at_the_call():
    model = tiny_model("unet_sd15", seed=0)
    inputs = tiny_inputs("unet_sd15", (4, 4))
    with diffattn.apply(model, diffattn.Dense(), layers="mid_block"):
        _layer_skip(model)
        with pytest.raises(diffattn.InterceptionError, match="layer-skip"):
            with diffattn.denoising_step(0, 1, batch_roles=("cond",) * inputs["sample"].shape[0]):
                model(**inputs)


def test_ip_adapter_call_is_not_taken_for_text_cross_attention():
    """IP-Adapter's image-prompt SDPA call inside attn2 gets its own role: a cross-attention method sees only the
    text call (7 tokens), never the 4 image-prompt tokens as if they were words."""

    model = ip_adapter_unet()
    inputs = tiny_inputs("unet_sd15", (4, 4), text_len=7)
    batch = inputs["sample"].shape[0]
    image_embeds = [torch.randn(batch, 1, 16, generator=torch.Generator().manual_seed(0))]
    stock = model(**inputs, added_cond_kwargs={"image_embeds": image_embeds})[0]
    method = Recording(read=lambda q, k, ctx: (k.shape[-2], ctx.kv_layout.text_len), roles=frozenset({"cross"}))
    with diffattn.apply(model, method) as handle:
        with diffattn.denoising_step(0, 1, batch_roles=("cond",) * batch):
            out = model(**inputs, added_cond_kwargs={"image_embeds": image_embeds})[0]
    assert method.seen and {length for length, _ in method.seen} == {7}
    assert any(record.role == "image_prompt" and not record.acted for record in handle.calls)
    torch.testing.assert_close(out, stock, rtol=0, atol=0)


def test_shared_flux_transformer_with_pag_and_true_cfg_in_two_threads():
    """Two Flux pipelines share one transformer with PAG and true (separate-call) CFG, each in its own thread: each
    gets its single-thread image (the shift from a conditional call is kept per thread for its unconditional call)."""
    import copy
    import threading

    import numpy as np

    from diffattn.testing import tiny_pipeline

    first = tiny_pipeline("flux", seed=0)
    # the same transformer, a second pipeline with a scheduler of its own (a scheduler counts its steps)
    second = type(first)(**{**first.components, "scheduler": copy.deepcopy(first.scheduler)})
    prompts = {id(first): "a red circle", id(second): "a green square"}

    def run(pipe):
        out = pipe(
            prompts[id(pipe)],
            negative_prompt="a blue square",
            true_cfg_scale=4.0,
            num_inference_steps=3,
            height=32,
            width=32,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        )
        return np.asarray(out.images)

    with diffattn.guidance.enable(first, diffattn.PAG(scale=3.0)):
        alone = {id(p): run(p) for p in (first, second)}
        results, errors = {}, []

        def work(pipe):
            try:
                for _ in range(3):
                    results.setdefault(id(pipe), []).append(run(pipe))
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(p,)) for p in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors
    for key, images in results.items():
        assert all(np.array_equal(image, alone[key]) for image in images)


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("cond", "cond"),
        ("uncond", "uncond"),
        ("pred_cond", "cond"),
        ("pred_uncond", "uncond"),
        ("pred_cond_skip", "cond"),
        ("pred_cond_seg", "cond"),
        ("my_branch", None),
    ],
)
def test_guider_branch_names_give_the_batch_roles(name, role):
    """diffusers' modular pipelines run each guider branch inside cache_context(<prediction name>): those names
    give the roles, with the step from the context's step_index; an unknown name gives no roles."""
    model, inputs = tiny_model("wan"), tiny_inputs("wan", (2, 4, 4), batch=2, text_len=3)
    method = Recording(read=lambda q, k, ctx: (ctx.step, ctx.num_steps, ctx.batch_roles))
    with diffattn.apply(model, method), torch.no_grad(), model.cache_context(name, step_index=1, num_inference_steps=3):
        model(**inputs)
    expected = None if role is None else (role, role)
    assert set(method.seen) == {(1, 3, expected)}


def test_declared_timestep_without_a_step_selects_by_timestep():
    """denoising_step(timestep=t) alone declares the scheduler's timestep: a timestep-range selection uses it, not
    the model's own timestep input (whose scale is the model's)."""
    model, inputs = tiny_model("wan"), tiny_inputs("wan", (2, 4, 4), batch=1, text_len=3)
    inputs["timestep"] = torch.tensor([900.0])
    method = Recording(read=lambda q, k, ctx: ctx.step)
    with diffattn.apply(model, method, steps=diffattn.StepSchedule.timesteps(0, 200)) as handle, torch.no_grad():
        with diffattn.denoising_step(timestep=100.0):
            model(**inputs)
        assert method.seen and handle.calls[-1].acted
        method.seen.clear()
        model(**inputs)  # the model's 900 is outside the range
        assert not method.seen


def test_wan_image_to_video_cross_attention_acts_on_the_text_call():
    """Wan I2V's attn2 attends the CLIP image tokens first, the text second: the text call is the one a
    cross-attention method sees (the 512 text keys Wan pads to, never the 5 image tokens), and the image call is left
    stock."""
    import diffusers

    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=48,
        num_layers=2,
        image_dim=24,
        added_kv_proj_dim=24,
    ).eval()
    inputs = tiny_inputs("wan", (1, 3, 5), batch=1, text_len=512)  # the processor splits off image tokens at 512
    inputs["encoder_hidden_states_image"] = torch.randn(1, 5, 24)
    with torch.no_grad():
        stock = model(**inputs)[0]
    method = Recording(read=lambda q, k, ctx: (k.shape[-2], ctx.kv_layout.text_len), roles=frozenset({"cross"}))
    with diffattn.apply(model, method) as handle, torch.no_grad():
        with diffattn.denoising_step(0, 1, batch_roles=("cond",)):
            out = model(**inputs)[0]
    assert set(method.seen) == {(512, 512)}
    assert any(record.role == "image_prompt" for record in handle.calls)
    torch.testing.assert_close(out, stock, rtol=0, atol=0)
