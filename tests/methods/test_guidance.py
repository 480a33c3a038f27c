"""Perturbed-attention guidance (PAG, SoftPAG, SEG) on the standard pipelines.

Reference equality with diffusers' StableDiffusionPAGPipeline / StableDiffusionXLPAGPipeline /
StableDiffusion3PAGPipeline, the limiting cases (scale 0, u = 0 / 1, sigma -> 0 / inf, one token), the attention-level
definitions (identity path, joint image -> image identity, SoftPAG linearity and head slices, SEG blur), the flex
backend, layer selection and removal.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import global_attention_backend_restored

import diffattn
from diffattn import guidance
from diffattn.context import AttentionContext
from diffattn.errors import InterceptionError, LayerSelectionError, LayoutError
from diffattn.guidance import PAG, SEG, SoftPAG
from diffattn.layout import TokenLayout
from diffattn.methods.seg import blur_tokens, gaussian_blur_matrix
from diffattn.testing import tiny_inputs, tiny_model, tiny_pipeline

STEPS = 2
KINDS = ("sd", "sdxl", "sd3", "flux", "wan")
# Stock Wan gives identical batch entries outputs that differ by ~3e-7 (so do batches of different sizes, for every
# family): the "no perturbation" checks use this tolerance where the batch changes, and exact equality elsewhere.
BATCH_NOISE = 1e-5


@functools.cache
def pipeline(kind: str):
    return tiny_pipeline(kind, seed=0)


@functools.cache
def sd3_without_qk_norm():
    """The tiny SD3 pipeline with a transformer diffusers' SD3 PAG processor computes correctly (it drops qk-norm)."""
    import diffusers

    sd3 = pipeline("sd3")
    config = {**sd3.transformer.config, "qk_norm": None, "dual_attention_layers": ()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        transformer = diffusers.SD3Transformer2DModel.from_config(config).eval()
    components = {**_components(sd3), "transformer": transformer}
    pipe = diffusers.StableDiffusion3Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _components(pipe) -> dict:
    """SD3 components without the image encoder, which StableDiffusion3PAGPipeline does not take."""
    return {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "feature_extractor")}


def reference_pag(kind: str):
    """diffusers' own PAG pipeline over the same components, PAG on the same layers as diffattn's default."""
    import diffusers

    if kind == "sd":
        pipe = diffusers.StableDiffusionPAGPipeline(**pipeline("sd").components, pag_applied_layers="mid")
    elif kind == "sdxl":
        pipe = diffusers.StableDiffusionXLPAGPipeline(**pipeline("sdxl").components, pag_applied_layers="mid")
    else:
        components = _components(sd3_without_qk_norm())
        pipe = diffusers.StableDiffusion3PAGPipeline(**components, pag_applied_layers="blocks.1")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours(kind: str):
    return sd3_without_qk_norm() if kind == "sd3_plain" else pipeline(kind)


def generate(pipe, kind: str, *, output_type: str = "np", **kwargs) -> np.ndarray:
    size = dict(num_frames=5, height=16, width=16) if kind == "wan" else dict(height=32, width=32)
    if kind == "flux" and "true_cfg_scale" not in kwargs:
        kwargs.update(true_cfg_scale=4.0, negative_prompt="a blue square")  # Flux's separate-call CFG
    out = pipe(
        "a red circle",
        num_inference_steps=STEPS,
        output_type=output_type,
        generator=torch.Generator().manual_seed(0),
        **size,
        **kwargs,
    )
    if output_type == "latent":
        return (out.frames if kind == "wan" else out.images).numpy()
    return np.asarray(out.frames if kind == "wan" else out.images)


def denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def relative_diff(a, b) -> float:
    """Max difference relative to the largest magnitude (latents of Euler schedulers reach a few hundred)."""
    return max_diff(a, b) / float(np.abs(np.asarray(b, dtype=np.float64)).max())


