"""Tests for the tiny offline models, inputs and pipelines in ``diffattn.testing``."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from diffattn.testing import (
    COGVIDEOX_TEXT_LEN,
    FAMILIES,
    PIPELINE_KINDS,
    VIDEO_FAMILIES,
    tiny_inputs,
    tiny_model,
    tiny_pipeline,
    visual_grid_of,
)

IMAGE_GRIDS = {"square": (4, 4), "non_square": (4, 6), "odd": (5, 3)}
VIDEO_GRIDS = {"square": (1, 4, 4), "non_square": (1, 4, 6), "odd": (1, 5, 3), "multi_frame": (3, 4, 6)}

CASES = [
    (family, name, grid)
    for family in FAMILIES
    for name, grid in (VIDEO_GRIDS if family in VIDEO_FAMILIES else IMAGE_GRIDS).items()
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads; one thread avoids stalls when the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def _model(family: str) -> torch.nn.Module:
    return tiny_model(family)


def _default_grid(family: str) -> tuple[int, ...]:
    return VIDEO_GRIDS["multi_frame"] if family in VIDEO_FAMILIES else IMAGE_GRIDS["non_square"]


def _expected_shape(family: str, grid: tuple[int, ...], batch: int) -> tuple[int, ...]:
    """Prediction shape, written out per family independently of tiny_inputs."""
    b = batch
    if family in ("unet_sd15", "unet_sdxl"):
        h, w = grid
        return (b, 4, h, w)
    if family == "sd3":
        h, w = grid
        return (b, 4, 2 * h, 2 * w)
    if family == "flux":
        h, w = grid
        return (b, h * w, 16)
    f, h, w = grid
    return {
        "wan": (b, 16, f, 2 * h, 2 * w),
        "cogvideox": (b, f, 4, 2 * h, 2 * w),
        "hunyuan_video": (b, 4, f, 2 * h, 2 * w),
        "ltx_video": (b, f * h * w, 8),
    }[family]


def _forward(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    assert isinstance(out, tuple), "return_dict=False should give a tuple"
    return out[0]


@pytest.mark.parametrize(("family", "name", "grid"), CASES, ids=[f"{f}-{n}" for f, n, _ in CASES])
def test_forward_shape_finite_and_grid_roundtrip(family: str, name: str, grid: tuple[int, ...]) -> None:
    inputs = tiny_inputs(family, grid)
    assert visual_grid_of(family, inputs) == grid
    out = _forward(_model(family), inputs)
    assert tuple(out.shape) == _expected_shape(family, grid, 1)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.std() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_two(family: str) -> None:
    grid = _default_grid(family)
    inputs = tiny_inputs(family, grid, batch=2, seed=3)
    assert visual_grid_of(family, inputs) == grid
    out = _forward(_model(family), inputs)
    assert tuple(out.shape) == _expected_shape(family, grid, 2)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1]), "different random latents should give different predictions"


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_weights(family: str) -> None:
    rng_before = torch.random.get_rng_state()
    a, b, c = tiny_model(family, seed=0), tiny_model(family, seed=0), tiny_model(family, seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "building must not touch the global RNG"
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa), "a different seed should change the weights"
    assert not a.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in a.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_inputs_are_seeded(family: str) -> None:
    grid = _default_grid(family)
    x, y, z = tiny_inputs(family, grid, seed=0), tiny_inputs(family, grid, seed=0), tiny_inputs(family, grid, seed=1)
    assert x.keys() == y.keys()
    for key, value in x.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, y[key]), key
    assert not torch.equal(x["encoder_hidden_states"], z["encoder_hidden_states"])
    assert x["return_dict"] is False


@pytest.mark.parametrize("family", FAMILIES)
def test_every_attention_module_runs_and_text_matters(family: str) -> None:
    model = _model(family)
    names = [n for n, m in model.named_modules() if hasattr(m, "processor")]
    assert names, "the tiny model should contain attention modules"
    called: set[str] = set()
    handles = [
        m.register_forward_hook(lambda mod, args, out, n=n: called.add(n))
        for n, m in model.named_modules()
        if hasattr(m, "processor")
    ]
    try:
        inputs = tiny_inputs(family, _default_grid(family))
        out = _forward(model, inputs)
    finally:
        for h in handles:
            h.remove()
    assert called == set(names), f"attention modules never called: {sorted(set(names) - called)}"

    other = dict(inputs)
    text = inputs["encoder_hidden_states"]
    other["encoder_hidden_states"] = text + torch.randn(text.shape, generator=torch.Generator().manual_seed(9))
    assert not torch.allclose(_forward(model, other), out, atol=1e-6), "the prediction should depend on the text"


def test_expected_attention_layout() -> None:
    sd3 = [n for n, m in _model("sd3").named_modules() if hasattr(m, "processor")]
    assert sd3 == ["transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn"]
    flux = [n for n, m in _model("flux").named_modules() if hasattr(m, "processor")]
    assert flux == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    sdxl = _model("unet_sdxl")
    assert sdxl.config.addition_embed_type == "text_time" and sdxl.config.use_linear_projection
    assert not any(n.startswith("down_blocks.0.attentions") for n, _ in sdxl.named_modules())


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError):
        tiny_model("not_a_family")
    with pytest.raises(ValueError):
        tiny_inputs("flux", (2, 3, 4))
    with pytest.raises(ValueError):
        tiny_inputs("wan", (4, 4))
    with pytest.raises(ValueError):
        tiny_inputs("sd3", (0, 4))
    with pytest.raises(ValueError):
        tiny_inputs("cogvideox", (1, 4, 4), text_len=COGVIDEOX_TEXT_LEN + 1)
    with pytest.raises(ValueError):
        tiny_pipeline("not_a_pipeline")


_DENOISER = {"sd": ("unet", "unet_sd15"), "sdxl": ("unet", "unet_sdxl"), "flux": ("transformer", "flux")}
_DENOISER.update({"wan": ("transformer", "wan"), "sd3": ("transformer", "sd3")})


@pytest.mark.parametrize("kind", PIPELINE_KINDS)
def test_pipeline_two_steps(kind: str) -> None:
    pipe = tiny_pipeline(kind)
    attr, family = _DENOISER[kind]
    assert dict(getattr(pipe, attr).config) == dict(_model(family).config)

    kwargs = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "np"}
    if kind == "wan":
        kwargs["num_frames"] = 5

    def run(seed: int) -> np.ndarray:
        out = pipe("a red circle", generator=torch.Generator().manual_seed(seed), **kwargs)
        return np.asarray(out.frames if kind == "wan" else out.images)

    images = run(0)
    assert images.shape == ((1, 5, 32, 32, 3) if kind == "wan" else (1, 32, 32, 3))
    assert np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert images.std() > 0
    np.testing.assert_allclose(run(0), images, atol=1e-6)  # same generator seed, same result


def test_local_tokenizers() -> None:
    pipe = tiny_pipeline("sd3")  # has two CLIP tokenizers and a T5-style one
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        assert tok.model_max_length == 77
        ids = tok("a red circle", padding="max_length", max_length=tok.model_max_length).input_ids
        assert len(ids) == 77
        words = tok.convert_ids_to_tokens(ids[:5])
        assert words == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>"]
        assert max(ids) < pipe.text_encoder.config.vocab_size
        text = tok.decode(tok("Any text, even ünïcode?").input_ids, skip_special_tokens=True)
        assert text == "any text , even ünïcode ?"  # byte-level: nothing is unknown
    t5 = pipe.tokenizer_3
    enc = t5("a red circle", padding="max_length", max_length=16)
    assert enc.input_ids[:4] == t5.convert_tokens_to_ids(["a", "red", "circle", "</s>"])
    assert enc.input_ids[4:] == [t5.pad_token_id] * 12 and sum(enc.attention_mask) == 4
    assert max(t5("zebra 42").input_ids) < pipe.text_encoder_3.config.vocab_size
    assert t5.unk_token_id not in t5("zebra 42").input_ids  # unknown words fall back to characters
