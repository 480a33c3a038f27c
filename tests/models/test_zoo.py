"""Every diffusers model class in the zoo (``diffattn.testing.zoo``): ``Dense`` gives bitwise the stock output, a
masked method changes it and ``remove()`` restores the stock output exactly, and the token grid the runtime reads
is the hand-counted one. Every refused class raises ``UnsupportedModelError`` with its reason."""

from __future__ import annotations

import pytest
import torch
from support import Recording

import diffattn
from diffattn.testing.zoo import zoo_cases, zoo_refusals

CASES = zoo_cases()
REFUSALS = zoo_refusals()


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)


def _batch(inputs: dict) -> int:
    for key in ("hidden_states", "sample", "x", "input_ids"):
        if isinstance(inputs.get(key), torch.Tensor):
            return inputs[key].shape[0]
    raise AssertionError(f"no latent input among {sorted(inputs)}")


def _run(model, inputs):
    with torch.no_grad(), diffattn.denoising_step(0, 1, batch_roles=("cond",) * _batch(inputs)):
        return _first(model(**inputs))


def _even_keys(q_idx, kv_idx, ctx):
    return (kv_idx % 2) == 0


@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def built(request):
    case = request.param
    model = case.build()
    inputs = case.inputs()
    return case, model, inputs, _run(model, inputs)


def test_dense_is_bitwise_stock(built):
    case, model, inputs, stock = built
    with diffattn.apply(model, diffattn.Dense()) as handle:
        out = _run(model, inputs)
        assert handle.acted(), f"{case.id}: Dense acted on no layer"
    assert torch.equal(out, stock)


def test_masked_method_acts_and_remove_restores_stock(built):
    case, model, inputs, stock = built
    with diffattn.apply(model, diffattn.Masked(_even_keys)) as handle:
        out = _run(model, inputs)
        assert handle.acted()
    assert not torch.equal(out, stock), f"{case.id}: a mask over half the keys changed nothing"
    assert torch.equal(_run(model, inputs), stock)


def test_grid_is_the_hand_counted_one(built):
    case, model, inputs, _ = built
    method = Recording(
        read=lambda q, k, ctx: (ctx.input_grid, ctx.role, ctx.q_layout.num_visual, ctx.kv_layout.text_len),
        roles=frozenset(diffattn.context.ROLES),
    )
    with diffattn.apply(model, method):
        _run(model, inputs)
    assert method.seen
    assert {grid for grid, *_ in method.seen} == {case.grid}
    if case.text_len is not None:
        texts = {text for _, role, _, text in method.seen if role in ("cross", "joint")}
        assert texts, f"{case.id}: no cross or joint layer saw the text"


@pytest.mark.parametrize("refusal", REFUSALS, ids=[r.model_class for r in REFUSALS])
def test_refused_class_says_why(refusal):
    if refusal.build is None:
        pytest.skip(f"{refusal.model_class} cannot be built here")
    with pytest.raises(diffattn.UnsupportedModelError, match=refusal.reason):
        diffattn.apply(refusal.build(), diffattn.Dense())


def test_flux_img_ids_without_a_zero_first_column_give_the_grid():
    """img_ids whose first column is not 0 (another modality id) used to crash inside diffattn (max() of nothing):
    the grid is read from the rows of the first row's modality; ids that contradict the tokens raise LayoutError."""
    from diffattn.testing import tiny_inputs, tiny_model

    model = tiny_model("flux")
    inputs = tiny_inputs("flux", (3, 5), text_len=7)
    inputs["img_ids"] = inputs["img_ids"].clone()
    inputs["img_ids"][..., 0] = 1
    method = Recording(read=lambda q, k, ctx: ctx.input_grid, roles=frozenset({"joint"}))
    with diffattn.apply(model, method):
        _run(model, inputs)
    assert set(method.seen) == {(3, 5)}
    inputs["img_ids"] = inputs["img_ids"][..., :1, :].expand_as(inputs["img_ids"]).clone()  # every row the same
    with diffattn.apply(model, diffattn.Dense()), pytest.raises(diffattn.LayoutError, match="img_ids"):
        _run(model, inputs)


@pytest.mark.parametrize(
    ("model_class", "given", "expected"),
    [
        ("Lumina2Transformer2DModel", 0.25, 750.0),  # the pipeline passes 1 - t / 1000
        ("ZImageTransformer2DModel", 0.25, 750.0),  # the same, as the input ``t``
        ("HiDreamImageTransformer2DModel", 250.0, 250.0),  # on the schedulers' scale, as ``timesteps``
        ("FluxTransformer2DModel", 0.25, 250.0),  # t / 1000
    ],
)
def test_methods_see_the_timestep_on_the_schedulers_scale(model_class, given, expected):
    case = next(c for c in CASES if c.model_class == model_class)
    model, inputs = case.build(), case.inputs()
    adapter = diffattn.adapters.adapter_for(model)
    old = inputs[adapter.timestep_input]
    inputs[adapter.timestep_input] = torch.full_like(old, given) if isinstance(old, torch.Tensor) else given
    method = Recording(read=lambda q, k, ctx: ctx.timestep, roles=frozenset(diffattn.context.ROLES))
    with diffattn.apply(model, method):
        _run(model, inputs)
    assert method.seen and all(t == pytest.approx(expected) for t in method.seen)


def test_padded_text_that_neither_attends_nor_is_attended_keeps_dense_bitwise_and_sparse_acts():
    """HunyuanVideo 1.5 masks padded text as query_valid & key_valid: sparse methods read it as key padding (the
    padded rows get what the stock call gives a query that sees no key), and Dense stays bitwise stock."""
    case = next(c for c in CASES if c.model_class == "HunyuanVideo15Transformer3DModel")
    model, inputs = case.build(), case.inputs()
    inputs["encoder_attention_mask"] = inputs["encoder_attention_mask"].clone()
    inputs["encoder_attention_mask"][:, -2:] = 0  # the last two text tokens are padding
    stock = _run(model, inputs)
    with diffattn.apply(model, diffattn.Dense()):
        assert torch.equal(_run(model, inputs), stock)
    with diffattn.apply(model, diffattn.SlidingTileAttention(tile=(1, 1, 1), window=(1, 3, 3))) as handle:
        out = _run(model, inputs)
        assert handle.acted()
    assert torch.isfinite(out).all() and not torch.equal(out, stock)