# ------------------------------------------------------------------------------------------------------------------
# Equality with diffusers' PAG pipelines
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["native", "flex"])
@pytest.mark.parametrize(
    "kind,cfg", [("sd", 7.5), ("sd", 1.0), ("sdxl", 5.0), ("sdxl", 1.0), ("sd3", 7.0), ("sd3", 1.0)]
)
def test_matches_diffusers_pag_pipeline(kind, cfg, backend):
    pipe = sd3_without_qk_norm() if kind == "sd3" else pipeline(kind)
    ref = reference_pag(kind)
    with global_attention_backend_restored():
        if backend == "flex":
            denoiser(pipe).set_attention_backend("flex")
        try:
            base = generate(pipe, kind, guidance_scale=cfg, output_type="latent")
            expected = {
                t: generate(ref, kind, guidance_scale=cfg, pag_scale=3.0, output_type=t) for t in ("latent", "np")
            }
            with guidance.enable(pipe, PAG(scale=3.0)) as handle:
                got = {t: generate(pipe, kind, guidance_scale=cfg, output_type=t) for t in ("latent", "np")}
                assert {r.step for r in handle.records} == set(range(STEPS))
        finally:
            denoiser(pipe).reset_attention_backend()
    assert relative_diff(got["latent"], base) > 1e-3  # PAG has an effect far above the tolerance
    assert relative_diff(got["latent"], expected["latent"]) < 1e-6
    assert max_diff(got["np"], expected["np"]) < 1e-5


def test_matches_diffusers_adaptive_scale_and_several_images():
    pipe, ref = pipeline("sd"), reference_pag("sd")
    kwargs = dict(guidance_scale=7.5, num_images_per_prompt=2, output_type="latent")
    expected = generate(ref, "sd", pag_scale=3.0, pag_adaptive_scale=0.002, **kwargs)
    with guidance.enable(pipe, PAG(scale=3.0, adaptive_scale=0.002)) as handle:
        got = generate(pipe, "sd", **kwargs)
        scales = [r.scale for r in handle.records]
    timesteps = pipe.scheduler.timesteps.tolist()
    assert scales == pytest.approx([3.0 - 0.002 * (1000 - t) for t in timesteps])
    assert relative_diff(got, expected) < 1e-6
    assert relative_diff(got, generate(ref, "sd", pag_scale=3.0, **kwargs)) > 1e-4  # the adaptive scale matters


def test_adaptive_scale_formula_matches_diffusers():
    from diffusers.pipelines.pag.pag_utils import PAGMixin

    mixin = PAGMixin()
    mixin._pag_scale, mixin._pag_adaptive_scale, mixin.pag_applied_layers = 3.0, 0.01, ["mid"]
    method = PAG(scale=3.0, adaptive_scale=0.01)
    for t in (999.0, 900.0, 800.5, 701.0, 500.0, 0.0):
        assert method.scale_at(t) == pytest.approx(float(mixin._get_pag_scale(torch.tensor(t))))
    assert PAG(scale=3.0).scale_at(0.0) == 3.0


def test_diffusers_sd3_pag_drops_qk_norm_ours_keeps_the_unperturbed_branch():
    """Known diffusers difference: its SD3 PAG processor skips qk-norm (SD3.5) in *both* branches, so with a nearly
    zero PAG scale it is not the base pipeline; diffattn's unperturbed branch is the stock processor."""
    sd3 = pipeline("sd3")  # qk_norm="rms_norm"
    import diffusers

    ref = diffusers.StableDiffusion3PAGPipeline(**_components(sd3), pag_applied_layers="blocks.1")
    ref.set_progress_bar_config(disable=True)
    base = generate(sd3, "sd3", guidance_scale=7.0, output_type="latent")
    with guidance.enable(sd3, PAG(scale=1e-6)):
        assert relative_diff(generate(sd3, "sd3", guidance_scale=7.0, output_type="latent"), base) < 1e-6
    assert relative_diff(generate(ref, "sd3", guidance_scale=7.0, pag_scale=1e-6, output_type="latent"), base) > 1e-3


