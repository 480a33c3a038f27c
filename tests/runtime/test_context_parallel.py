"""diffattn under diffusers' Ulysses context parallelism: 2 gloo processes on the CPU reproduce the single-process
output of dense, sliding-tile, radial and per-head sparse attention on tiny Wan and Flux models, whether diffattn
is applied before or after ``enable_parallelism``; ring mode, indivisible heads or sequences and CP-unaware
processors fail with clear errors on every rank (never a hang, never a silently wrong output)."""

from __future__ import annotations

import types

import pytest
import torch
from cp_helpers import enable_context_parallel, run_on_ranks

import diffattn
from diffattn import parallel
from diffattn.patterns import Radial, SlidingWindow
from diffattn.patterns.compose import PerHead
from diffattn.testing import standalone_context

DEGREE = 2
TOLERANCE = 1e-5
GRIDS = {"wan": (4, 4, 4), "flux": (4, 8)}  # 64 / 32 visual tokens: every split is even
TEXT_LEN = 8  # Flux splits the text tokens too


def methods(family: str) -> dict[str, diffattn.AttentionMethod]:
    if family == "wan":
        tile = diffattn.SlidingTileAttention(tile=(1, 2, 2), window=(3, 1, 1))
        per_head = PerHead((SlidingWindow((3, 3, 3)), SlidingWindow((1, 1, 3))))
        radial = diffattn.RadialAttention(decay=1.0, block_size=8)
    else:
        tile = diffattn.SlidingTileAttention(tile=(2, 2), window=(1, 3))
        per_head = PerHead((SlidingWindow(3), SlidingWindow((1, 5))))
        # RadialAttention refuses image grids (a video method); the same mask, rows as frames, through its pattern
        radial = diffattn.SparseAttention(pattern=Radial(decay=1.0, block_size=8), block_size=8)
    return {
        "dense": diffattn.Dense(),
        "sliding_tile": tile,
        "radial": radial,
        "per_head": diffattn.SparseAttention(pattern=per_head, block_size=8),
    }


# ---------------------------------------------------------------------------------------------------------------
# What each rank runs (module level, so the spawned processes can import it)
# ---------------------------------------------------------------------------------------------------------------
def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def _error(fn) -> tuple[str, str] | None:
    try:
        fn()
    except Exception as exc:  # any failure is recorded and checked by the parent
        return type(exc).__name__, str(exc)
    return None


class LocalOnlyProcessor:
    """A Wan processor without ``_parallel_config`` (as custom and older processors are): diffusers' enable_parallelism
    skips it, so under context parallelism it would attend within the rank's shard of the sequence."""

    def __init__(self) -> None:
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self._stock = WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


class IgnoresParallelConfig(LocalOnlyProcessor):
    """Has ``_parallel_config`` (so it looks CP-aware) but never passes it on: attends within the shard."""

    _attention_backend = None
    _parallel_config = None


def _wan_with_heads(heads: int):
    from diffusers import WanTransformer3DModel

    from diffattn.testing import tiny_model

    config = dict(tiny_model("wan").config)
    config["num_attention_heads"] = heads
    torch.manual_seed(0)
    return WanTransformer3DModel.from_config(config).eval()


