"""A property-based sweep over every public input: ``diffattn.apply``'s ``layers=`` / ``steps=`` and each public
method's constructor parameters, with random values of right and wrong types and ranges (NaN, inf, negatives, huge
ints, strings, None, ranges, tensors, nested junk).

Every input either works as documented (the method then runs one forward of a tiny SD1.5 UNet to a finite output,
or, for guidance, one call on a perturbed batch) or is refused at the call with a ``DiffattnError``, ``ValueError``
or ``TypeError`` whose message is not empty; no other exception (AttributeError, IndexError, ZeroDivisionError, a
RuntimeError from torch, ...) escapes (issue #26, item 5). The editing methods whose internals live elsewhere
(PromptToPrompt, LocalBlend, MutualSelfAttention, AttentiveEraser) are swept at construction only."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from support import make_ctx

import diffattn
from diffattn import DiffattnError, StepSchedule, TokenLayout
from diffattn.patterns import SlidingTile, SlidingWindow
from diffattn.patterns.dynamic import POOL_MODES
from diffattn.schedule import select_layers
from diffattn.testing import tiny_inputs, tiny_model

ALLOWED = (DiffattnError, ValueError, TypeError)


def sweep(examples: int) -> settings:
    """Modest example counts (the file runs in seconds); ``DIFFATTN_SWEEP_SCALE=10`` sweeps ten times longer."""
    return settings(
        max_examples=examples * int(os.environ.get("DIFFATTN_SWEEP_SCALE", "1")),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# one transformer block at the 8x8 level and the 4x4 mid block (self and cross attention): cheap, two grid sizes
SWEEP_LAYERS = [r"down_blocks\.0\.attentions\.0", "mid_block"]
GRID = (8, 8)


def outcome(call, stage: str, names=()):
    """``(True, result)``, or ``(False, error)`` for a refusal of an allowed type whose message is not empty and, if
    ``names`` are given, names one of them (the parameter that was wrong: a bare "'int' object is not iterable" from
    deep inside does not say which); any other exception propagates and fails the test. ``stage`` names the step in
    hypothesis' statistics."""
    try:
        result = call()
    except ALLOWED as error:
        message = str(error).strip()
        assert message, f"{type(error).__name__} raised without a message"
        named = not names or any(name in message for name in names)
        assert named, f"{type(error).__name__} naming none of the parameters {list(names)}: {message}"
        event(f"refused at {stage}: {type(error).__name__}")
        return False, error
    event(f"passed {stage}")
    return True, result


@pytest.fixture(scope="module")
def unet():
    model = tiny_model("unet_sd15")
    yield model
    diffattn.remove(model)


def forward(model):
    with torch.no_grad(), diffattn.denoising_step(1, 4, timestep=500.0, batch_roles=("cond",)):
        return model(**tiny_inputs("unet_sd15", GRID, batch=1, text_len=7))[0]


# --------------------------------------------------------------------------------------------------------------------
# values: junk of every kind, and plausible values per parameter name (so that valid inputs are exercised too)


def _everything(*args):
    return True


ODD = [
    1j,
    b"ab",
    object(),
    Ellipsis,
    {"a": 1},
    {1, 2},
    torch.ones(2, 2),
    torch.tensor(0.5),
    torch.tensor([1, 2]),
    _everything,
    diffattn.Dense(),
    SlidingWindow(3),
]
WORDS = ["", "auto", "torch", "reference", "self", "cross", "joint", "image", "full", "avg", "attn1", "mid_block"]
WORDS += [r"down_blocks\.0", "blocks.1", "(", "[a-", "0:3", "circle", "w", "source"]

atoms = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 260),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0.0, 1.0),
    st.sampled_from(WORDS),
    st.text(max_size=4),
    st.builds(range, st.integers(-2, 5), st.integers(-2, 9)),
    st.sampled_from(ODD),
    st.frozensets(st.sampled_from(["self", "cross", "joint", "nope"]), max_size=3),
)
junk = st.recursive(
    atoms, lambda kids: st.one_of(st.lists(kids, max_size=4), st.lists(kids, max_size=4).map(tuple)), max_leaves=6
)


def per_axis(lo: int, hi: int):
    ints = st.integers(lo, hi)
    return st.one_of(ints, st.tuples(ints, ints), st.tuples(ints, ints, ints))


def causal(q_idx, kv_idx, ctx):
    return q_idx >= kv_idx