# ------------------------------------------------------------------------------------------------------------------
# Limiting cases on every pipeline
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_limits_on_every_pipeline(kind):
    pipe = pipeline(kind)
    base = generate(pipe, kind)
    # scale 0 (and u = 0, sigma = 0) run no extra entry: bitwise the base pipeline
    for method in (PAG(scale=0.0), SoftPAG(u=0.0), SEG(sigma=0.0)):
        with guidance.enable(pipe, method) as handle:
            assert np.array_equal(generate(pipe, kind), base), method
            assert handle.records == []
    with guidance.enable(pipe, PAG()) as handle:
        pag = generate(pipe, kind)
        assert len(handle.records) == STEPS and all(r.delta > 0 for r in handle.records)
    assert max_diff(pag, base) > 1e-3
    with guidance.enable(pipe, SoftPAG(u=1.0)):
        assert np.array_equal(generate(pipe, kind), pag)  # u = 1 is PAG, bitwise
    with guidance.enable(pipe, SoftPAG(u=0.5)):
        half = generate(pipe, kind)
    assert max_diff(half, base) > 1e-4 and max_diff(half, pag) > 1e-4
    # sigma -> 0: the perturbed branch runs and equals the conditional one
    with guidance.enable(pipe, SEG(sigma=1e-3)) as handle:
        tiny_sigma = generate(pipe, kind)
        assert len(handle.records) == STEPS
        assert all(r.delta <= (BATCH_NOISE if kind == "wan" else 0.0) for r in handle.records)
    assert max_diff(tiny_sigma, base) < BATCH_NOISE
    with guidance.enable(pipe, SEG(sigma=math.inf)):
        assert max_diff(generate(pipe, kind), base) > 1e-3
    # removed: bitwise the base again
    assert np.array_equal(generate(pipe, kind), base)


@pytest.mark.parametrize("family,grid", [("unet_sd15", (1, 1)), ("sd3", (1, 1)), ("flux", (1, 1)), ("wan", (1, 1, 1))])
def test_one_token_makes_pag_a_no_op(family, grid):
    model = tiny_model(family)
    inputs = tiny_inputs(family, grid, batch=2)
    target = model
    # self-attention identity is bitwise the one-token attention; the joint image->image identity is computed by its
    # own O(N T) softmax, equal to SDPA's to float rounding
    tolerance = {"unet_sd15": 0.0, "wan": BATCH_NOISE}.get(family, 1e-6)
    methods = [PAG(layers=None), SEG(), SoftPAG(u=0.3)]
    if family in ("sd3", "flux"):  # joint attention: the "full" variant also rewrites text rows, so it does act
        methods.append(PAG(joint="full"))
    for method in methods:
        with guidance.enable(target, method) as handle:
            if hasattr(model, "cache_context"):
                with model.cache_context("cond"):
                    model(**inputs)
            else:  # UNet, SD3: no cache_context; the call declares its batch
                with diffattn.denoising_step(batch_roles=("cond",) * 2):
                    model(**inputs)
            (record,) = handle.records
        if getattr(method, "joint", "image") == "full":
            assert record.delta > 1e-3
        else:
            assert record.delta <= tolerance, method


# ------------------------------------------------------------------------------------------------------------------
# The attention core: definitions, untouched entries and heads
# ------------------------------------------------------------------------------------------------------------------
def make_ctx(roles, layout, *, role="self", mask=None, layer="blocks.0.attn1"):
    def dense(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return AttentionContext(
        layer=layer,
        role=role,
        step=0,
        num_steps=1,
        q_layout=layout,
        kv_layout=layout,
        batch_roles=tuple(roles),
        attn_mask=mask,
        scale=None,
        enable_gqa=False,
        dense=dense,
    )


def qkv(batch, heads, tokens, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, tokens, dim, generator=g) for _ in range(3)]