def rank_worker(rank: int, world_size: int) -> dict:
    from diffattn.testing import tiny_inputs, tiny_model

    diffs: dict[tuple[str, str, str], float] = {}
    sparse_vs_dense: dict[tuple[str, str], float] = {}
    errors: dict[str, tuple[str, str] | None] = {}

    for family in ("wan", "flux"):
        inputs = tiny_inputs(family, GRIDS[family], text_len=TEXT_LEN)
        chosen = methods(family)
        reference = {}
        single = tiny_model(family)
        for name, method in chosen.items():
            with diffattn.apply(single, method):
                reference[name] = _forward(single, inputs)
        for name in chosen:
            sparse_vs_dense[family, name] = float((reference[name] - reference["dense"]).abs().max())

        # diffattn applied after enable_parallelism: one model, the methods in turn.
        model = tiny_model(family)
        enable_context_parallel(model, ulysses_degree=world_size)
        for name, method in chosen.items():
            with diffattn.apply(model, method):
                diffs[family, name, "after"] = float((_forward(model, inputs) - reference[name]).abs().max())
        # diffattn applied before enable_parallelism: a fresh model per method.
        for name, method in chosen.items():
            model = tiny_model(family)
            diffattn.apply(model, method)
            enable_context_parallel(model, ulysses_degree=world_size)
            diffs[family, name, "before"] = float((_forward(model, inputs) - reference[name]).abs().max())

    wan_inputs = tiny_inputs("wan", GRIDS["wan"], text_len=TEXT_LEN)
    radial = methods("wan")["radial"]
    # Stock processors installed after enable_parallelism (so _parallel_config=None) inherit the model's config.
    single = tiny_model("wan")
    with diffattn.apply(single, radial):
        reference = _forward(single, wan_inputs)
    model = tiny_model("wan")
    enable_context_parallel(model, ulysses_degree=world_size)
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    model.set_attn_processor(WanAttnProcessor())
    with diffattn.apply(model, radial):
        diffs["wan", "radial", "processors installed after enable_parallelism"] = float(
            (_forward(model, wan_inputs) - reference).abs().max()
        )

    # Ring attention: refused at apply time, or at the first call when applied before enable_parallelism.
    model = tiny_model("wan")
    enable_context_parallel(model, ring_degree=world_size)
    errors["ring, apply after"] = _error(lambda: diffattn.apply(model, radial))
    model = tiny_model("wan")
    diffattn.apply(model, radial)
    enable_context_parallel(model, ring_degree=world_size)
    errors["ring, apply before"] = _error(lambda: _forward(model, wan_inputs))

    # Heads that do not divide by the degree.
    model = _wan_with_heads(3)
    enable_context_parallel(model, ulysses_degree=world_size)
    errors["3 heads, apply after"] = _error(lambda: diffattn.apply(model, radial))
    model = _wan_with_heads(3)
    diffattn.apply(model, diffattn.Dense())
    enable_context_parallel(model, ulysses_degree=world_size)
    errors["3 heads, apply before"] = _error(lambda: _forward(model, wan_inputs))

    # Sequences that cannot be split evenly: 9 visual tokens; 7 text tokens in Flux (which splits the text too).
    model = tiny_model("wan")
    enable_context_parallel(model, ulysses_degree=world_size)
    diffattn.apply(model, radial)
    errors["9 visual tokens"] = _error(lambda: _forward(model, tiny_inputs("wan", (1, 3, 3))))
    model = tiny_model("flux")
    enable_context_parallel(model, ulysses_degree=world_size)
    diffattn.apply(model, diffattn.Dense())
    errors["7 text tokens"] = _error(lambda: _forward(model, tiny_inputs("flux", GRIDS["flux"], text_len=7)))

    # Processors that do not run Ulysses attention.
    model = tiny_model("wan")
    enable_context_parallel(model, ulysses_degree=world_size)
    model.set_attn_processor(LocalOnlyProcessor())
    errors["processor without _parallel_config"] = _error(lambda: diffattn.apply(model, radial))
    model = tiny_model("wan")
    enable_context_parallel(model, ulysses_degree=world_size)
    model.set_attn_processor(IgnoresParallelConfig())
    diffattn.apply(model, radial)
    errors["processor ignoring _parallel_config"] = _error(lambda: _forward(model, wan_inputs))

    # A method that needs every query on Wan's cross-attention, which diffusers runs on local queries.
    model = tiny_model("wan")
    enable_context_parallel(model, ulysses_degree=world_size)
    everywhere = diffattn.Masked(lambda q, kv, ctx: torch.ones((), dtype=torch.bool), roles={"cross"})
    diffattn.apply(model, everywhere)
    errors["position-dependent method on local queries"] = _error(lambda: _forward(model, wan_inputs))

    return {"diffs": diffs, "sparse_vs_dense": sparse_vs_dense, "errors": errors}


# ---------------------------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_on_ranks(rank_worker, DEGREE, timeout=120)


CASES = [(family, name) for family in ("wan", "flux") for name in ("dense", "sliding_tile", "radial", "per_head")]


@pytest.mark.parametrize("family,name", CASES)
@pytest.mark.parametrize("order", ["after", "before"])
def test_ulysses_matches_single_process(ranks, family, name, order):
    for rank, result in enumerate(ranks):
        diff = result["diffs"][family, name, order]
        assert diff <= TOLERANCE, f"rank {rank}: {family} {name} (diffattn applied {order} enable_parallelism): {diff}"
        if name != "dense":  # the comparison means something only if the pattern changes the output
            assert result["sparse_vs_dense"][family, name] > 1e-3


def test_processors_installed_after_enable_parallelism_inherit_its_config(ranks):
    for result in ranks:
        assert result["diffs"]["wan", "radial", "processors installed after enable_parallelism"] <= TOLERANCE