def fixed_shape(q_idx, kv_idx, ctx):
    return torch.ones(3, 3, dtype=torch.bool)


fraction = st.floats(0.0, 1.0)
booleans = st.booleans()
BASES = [
    diffattn.Dense(),
    diffattn.SlidingTileAttention(tile=4, window=3),
    diffattn.SlidingWindowAttention(window=3, block_size=16),
    diffattn.DynamicSparseAttention(topk=0.5, block_size=16),
    diffattn.TokenDownsampling(factor=2),
    diffattn.PAG(),
]
box = st.sampled_from([(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0), (0.2, 0.2, 0.3, 0.3), (0.0, 0.0, 1.0, 1.0)])
PLAUSIBLE = {
    "roles": st.sets(st.sampled_from(["self", "cross", "joint"]), min_size=1).map(frozenset),
    "backend": st.sampled_from(["auto", "torch", "reference"]),
    "block_size": st.sampled_from([8, 16, 32, 64, 128]),
    "tile": st.one_of(per_axis(2, 9), st.sampled_from(["auto", None])),
    "window": per_axis(1, 5),
    "stride": per_axis(1, 3),
    "dilation": per_axis(1, 2),
    "windows": per_axis(1, 3),
    "shift": st.one_of(st.none(), st.sampled_from([0.0, 0.25, 0.5, 0.75]), fraction),
    "seed": st.integers(0, 2**40),
    "decay": st.floats(0.05, 2.0),
    "dense_band_frames": st.integers(0, 3),
    "topk": st.one_of(fraction, st.tuples(fraction, fraction)),
    "permute": st.one_of(st.none(), st.just(diffattn.SemanticPermutation(clusters_q=2, clusters_k=4, refresh_every=2))),
    "topp": st.one_of(fraction, st.tuples(fraction, fraction)),
    "similarity_guard": st.one_of(st.none(), st.floats(-1.0, 1.0)),
    "pool_similarity": st.one_of(st.none(), st.floats(-1.0, 1.0)),
    "bands": st.lists(fraction, min_size=4, max_size=4).map(lambda b: tuple(sorted(b))),
    "base": st.sampled_from(BASES),
    "calibrate_every": st.integers(1, 6),
    "ratio_drift": st.floats(0.0, 0.2),
    "factor": st.integers(1, 4),
    "factor_level_2": st.integers(1, 4),
    "mode": st.sampled_from(POOL_MODES),
    "timestep_threshold_stop": fraction,
    "train_tokens": st.integers(2, 10_000),
    "token_ratio": st.floats(0.1, 8.0),
    "pattern": st.sampled_from([SlidingWindow(3), SlidingTile((4, 4), 1), None]),
    "mask_mod": st.sampled_from([causal, fixed_shape]),
    "scale": st.floats(0.0, 5.0),
    "adaptive_scale": st.floats(0.0, 0.01),
    "layers": st.one_of(st.none(), st.sampled_from(["mid_block", "attn1"]), st.lists(st.sampled_from(WORDS[-8:]))),
    "heads": st.one_of(
        st.none(),
        st.lists(st.integers(0, 3), min_size=1),
        st.dictionaries(st.sampled_from(["mid_block", "attn1"]), st.lists(st.integers(0, 1), min_size=1), min_size=1),
    ),
    "steps": st.one_of(st.none(), st.integers(0, 3), fraction, st.tuples(fraction, fraction)),
    "joint": st.sampled_from(["image", "full"]),
    "u": fraction,
    "sigma": st.one_of(st.floats(0.0, 50.0), st.just(math.inf)),
    "faithful": booleans,
    "frame_sink": booleans,
    "clip_to_grid": booleans,
    "boxes": st.lists(box, min_size=1, max_size=3).map(tuple),
    "subject_tokens": st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=2).map(tuple), max_size=3).map(tuple),
    "filter_tokens": st.lists(st.integers(0, 6), max_size=2).map(tuple),
    "eos_token": st.one_of(st.none(), st.integers(0, 6)),
    "mask_eos": booleans,
    "mask_cross": booleans,
    "mask_self": booleans,
    # editing methods (constructed only)
    "cross_replace": fraction,
    "self_replace": fraction,
    "self_max_tokens": st.integers(0, 512),
    "reweight": st.lists(st.tuples(st.integers(0, 6), st.floats(0.0, 3.0)), max_size=2).map(tuple),
    "local_blend": st.one_of(st.none(), st.just(diffattn.LocalBlend(words=("circle",)))),
    "source": st.just("source"),
    "target": st.just("target"),
    "branch": st.just("w"),
    "start_step": st.integers(0, 10),
    "mask_words": st.sampled_from([(), ("circle",), (("a",), ("b",))]),
    "mask_threshold": st.floats(0.01, 0.99),
    "mask_source": st.one_of(st.none(), st.just(torch.ones(4, 4, dtype=torch.bool))),
    "mask_target": st.one_of(st.none(), st.just(torch.ones(4, 4, dtype=torch.bool))),
    "mask": st.one_of(st.none(), st.just(torch.zeros(4, 4, dtype=torch.bool))),
    "ss_steps": st.integers(0, 10),
    "ss_scale": st.floats(0.01, 1.0),
    "words": st.sampled_from([("circle",), ("circle", "square"), (("a",), ("b",))]),
    "threshold": st.floats(0.01, 0.99),
    "start": fraction,
    "max_tokens": st.integers(1, 512),
}