ROLES3 = ("uncond", "cond", "perturbed")


def test_identity_path_and_untouched_entries():
    layout = TokenLayout((3, 5))
    q, k, v = qkv(3, 2, 15)
    ctx = make_ctx(ROLES3, layout)
    out = PAG()(q, k, v, ctx)
    dense = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out[:2], dense[:2])  # non-perturbed entries: bitwise the stock core
    assert torch.equal(out[2], v[2])  # identity: output = V exactly
    off_diagonal = torch.full((15, 15), float("-inf")).fill_diagonal_(0.0)
    assert torch.allclose(
        out[2], F.scaled_dot_product_attention(q[2:], k[2:], v[2:], attn_mask=off_diagonal)[0], atol=1e-6
    )
    # the non-perturbed entries do not depend on the perturbed entry's input
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[2] = torch.randn_like(x[2])
    assert torch.equal(PAG()(q2, k2, v2, ctx)[:2], out[:2])
    # no perturbed entry: the method is the stock core
    assert torch.equal(PAG()(q, k, v, make_ctx(("uncond", "cond", "cond"), layout)), dense)


def _diffusers_joint_mask(layout: TokenLayout) -> torch.Tensor:
    n = layout.num_tokens
    mask = torch.zeros(n, n)
    vis = layout.visual_slice
    block = torch.full((layout.num_visual, layout.num_visual), float("-inf")).fill_diagonal_(0.0)
    mask[vis, vis] = block
    return mask


@pytest.mark.parametrize("text_first", [False, True])
def test_joint_identity_variants(text_first):
    layout = TokenLayout((2, 3), text_len=4, text_first=text_first)
    q, k, v = qkv(2, 2, layout.num_tokens, seed=1)
    ctx = make_ctx(("cond", "perturbed"), layout, role="joint", layer="transformer_blocks.0.attn")
    dense = F.scaled_dot_product_attention(q, k, v)
    image = PAG()(q, k, v, ctx)
    assert torch.equal(image[0], dense[0])
    expected = F.scaled_dot_product_attention(q[1:], k[1:], v[1:], attn_mask=_diffusers_joint_mask(layout))[0]
    assert torch.allclose(image[1], expected, atol=1e-6)
    assert torch.equal(image[1, :, layout.text_slice], dense[1, :, layout.text_slice])  # text rows unchanged
    full = PAG(joint="full")(q, k, v, ctx)
    assert torch.equal(full[1], v[1]) and torch.equal(full[0], dense[0])


def test_joint_identity_keeps_key_padding():
    """A boolean key-padding mask on the text (HunyuanVideo-style) still applies to the image rows' text keys."""
    layout = TokenLayout((2, 2), text_len=3)
    q, k, v = qkv(2, 1, layout.num_tokens, seed=2)
    keep = torch.ones(2, 1, 1, layout.num_tokens, dtype=torch.bool)
    keep[:, :, :, -1] = False  # last text token is padding
    ctx = make_ctx(("cond", "perturbed"), layout, role="joint", mask=keep, layer="transformer_blocks.0.attn")
    out = PAG()(q, k, v, ctx)
    mask = _diffusers_joint_mask(layout).masked_fill(~keep[1, 0], float("-inf"))
    expected = F.scaled_dot_product_attention(q[1:], k[1:], v[1:], attn_mask=mask)[0]
    assert torch.allclose(out[1], expected, atol=1e-6)