@pytest.mark.parametrize(
    "case,error,match",
    [
        ("ring, apply after", "ContextParallelError", r"Ulysses context parallelism only.*ring_degree=2"),
        ("ring, apply before", "ContextParallelError", r"Ulysses context parallelism only.*ring_degree=2"),
        ("3 heads, apply after", "ContextParallelError", r"3 attention heads.*ulysses_degree=2"),
        ("3 heads, apply before", "ContextParallelError", r"3 attention heads.*ulysses_degree=2"),
        ("9 visual tokens", "ContextParallelError", r"9 visual tokens \(grid 1x3x3\).*ulysses_degree=2"),
        ("7 text tokens", "ContextParallelError", r"`encoder_hidden_states` has 7 tokens"),
        ("processor without _parallel_config", "ContextParallelError", r"LocalOnlyProcessor does not support it"),
        ("processor ignoring _parallel_config", "LayoutError", r"32 query .*IgnoresParallelConfig attended within"),
        ("position-dependent method on local queries", "ContextParallelError", r"32 of 64 queries.*Masked needs"),
    ],
)
def test_unsupported_parallel_setups_fail_clearly_on_every_rank(ranks, case, error, match):
    import re

    for rank, result in enumerate(ranks):
        got = result["errors"][case]
        assert got is not None, f"rank {rank}: {case} did not raise"
        assert got[0] == error and re.search(match, got[1], re.S), f"rank {rank}: {case}: {got}"


# ---------------------------------------------------------------------------------------------------------------
# Single-process pieces
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text_first", [True, False])
def test_joint_order_puts_rank_chunks_in_layout_order(text_first):
    text, visual, degree = 6, 12, 3
    tokens = [f"t{i}" for i in range(text)], [f"v{i}" for i in range(visual)]
    t, n = text // degree, visual // degree
    gathered = []
    for r in range(degree):  # what the all-to-all concatenates: each rank's [text shard | visual shard]
        parts = [tokens[0][r * t : (r + 1) * t], tokens[1][r * n : (r + 1) * n]]
        gathered += parts[0] + parts[1] if text_first else parts[1] + parts[0]
    order, inverse = parallel.joint_order(text, visual, degree, text_first, torch.device("cpu"))
    ordered = [gathered[i] for i in order]
    assert ordered == (tokens[0] + tokens[1] if text_first else tokens[1] + tokens[0])
    assert [ordered[i] for i in inverse] == gathered


def test_per_head_pattern_is_sliced_by_the_ranks_heads():
    """Each rank's slice of a per-head pattern, on its heads, reproduces those heads of the full computation."""
    pattern = PerHead((SlidingWindow((3, 3)), SlidingWindow((1, 5)), SlidingWindow((5, 1)), SlidingWindow(1)))
    method = diffattn.SparseAttention(pattern=pattern, block_size=8, backend="reference")
    layout = diffattn.TokenLayout((6, 5), text_len=4, text_first=True)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, layout.num_tokens, 8, generator=gen) for _ in range(3))

    def ctx(**cp):
        return standalone_context(layout, layer="l", **cp)[0]

    full = method(q, k, v, ctx())
    for rank in range(2):
        heads = slice(2 * rank, 2 * rank + 2)
        part = method(q[:, heads], k[:, heads], v[:, heads], ctx(head_offset=2 * rank, total_heads=4))
        torch.testing.assert_close(part, full[:, heads], rtol=0, atol=0)
    with pytest.raises(diffattn.LayoutError, match="per-head pattern has 4 heads but the layer has 6"):
        method(q[:, :2], k[:, :2], v[:, :2], ctx(head_offset=2, total_heads=6))


@pytest.mark.parametrize(
    "config,match",
    [
        (dict(ring_degree=2, ulysses_degree=1), "Ulysses context parallelism only"),
        (dict(ring_degree=2, ulysses_degree=2), "Ulysses context parallelism only"),
        (dict(ring_degree=1, ulysses_degree=2, ulysses_anything=True), "ulysses_anything"),
    ],
)
def test_modes_other_than_plain_ulysses_are_refused(config, match):
    fake = types.SimpleNamespace(context_parallel_config=types.SimpleNamespace(**config, _ulysses_local_rank=0))
    with pytest.raises(diffattn.DiffattnError, match=match):
        parallel.ulysses_of(fake)
    assert parallel.ulysses_of(None) is None
    plain = types.SimpleNamespace(
        context_parallel_config=types.SimpleNamespace(ring_degree=1, ulysses_degree=4, _ulysses_local_rank=3)
    )
    assert parallel.ulysses_of(plain) == parallel.Ulysses(4, 3)
    assert parallel.Ulysses(4, 3).head_offset(2) == 6 and parallel.Ulysses(4, 3).query_range(64) == (48, 64)