# where a parameter has no default (or a default that is refused), the value an example starts from
BASE_KWARGS = {
    diffattn.Masked: {"mask_mod": causal},
    diffattn.SparseAttention: {"pattern": SlidingWindow(3)},
    diffattn.DynamicSparseAttention: {"topk": 0.5},
    diffattn.EntropyScaling: {"token_ratio": 1.0},
    diffattn.BoundedAttention: {"boxes": ((0.0, 0.0, 0.5, 1.0),), "subject_tokens": ((1,),)},
    diffattn.LocalBlend: {"words": ("circle",)},
}


def parameters(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def draw_kwargs(data, cls) -> dict:
    """Constructor arguments: each parameter left as it is (default or ``BASE_KWARGS``), given a plausible value or
    given junk; the junk rate is drawn per example, so that some examples are all plausible."""
    junk_rate = data.draw(st.sampled_from([0, 0, 15, 50]), label="junk rate (%)")
    kwargs = dict(BASE_KWARGS.get(cls, {}))
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if data.draw(st.integers(0, 99), label=f"{f.name}: junk?") < junk_rate:
            kwargs[f.name] = data.draw(junk, label=f.name)
        elif f.name in PLAUSIBLE and data.draw(booleans, label=f"{f.name}: set?"):
            kwargs[f.name] = data.draw(PLAUSIBLE[f.name], label=f.name)
    return kwargs


# --------------------------------------------------------------------------------------------------------------------
# diffattn.apply(layers=, steps=)

LAYER_PATTERNS = ["attn1", "attn2", "mid_block", r"down_blocks\.0", "up_blocks.1.attentions.2", ".*"]
BAD_PATTERNS = ["blocks.1", "nope", "(", "", "transformer_blocks.1"]
any_float = st.floats(allow_nan=True, allow_infinity=True)
valid_layers = st.one_of(
    st.none(),
    st.sampled_from(LAYER_PATTERNS),
    st.lists(st.sampled_from(LAYER_PATTERNS), min_size=1, max_size=3),
    st.lists(st.sampled_from(LAYER_PATTERNS), min_size=1, max_size=3).map(tuple),
)
other_layers = st.one_of(junk, st.sampled_from(BAD_PATTERNS), st.lists(st.sampled_from(LAYER_PATTERNS + BAD_PATTERNS)))
valid_steps = st.one_of(
    st.none(),
    st.integers(0, 3),
    st.floats(0.0, 1.0, exclude_max=True),
    st.tuples(fraction, fraction).filter(lambda t: t[0] < t[1]),
    st.lists(st.integers(0, 6), min_size=1, max_size=3),
    st.lists(st.integers(0, 6), min_size=1, max_size=3).map(tuple),
    st.builds(range, st.integers(0, 2), st.integers(2, 8)),
    st.tuples(st.floats(0, 1000), st.floats(0, 1000)).map(lambda t: StepSchedule.timesteps(min(t), max(t))),
)
other_steps = st.one_of(
    junk,
    st.integers(-2, 6),
    st.floats(-0.5, 1.5),
    any_float,
    st.tuples(any_float, any_float),
    st.tuples(st.integers(-1, 3), fraction),
    st.lists(st.integers(-1, 6), max_size=4),
    st.builds(range, st.integers(-2, 4), st.integers(-2, 8)),
)
# two parts in three plausible: most examples get as far as a forward
layers_values = st.one_of(valid_layers, valid_layers, other_layers)
steps_values = st.one_of(valid_steps, valid_steps, other_steps)


@sweep(30)
@given(layers=layers_values, steps=steps_values)
def test_apply_layers_and_steps_work_as_documented_or_fail_clearly(unet, layers, steps):
    applied, handle = outcome(lambda: diffattn.apply(unet, diffattn.Dense(), layers=layers, steps=steps), "apply")
    if not applied:
        return
    try:
        names = [n for n, _ in diffattn.attention_modules(unet)]
        assert handle.layers == select_layers(layers, names)  # Dense acts on every role
        ran, out = outcome(lambda: forward(unet), "forward")
        acted = handle.acted()
    finally:
        handle.remove()
    if ran:
        assert torch.isfinite(out).all()
        # the documented meaning: the method acts at step 1 of 4 (timestep 500) iff the schedule selects it
        assert bool(acted) == StepSchedule.parse(steps).is_active(1, 4, 500.0), (steps, acted)
    else:
        assert isinstance(out, DiffattnError), f"the forward raised {type(out).__name__}: {out}"


# --------------------------------------------------------------------------------------------------------------------
# constructors

APPLIED = [
    diffattn.Dense,
    diffattn.Masked,
    diffattn.SparseAttention,
    diffattn.SlidingWindowAttention,
    diffattn.SlidingTileAttention,
    diffattn.ShiftedWindowAttention,
    diffattn.RadialAttention,
    diffattn.DynamicSparseAttention,
    diffattn.PyramidSparseAttention,
    diffattn.Rettention,
    diffattn.TokenDownsampling,
    diffattn.EntropyScaling,
    diffattn.BoundedAttention,
]
GUIDANCE = [diffattn.PAG, diffattn.SoftPAG, diffattn.SEG]
CONSTRUCTED_ONLY = [
    diffattn.PromptToPrompt,
    diffattn.MutualSelfAttention,
    diffattn.AttentiveEraser,
    diffattn.LocalBlend,
]


@pytest.mark.parametrize("cls", APPLIED, ids=lambda c: c.__name__)
@sweep(12)
@given(data=st.data())
def test_method_parameters_work_on_a_unet_or_fail_clearly(unet, cls, data):
    made, method = outcome(lambda: cls(**draw_kwargs(data, cls)), "construction", parameters(cls))
    if not made:
        return
    applied, handle = outcome(lambda: diffattn.apply(unet, method, layers=SWEEP_LAYERS), "apply")
    if not applied:
        return
    try:
        ran, out = outcome(lambda: forward(unet), "forward")
    finally:
        handle.remove()
    if ran:
        assert torch.isfinite(out).all(), method


def perturbed_call(method):
    """One call of a guidance method on a batch (uncond, cond, perturbed) of a 4x4 self-attention layer."""
    layout = TokenLayout((4, 4))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, layout.num_tokens, 8, generator=g) for _ in range(3))
    ctx, _ = make_ctx(
        layout,
        layer="mid_block.attentions.0.transformer_blocks.0.attn1",
        step=1,
        num_steps=4,
        batch_roles=("uncond", "cond", "perturbed"),
        timestep=500.0,
    )
    method.scale_at(500.0)
    method.steps.is_active(1, 4, 500.0)
    return method(q, k, v, ctx)


@pytest.mark.parametrize("cls", GUIDANCE, ids=lambda c: c.__name__)
@sweep(40)
@given(data=st.data())
def test_guidance_parameters_work_on_a_perturbed_batch_or_fail_clearly(unet, cls, data):
    made, method = outcome(lambda: cls(**draw_kwargs(data, cls)), "construction", parameters(cls))
    if not made:
        return
    with pytest.raises(DiffattnError, match="guidance.enable"):
        diffattn.apply(unet, method)
    ran, out = outcome(lambda: perturbed_call(method), "call")
    if ran:
        assert out.shape == (3, 2, 16, 8) and torch.isfinite(out).all(), method


@pytest.mark.parametrize("cls", CONSTRUCTED_ONLY, ids=lambda c: c.__name__)
@sweep(60)
@given(data=st.data())
def test_editing_constructors_accept_or_fail_clearly(cls, data):
    outcome(lambda: cls(**draw_kwargs(data, cls)), "construction", parameters(cls))