@pytest.mark.parametrize("role", ["self", "joint"])
def test_softpag_is_linear_in_u_and_heads_are_sliced(role):
    layout = TokenLayout((3, 4), text_len=2 if role == "joint" else 0)
    q, k, v = qkv(3, 4, layout.num_tokens, seed=3)
    ctx = make_ctx(ROLES3, layout, role=role, layer="transformer_blocks.0.attn")
    dense = F.scaled_dot_product_attention(q, k, v)
    pag = PAG()(q, k, v, ctx)
    assert torch.equal(SoftPAG(u=0.0)(q, k, v, ctx), dense)
    assert torch.equal(SoftPAG(u=1.0)(q, k, v, ctx), pag)
    for u in (0.25, 0.6):
        assert torch.allclose(SoftPAG(u=u)(q, k, v, ctx), (1 - u) * dense + u * pag, atol=1e-6)
    heads = SoftPAG(u=0.7, heads=[1, 3])(q, k, v, ctx)
    others = [0, 2]
    assert torch.equal(heads[:2], dense[:2])
    assert torch.equal(heads[2, others], dense[2, others])
    assert torch.equal(heads[2, [1, 3]], SoftPAG(u=0.7)(q, k, v, ctx)[2, [1, 3]])
    per_layer = PAG(heads={"transformer_blocks.0": [2]})
    assert per_layer.layers == ("transformer_blocks.0",)
    out = per_layer(q, k, v, ctx)
    assert torch.equal(out[2, 2], pag[2, 2]) and torch.equal(out[2, [0, 1, 3]], dense[2, [0, 1, 3]])
    with pytest.raises(LayerSelectionError, match="head 7"):
        PAG(heads=[7])(q, k, v, ctx)


def _folded_blur_reference(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Direct 1-D Gaussian blur with mirrored borders (… 1 0 | 0 1 …), the obvious way, along dim 0."""
    n = x.shape[0]
    radius = math.ceil(10 * sigma)
    weights = {d: math.exp(-0.5 * (d / sigma) ** 2) for d in range(-radius, radius + 1)}
    total = sum(weights.values())
    out = torch.zeros_like(x, dtype=torch.float64)
    for i in range(n):
        for d, w in weights.items():
            p = (i + d) % (2 * n)
            j = p if p < n else 2 * n - 1 - p
            out[i] += w / total * x[j].double()
    return out


def test_gaussian_blur_matrix():
    x = torch.randn(7, 3, dtype=torch.float64)
    for sigma in (0.5, 1.3, 4.0):
        assert torch.allclose(gaussian_blur_matrix(7, sigma) @ x, _folded_blur_reference(x, sigma), atol=1e-12)
    for n, sigma in ((5, 2.0), (1, 3.0), (4, 1e6)):
        m = gaussian_blur_matrix(n, sigma)
        assert torch.allclose(m.sum(1), torch.ones(n, dtype=torch.float64)) and bool((m >= 0).all())
    assert torch.equal(gaussian_blur_matrix(6, 1e-3), torch.eye(6, dtype=torch.float64))
    assert torch.allclose(gaussian_blur_matrix(6, 18.0), torch.full((6, 6), 1 / 6, dtype=torch.float64))


@pytest.mark.parametrize("grid", [(3, 5), (2, 3, 4)])
def test_seg_blur_on_any_grid(grid):
    layout = TokenLayout(grid)
    n = layout.num_tokens
    q, k, v = qkv(2, 2, n, seed=4)
    ctx = make_ctx(("cond", "perturbed"), layout)
    dense = F.scaled_dot_product_attention(q, k, v)
    infinite = SEG(sigma=math.inf)(q, k, v, ctx)
    assert torch.equal(infinite[0], dense[0])
    assert torch.allclose(infinite[1], infinite[1, :, :1].expand_as(infinite[1]), atol=1e-6)  # every row equal
    assert torch.equal(SEG(sigma=1e-3)(q, k, v, ctx), dense)
    for faithful in (True, False):  # the authors' truncated kernel (default) and diffattn's untruncated Gaussian
        # query blur == blur of the logits along the query axis
        sigma = 1.5
        blurred = blur_tokens(q[1:].double(), grid, sigma, faithful)
        logits = (q[1:].double() @ k[1:].double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        blurred_logits = blur_tokens(logits, grid, sigma, faithful)
        assert torch.allclose(
            blurred @ k[1:].double().transpose(-1, -2) / math.sqrt(q.shape[-1]), blurred_logits, atol=1e-10
        )
        expected = torch.softmax(blurred_logits, -1) @ v[1:].double()
        assert torch.allclose(SEG(sigma=sigma, faithful=faithful)(q, k, v, ctx)[1:].double(), expected, atol=1e-5)
        # the perturbation grows with sigma (catches an inverted sigma branch). Not past sigma = 1 for the authors'
        # kernel on axes of 2-4 tokens: clamped to 3-5 taps with whole-sample reflection it counts the mirrored
        # neighbours twice and overshoots the mean (sigma = 2 moved the output more than inf on the 2 x 3 x 4 grid)
        sigmas = (0.25, 0.5, 1.0, math.inf) if faithful else (0.25, 0.5, 1.0, 2.0, math.inf)
        sizes = [float((SEG(sigma=s, faithful=faithful)(q, k, v, ctx)[1] - dense[1]).norm()) for s in sigmas]
        assert sizes == sorted(sizes) and sizes[0] > 0


def test_seg_blurs_only_visual_queries_of_joint_attention():
    layout = TokenLayout((2, 3), text_len=3, text_first=True)
    q, k, v = qkv(2, 2, layout.num_tokens, seed=5)
    ctx = make_ctx(("cond", "perturbed"), layout, role="joint", layer="transformer_blocks.0.attn")
    out = SEG()(q, k, v, ctx)
    dense = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out[0], dense[0])
    assert torch.equal(out[1, :, layout.text_slice], dense[1, :, layout.text_slice])
    visual = out[1, :, layout.visual_slice]
    assert torch.allclose(visual, visual[:, :1].expand_as(visual), atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# Batches, separate CFG calls, steps
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class RecordingPAG(PAG):
    """PAG that remembers the batch roles of every call it handles."""

    seen: list = field(default_factory=list, compare=False, hash=False)

    def __call__(self, q, k, v, ctx):
        self.seen.append(ctx.batch_roles)
        return super().__call__(q, k, v, ctx)


def test_batch_roles_reach_the_methods():
    sd = pipeline("sd")
    method = RecordingPAG()
    with guidance.enable(sd, method):
        generate(sd, "sd", guidance_scale=7.5, num_images_per_prompt=2)
        assert set(method.seen) == {("uncond",) * 2 + ("cond",) * 2 + ("perturbed",) * 2}
        method.seen.clear()
        generate(sd, "sd", guidance_scale=1.0)
        assert set(method.seen) == {("cond", "perturbed")}
    wan = pipeline("wan")
    method = RecordingPAG()
    with guidance.enable(wan, method) as handle:
        generate(wan, "wan", guidance_scale=5.0)
    # the method acts in the conditional call only; the unconditional call runs the stock attention (own backend)
    assert method.seen == [("cond", "perturbed")] * STEPS
    assert [c.acted for c in handle.attention.calls] == [True, False] * STEPS


def test_separate_cfg_calls_get_the_same_shift():
    """Flux/Wan-style CFG (two calls): cond and uncond predictions are both shifted by s (cond - perturbed), so
    uncond' + g (cond' - uncond') = uncond + g (cond - uncond) + s (cond - perturbed) for every g."""
    model = tiny_model("flux")
    cond_inputs = tiny_inputs("flux", (3, 4), seed=1)
    negative = tiny_inputs("flux", (3, 4), seed=2)["encoder_hidden_states"]
    uncond_inputs = {**cond_inputs, "encoder_hidden_states": negative}

    @torch.no_grad()
    def run():
        with model.cache_context("cond"):
            c = model(**cond_inputs)[0]
        with model.cache_context("uncond"):
            u = model(**uncond_inputs)[0]
        return c, u

    c, u = run()
    with guidance.enable(model, PAG(scale=2.0)) as handle:
        c2, u2 = run()
        (record,) = handle.records
    shift_c, shift_u = c2 - c, u2 - u
    assert float(shift_c.abs().max()) == pytest.approx(2.0 * record.delta, abs=BATCH_NOISE)
    assert record.delta > 1e-2
    assert torch.allclose(shift_c, shift_u, atol=BATCH_NOISE)
    with guidance.enable(model, PAG(scale=2.0)):
        with model.cache_context("uncond"), pytest.raises(InterceptionError, match="unconditional call before"):
            model(**uncond_inputs)
        with pytest.raises(LayoutError, match="cannot tell which batch entries"):
            model(**cond_inputs)  # no cache context and no pipeline: roles unknown


def test_steps_and_timestep_scale():
    flux = pipeline("flux")
    with guidance.enable(flux, PAG(steps=[1])) as handle:
        generate(flux, "flux", guidance_scale=3.5)
        (record,) = handle.records
    assert record.step == 1
    assert record.timestep == pytest.approx(float(flux.scheduler.timesteps[1]), rel=1e-5)  # 1000-step scale


# ------------------------------------------------------------------------------------------------------------------
# Layers, defaults, heads, lifecycle
# ------------------------------------------------------------------------------------------------------------------
def test_default_layers_per_family():
    expected = {
        "sd": ["mid_block.attentions.0.transformer_blocks.0.attn1"],
        "sdxl": [f"mid_block.attentions.0.transformer_blocks.{i}.attn1" for i in (0, 1)],
        "sd3": ["transformer_blocks.1.attn"],
        "flux": ["transformer_blocks.0.attn"],
        "wan": ["blocks.1.attn1"],
    }
    for kind, layers in expected.items():
        with guidance.enable(pipeline(kind), PAG()) as handle:
            assert handle.layers == layers, kind


@functools.cache
def wan_with_11_blocks():
    import diffusers

    config = {**tiny_model("wan").config, "num_layers": 11}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return diffusers.WanTransformer3DModel.from_config(config).eval()


def test_layer_selection_is_anchored():
    model = wan_with_11_blocks()
    names = [n for n, _ in diffattn.attention_modules(model)]
    # what an unanchored search (diffusers' PAG layer matching) selects for "blocks.1"
    assert {"blocks.1.attn1", "blocks.10.attn1"} <= {n for n in names if re.search("blocks.1", n)}
    with guidance.enable(model, PAG(layers="blocks.1")) as handle:
        assert handle.layers == ["blocks.1.attn1"]
        with model.cache_context("cond"):
            model(**tiny_inputs("wan", (1, 2, 2)))
        assert {c.layer for c in handle.attention.calls if c.acted} == {"blocks.1.attn1"}
    with guidance.enable(model, PAG()) as handle:
        assert handle.layers == ["blocks.5.attn1"]  # the middle block


def test_cross_attention_is_never_perturbed_and_nothing_matched_is_an_error():
    sd = pipeline("sd")
    with guidance.enable(sd, PAG(layers=["down_blocks.0", "mid_block"])) as handle:
        assert handle.layers and all(n.endswith("attn1") for n in handle.layers)
    with pytest.raises(LayerSelectionError, match="cross-attention"):
        guidance.enable(sd, PAG(layers=["mid_block", r"mid_block\.attentions\.0\.transformer_blocks\.0\.attn2"]))
    with pytest.raises(LayerSelectionError, match="matches no attention layer"):
        guidance.enable(sd, PAG(layers="mid"))  # whole parts: "mid" is not "mid_block"
    with pytest.raises(ValueError, match="cross-attention is never"):
        PAG(roles={"self", "cross"})
    with pytest.raises(ValueError, match="leave layers=None"):
        PAG(layers="mid_block", heads={"mid_block": [0]})
    with pytest.raises(ValueError, match="u must be in"):
        SoftPAG(u=1.5)
    with pytest.raises(ValueError, match="sigma"):
        SEG(sigma=-1.0)
    with pytest.raises(TypeError, match="PAG, SoftPAG or SEG"):
        guidance.enable(sd, diffattn.Dense())
    # nothing is left installed after a refused enable
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in sd.unet.attn_processors.values())


def test_head_selection_on_a_pipeline():
    sd3 = pipeline("sd3")
    base = generate(sd3, "sd3")
    with guidance.enable(sd3, PAG()):
        all_heads = generate(sd3, "sd3")
    with guidance.enable(sd3, PAG(heads={r"transformer_blocks\.1\.attn": [1]})) as handle:
        assert handle.layers == ["transformer_blocks.1.attn"]
        one_head = generate(sd3, "sd3")
    assert max_diff(one_head, base) > 1e-4 and max_diff(one_head, all_heads) > 1e-4


def test_guidance_survives_replaced_processors_and_remove_is_exact():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    sd = pipeline("sd")
    base = generate(sd, "sd")
    handle = guidance.enable(sd, PAG())
    guided = generate(sd, "sd")
    assert max_diff(guided, base) > 1e-3
    with pytest.raises(diffattn.DiffattnError, match="already has guidance"):
        guidance.enable(sd, SEG())  # one guidance method per model
    with pytest.raises(diffattn.DiffattnError, match="guidance.enable"):
        diffattn.apply(sd, PAG(scale=5))  # never a silent no-op
    mine = AttnProcessor2_0()
    sd.unet.set_attn_processor(mine)  # e.g. another library resets every processor: guidance keeps acting
    assert np.array_equal(generate(sd, "sd"), guided)
    sd.unet.set_attn_processor(AttnProcessor())  # no SDPA core: loud, never silently unguided
    with pytest.raises(InterceptionError):
        generate(sd, "sd")
    sd.unet.set_attn_processor(mine)
    diffattn.remove(sd)  # the generic remove also removes guidance
    assert np.array_equal(generate(sd, "sd"), base)
    assert all(m.processor is mine for _, m in diffattn.attention_modules(sd.unet))
    handle.remove()  # a stale handle: harmless
    registry = getattr(sd.unet, "_diffusers_hook", None)
    assert registry is None or not any(name.startswith("diffattn") for name in registry.hooks)
    assert np.array_equal(generate(sd, "sd"), base)


@pytest.mark.parametrize("kind", ["flux", "wan"])
def test_flex_backend(kind):
    """Flux and Wan reach attention through dispatch_attention_fn: under the flex backend the perturbed layers still
    perturb (diffusers' guider-based PAG silently does nothing there), the other layers keep using flex."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    pipe = pipeline(kind)
    model = denoiser(pipe)
    native = {"base": generate(pipe, kind)}
    with guidance.enable(pipe, PAG()):
        native["pag"] = generate(pipe, kind)
    flex_fn = _AttentionBackendRegistry._backends[AttentionBackendName.FLEX]
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return flex_fn(*args, **kwargs)

    with global_attention_backend_restored():
        model.set_attention_backend("flex")
        _AttentionBackendRegistry._backends[AttentionBackendName.FLEX] = counting
        try:
            base = generate(pipe, kind)
            with guidance.enable(pipe, PAG(scale=0.0)):
                assert np.array_equal(generate(pipe, kind), base)
            with guidance.enable(pipe, PAG()) as handle:
                calls.clear()
                pag = generate(pipe, kind)
                assert calls and len(handle.records) == STEPS
            with guidance.enable(pipe, SoftPAG(u=1.0)):
                assert np.array_equal(generate(pipe, kind), pag)
            assert all(
                getattr(p, "_attention_backend", None) == AttentionBackendName.FLEX
                for p in model.attn_processors.values()
            )
        finally:
            _AttentionBackendRegistry._backends[AttentionBackendName.FLEX] = flex_fn
            model.reset_attention_backend()
    assert max_diff(pag, base) > 1e-3
    assert max_diff(pag, native["pag"]) < 1e-5 and max_diff(base, native["base"]) < 1e-5
