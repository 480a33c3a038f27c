"""The comparison's peers and bookkeeping: NATTEN's sliding tile equals diffattn's, every peer comes off the pipeline
without a trace, MagCache calibration yields one ratio per step, TaylorSeer's default patterns miss Wan (why the
compare names its own), a failing peer is reported as failed, and the table marks a pass only when it is one."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from support import make_ctx, qkv

import diffattn
from diffattn import TokenLayout
from diffattn_bench import embedded
from diffattn_bench.compare import (
    PASS_SHAPE_FRAMES,
    SHAPE_FRAMES_TOLERANCE,
    ClipSize,
    CompareRow,
    failures,
    format_markdown,
    passes,
    run_video,
    select_runs,
    shape_note,
    shapes_against_dense,
    video_peers,
)
from diffattn_bench.peers import NattenTile, Peer, calibrate_mag_cache, combined, method_peer

SIZE = ClipSize(8, 32, 32)  # grid (8, 8, 8)
PROMPT = "a red circle on the left moving right"


@pytest.fixture(scope="module")
def pipe():
    p = embedded.random_video_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def generate(pipe, steps=3):
    return pipe(
        PROMPT,
        num_frames=SIZE.frames,
        height=SIZE.height,
        width=SIZE.width,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).frames[0]


def test_natten_peer_equals_diffattn_sliding_tile():
    pytest.importorskip("natten")
    layout = TokenLayout(grid=(4, 8, 8))
    q, k, v = qkv(1, 2, layout.num_tokens, dim=16)
    ctx, metrics = make_ctx(layout)
    tile, window = (2, 4, 4), (1, 1, 2)
    ours = diffattn.SlidingTileAttention(tile=tile, window=window)(q, k, v, ctx)
    theirs = NattenTile(tile=tile, window=window)(q, k, v, ctx)
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=0)
    assert metrics["density"] == pytest.approx(1 / 2 * 1 / 2 * 1)


def test_natten_peer_refuses_a_grid_it_cannot_tile():
    layout = TokenLayout(grid=(3, 8, 8))
    ctx, _ = make_ctx(layout)
    with pytest.raises(diffattn.MethodConfigError, match="divisible by the tile"):
        NattenTile(tile=(2, 4, 4), window=(1, 1, 1)).validate(ctx)


def test_every_peer_comes_off_without_a_trace(pipe):
    stock = generate(pipe)
    ratios = calibrate_mag_cache(pipe, lambda: generate(pipe), steps=3)
    peers = [p for p in video_peers(SIZE.grid((1, 4, 4)), ratios, 3) if p.kind != "FlexAttention"]  # compile: slow
    changed = 0
    for peer in peers:
        undo = peer.setup(pipe) if peer.setup else None
        handle = diffattn.apply(pipe, peer.method) if peer.method else None
        try:
            out = generate(pipe)
        finally:
            if handle:
                handle.remove()
            if undo:
                undo()
        changed += not np.array_equal(out, stock)
        assert np.array_equal(generate(pipe), stock), f"{peer.label} left something behind"
    assert changed >= len(peers) // 2  # the peers act: most change the output


def test_mag_cache_calibration_gives_one_ratio_per_step(pipe):
    ratios = calibrate_mag_cache(pipe, lambda: generate(pipe, steps=4), steps=4)
    assert len(ratios) == 4 and ratios[0] == pytest.approx(1.0) and all(math.isfinite(r) and r > 0 for r in ratios)


def test_taylorseer_default_patterns_match_no_wan_module(pipe):
    """diffusers' TaylorSeer hooks modules matching '^blocks.*attn' with re.fullmatch: Wan's are 'blocks.0.attn1', so
    the defaults do nothing on Wan; the compare passes the blocks explicitly. If this fails, diffusers fixed it."""
    from diffusers.hooks.taylorseer_cache import _TRANSFORMER_BLOCK_IDENTIFIERS

    names = [n for n, _ in pipe.transformer.named_modules()]
    assert "blocks.0.attn1" in names
    assert not any(re.fullmatch(p, n) for p in _TRANSFORMER_BLOCK_IDENTIFIERS for n in names)


def test_a_failing_peer_is_reported_and_the_rest_still_runs(pipe):
    def broken(_pipe):
        raise RuntimeError("this hook does not support the model")

    peers = [
        method_peer("dense (diffattn)", diffattn.Dense()),
        Peer("broken", "diffusers cache", setup=broken),
        method_peer("sliding tile", diffattn.SlidingTileAttention(tile=(4, 4, 4), window=(1, 1, 1))),
    ]
    rows, clips = run_video(pipe, SIZE, peers, prompts=[PROMPT], steps=2)
    by = {r.method: r for r in rows}
    assert by["broken"].error.startswith("RuntimeError: this hook does not support")
    assert set(clips) == {"dense (stock)", "dense (diffattn)", "sliding tile"}
    tile = by["sliding tile"]
    assert tile.density == pytest.approx(1 / 8) and tile.speedup > 0 and math.isfinite(tile.amdahl_bound)
    assert tile.psnr < 100 and "mean_trajectory_error" in tile.scores
    assert tile.scores["shape_frames_vs_dense"] == pytest.approx(
        tile.scores["shape_frames"] - by["dense (stock)"].scores["shape_frames"]
    )
    assert by["dense (diffattn)"].scores["shape_frames_vs_dense"] == 0.0  # bit for bit, so the same shapes
    assert "shape_frames_vs_dense" not in by["broken"].scores
    assert by["dense (diffattn)"].psnr == math.inf  # diffattn's dense is stock attention, bit for bit
    table = format_markdown(rows)
    assert "| broken | diffusers cache | failed: RuntimeError" in table


def test_combination_needs_a_hook_and_a_method():
    tile = method_peer("tile", diffattn.SlidingTileAttention(tile=(4, 4, 4), window=(1, 1, 1)))
    hook = Peer("hook", "diffusers cache", setup=lambda pipe: lambda: None)
    assert combined("both", hook, tile).method is tile.method
    with pytest.raises(ValueError, match="set-up peer"):
        combined("wrong", tile, hook)


def test_only_keeps_the_named_runs_and_diffattn_dense_and_refuses_a_text_no_run_has():
    runs = video_peers((4, 8, 8), None, 4, natten=False)
    kept = select_runs(runs, ["top-k", "SeaCache"])
    labels = [p.label for p in kept]
    assert "dense (diffattn)" in labels and "SeaCache" in labels and "sliding tile" not in labels
    assert any("top-k" in label for label in labels) and len(kept) < len(runs)
    assert select_runs(runs, []) == runs
    with pytest.raises(ValueError, match="'nonsense' matches no run; runs: dense"):
        select_runs(runs, ["nonsense", "top-k"])


@pytest.mark.parametrize(
    "error,positions,found,shapes_vs_dense,expected",
    [
        (0.02, 1.0, 1.0, 0.0, True),
        (0.02, 1.0, 1.0, -SHAPE_FRAMES_TOLERANCE, True),
        (0.02, 1.0, 1.0, 0.1, True),
        (0.02, 1.0, 1.0, -SHAPE_FRAMES_TOLERANCE - 0.02, False),
        (0.02, 1.0, 1.0, None, False),  # never compared with dense: no pass
        (0.05, 1.0, 1.0, 0.0, False),
        (0.02, 0.8, 1.0, 0.0, False),
        (0.02, 1.0, 0.5, 0.0, False),
        (math.nan, 0.0, 0.0, 0.0, False),
    ],
)
def test_pass_mark_follows_the_bench_bar(error, positions, found, shapes_vs_dense, expected):
    scores = {"mean_trajectory_error": error, "positions_correct": positions, "clips_with_objects_found": found}
    if shapes_vs_dense is not None:
        scores |= {"shape_frames": 0.8, "shape_frames_vs_dense": shapes_vs_dense}
    row = CompareRow("m", "diffattn", "8x32x32", 512, 1.0, scores=scores)
    assert passes(row) is expected
    assert ("**" in format_markdown([row])) is expected
    missed = failures(row)
    assert (not missed) is expected
    if error != 0.02:
        assert any(m.startswith("trajectory error") for m in missed), missed
    if positions == 0.8:
        assert "positions 80% (bar: >= 90%)" in missed, missed


def _scored(method: str, shapes: float, error: str = "") -> CompareRow:
    scores = {"mean_trajectory_error": 0.02, "positions_correct": 1.0, "clips_with_objects_found": 1.0}
    return CompareRow(method, "diffattn", "8x32x32", 512, 1.0, scores=scores | {"shape_frames": shapes}, error=error)


@pytest.mark.parametrize("dense", [0.6, 0.95])
def test_shape_bar_is_relative_to_stock_dense_and_dense_is_told_against_the_model_bar(dense):
    rows = [
        _scored("dense (stock)", dense),
        _scored("close", dense - SHAPE_FRAMES_TOLERANCE / 2),
        _scored("worse", dense - 2 * SHAPE_FRAMES_TOLERANCE),
        _scored("failed", math.nan, error="RuntimeError: x"),
    ]
    shapes_against_dense(rows)
    assert [passes(r) for r in rows] == [True, True, False, False]
    assert rows[2].scores["shape_frames_vs_dense"] == pytest.approx(-2 * SHAPE_FRAMES_TOLERANCE)
    assert f"({-200 * SHAPE_FRAMES_TOLERANCE:+.0f})" in format_markdown(rows).splitlines()[4]
    note = shape_note(rows)
    assert f"{dense:.0%}" in note and ("meets" if dense >= PASS_SHAPE_FRAMES else "misses") in note


def test_shape_bar_needs_a_dense_run():
    with pytest.raises(ValueError, match="run it first"):
        shapes_against_dense([_scored("radial", 0.9)])
    with pytest.raises(ValueError, match="run it first"):
        shapes_against_dense([_scored("dense (stock)", math.nan, error="OOM"), _scored("radial", 0.9)])
    assert "no shape score" in shape_note([_scored("radial", 0.9)])


def test_psnr_pools_the_error_over_every_clip():
    """One clip identical to dense's must not make the run read as identical: PSNR comes from the pooled MSE."""
    from diffattn_bench.compare import _finish

    rng = np.random.default_rng(0)
    ref = [rng.random((2, 16, 16, 3)) for _ in range(2)]
    moved = [ref[0].copy(), np.clip(ref[1] + 0.1, 0, 1)]
    rows = [CompareRow("dense (stock)", "stock", "s", 1, 1.0), CompareRow("cache", "cache", "s", 1, 0.5)]
    _finish(rows, {"dense (stock)": ref, "cache": moved}, reference="dense (stock)", timing_reference=None)
    mse = np.mean((moved[1] - ref[1]) ** 2) / 2
    assert rows[0].psnr == math.inf
    assert rows[1].psnr == pytest.approx(10 * math.log10(1 / mse))
    assert rows[1].speedup == pytest.approx(2.0)


def test_pareto_front_keeps_only_runs_nothing_beats():
    from diffattn_bench.compare import pareto_front

    points = [(1.0, 0.025), (1.2, 0.023), (2.0, 0.05), (1.5, 0.06), (5.0, 0.10), (1.1, 0.030), (1.2, 0.023)]
    # (1.0, 0.025) and (1.1, 0.030) are beaten by (1.2, 0.023); (1.5, 0.06) by (2.0, 0.05); equal points both stay
    assert pareto_front(points) == [1, 2, 4, 6]


def test_compare_refuses_sizes_the_model_cannot_patch_before_any_work(capsys):
    from diffattn.cli import main

    with pytest.raises(SystemExit):  # argparse: not FRAMESxHEIGHTxWIDTH
        main(["compare", "--extension-size", "8x128"])
    assert "FRAMESxHEIGHTxWIDTH" in capsys.readouterr().err
    assert main(["compare", "--extension-size", "8x130x128", "--no-image", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert "8x130x128" in err and "multiples" in err
    assert main(["compare", "--frames", "16", "--height", "62", "--no-image", "--out", "unused"]) == 2
    assert "16x62x64" in capsys.readouterr().err


def test_saved_rows_load_back_and_redraw(tmp_path):
    from diffattn_bench.compare import load_rows, plot_pareto, save_outputs

    rows = [
        CompareRow("dense (stock)", "stock", "8x32x32", 512, 2.0, scores={"mean_trajectory_error": 0.02}),
        CompareRow(
            "radial",
            "diffattn",
            "8x32x32",
            512,
            1.0,
            density=0.5,
            psnr=21.5,
            speedup=2.0,
            scores={"mean_trajectory_error": 0.05, "positions_correct": 1.0},
        ),
    ]
    clips = {r.method: np.zeros((2, 32, 32, 3)) for r in rows}
    save_outputs({"video 8x32x32": (rows, clips)}, tmp_path, "title", {"cpu": "test"})
    loaded = load_rows(tmp_path / "compare.json")
    assert repr(loaded) == repr({"video 8x32x32": rows})  # repr: NaN fields compare unequal
    plot_pareto(loaded, tmp_path / "again.png")
    assert (tmp_path / "again.png").stat().st_size > 1000


def _no_work(*args, **kwargs):
    raise AssertionError("diffattn compare started work on arguments it should have refused")


@pytest.mark.parametrize(
    "option,value",
    [
        ("--steps", "0"),
        ("--steps", "-1"),
        ("--steps", "ten"),
        ("--frames", "0"),
        ("--height", "-32"),
        ("--width", "0"),
        ("--threads", "0"),
        ("--prompts", "-1"),
        ("--extension-steps", "-3"),
        ("--extension-prompts", "0"),
        ("--image-prompts", "0"),
    ],
)
def test_compare_refuses_counts_below_one_before_any_work(option, value, capsys, monkeypatch):
    from diffattn.cli import main

    monkeypatch.setattr(embedded, "load_video_pipeline", _no_work)
    monkeypatch.setattr(embedded, "load_image_pipeline", _no_work)
    with pytest.raises(SystemExit) as exited:
        main(["compare", option, value, "--out", "unused"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: expected a whole number >= 1, got {value!r}" in err, err


def test_compare_keeps_its_defaults_when_counts_are_not_given():
    import argparse

    from diffattn_bench.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare"])
    assert (args.steps, args.prompts, args.frames, args.image_prompts, args.threads) == (None, None, None, 8, 2)
    args = parser.parse_args(["compare", "--steps", "1", "--height", "32", "--extension-prompts", "3"])
    assert (args.steps, args.height, args.extension_prompts) == (1, 32, 3)


def test_compare_exits_non_zero_when_a_run_failed(pipe, monkeypatch, tmp_path, capsys):
    """A failed row stays in the table and compare.json, and the exit status says the run did not all work."""
    from diffattn.cli import main
    from diffattn_bench import compare, peers

    def broken(_pipe):
        raise RuntimeError("this hook does not support the model")

    monkeypatch.setattr(embedded, "load_video_pipeline", lambda path=None: pipe)
    monkeypatch.setattr(peers, "calibrate_mag_cache", lambda pipe, run, steps: [1.0] * steps)
    monkeypatch.setattr(
        compare,
        "video_peers",
        lambda grid, ratios, steps, natten=False: [
            method_peer("dense (diffattn)", diffattn.Dense()),
            Peer("broken", "diffusers cache", setup=broken),
        ],
    )
    argv = ["compare", "--frames", "8", "--height", "32", "--width", "32", "--prompts", "1", "--steps", "2"]
    code = main([*argv, "--no-image", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert "| broken | diffusers cache | failed: RuntimeError" in out
    assert (tmp_path / "compare.json").is_file()  # the report is still written
    assert code == 1
    assert "1 run failed" in err and "broken" in err and "this hook does not support the model" in err, err


def test_compare_refuses_a_video_model_or_out_folder_it_cannot_use_before_any_work(tmp_path, capsys, monkeypatch):
    from diffattn.cli import main

    monkeypatch.setattr(embedded, "load_video_pipeline", _no_work)
    with pytest.raises(SystemExit) as exited:
        main(["compare", "--video-model", str(tmp_path / "missing"), "--out", str(tmp_path)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "argument --video-model" in err and "no model_index.json" in err, err
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as exited:
        main(["compare", "--out", str(tmp_path / "a-file")])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "argument --out" in err and "is a file" in err, err


def test_a_tuned_profile_is_a_row_and_a_profile_for_another_size_fails_its_row(pipe, tmp_path):
    """``diffattn compare --profile DIR``: the profile's row acts on every tuned layer (bitwise the profile's own
    method) and a profile tuned at another clip size fails its row, naming the grid, while the rest runs."""
    from diffattn_bench.compare import profile_peer

    def tuned(size: ClipSize, folder):
        profile = diffattn.tune(
            pipe,
            "dynamic-topk",
            [PROMPT],
            error_target=0.5,
            num_inference_steps=2,
            candidates=(0.25, 0.5),
            tile=(4, 4, 4),
            progress=False,
            num_frames=size.frames,
            height=size.height,
            width=size.width,
        )
        return profile.save(folder)

    here, other = tuned(SIZE, tmp_path / "here"), tuned(ClipSize(4, 32, 32), tmp_path / "other")
    peers = [method_peer("dense (diffattn)", diffattn.Dense()), profile_peer(here), profile_peer(other)]
    rows, clips = run_video(pipe, SIZE, peers, prompts=[PROMPT], steps=2)
    by = {r.method: r for r in rows}
    row = by["tuned top-k (here)"]
    assert not row.error and row.density < 1.0, row
    assert "relative L1 0.5" in row.settings
    assert by["tuned top-k (other)"].error.startswith("MethodConfigError") and "tuned on token grid" in (
        by["tuned top-k (other)"].error
    )
    with diffattn.apply(pipe, diffattn.TunedProfile.load(here)):
        direct = pipe(
            PROMPT,
            num_frames=SIZE.frames,
            height=SIZE.height,
            width=SIZE.width,
            num_inference_steps=2,
            guidance_scale=4.0,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).frames[0]
    assert np.array_equal(np.asarray(direct), clips["tuned top-k (here)"])


def test_a_profile_is_stacked_under_each_cache_hook(tmp_path):
    from diffattn.tuning.profile import LayerBudget
    from diffattn_bench.compare import STACKED_CACHES, profile_peers

    layer = LayerBudget("blocks.0.attn1", (8, 8, 8), ((0.25, 1.0),), ((0.1, 0.0),))
    profile = diffattn.TunedProfile("WanTransformer3DModel", "dynamic-topk", 128, "auto", 1, 0.2, (layer,))
    folder = profile.save(tmp_path / "p")
    with_ratios = profile_peers(folder, [1.0, 1.0], 2)
    assert [p.label for p in with_ratios] == ["tuned top-k (p)"] + [f"{c} + tuned top-k (p)" for c in STACKED_CACHES]
    assert all(p.setup is not None and p.method == with_ratios[0].method for p in with_ratios[1:])
    assert "MagCache + tuned top-k (p)" not in [p.label for p in profile_peers(folder, None, 2)]  # needs its ratios


def test_a_profile_tuned_under_a_calibrated_cache_adds_that_cache_alone_and_with_it(tmp_path, pipe):
    from diffattn.tuning.cache import CacheCalibration, CacheTrial
    from diffattn.tuning.profile import LayerBudget
    from diffattn_bench.compare import STACKED_CACHES, profile_peers
    from diffattn_bench.peers import calibratable_cache

    layer = LayerBudget("blocks.0.attn1", (8, 8, 8), ((0.25, 1.0),), ((0.1, 0.0),))
    profile = diffattn.TunedProfile("WanTransformer3DModel", "dynamic-topk", 128, "auto", 1, 0.2, (layer,))
    folder = profile.save(tmp_path / "p")
    found = CacheCalibration(
        "SeaCacheConfig(threshold=0.7)", 0.7, 27.5, 0.5, 27.0, (CacheTrial(0.7, 27.5, 0.5),), ("a", "b"), 10
    )
    found.save(folder)
    peers = profile_peers(folder, None, 2)
    labels = [p.label for p in peers]
    assert labels[-2:] == ["SeaCache 0.7 (calibrated)", "SeaCache 0.7 (calibrated) + tuned top-k (p)"]
    assert len(labels) == 1 + len(STACKED_CACHES) - 1 + 2  # MagCache needs its ratios
    alone, both = peers[-2:]
    assert alone.method is None and both.method == peers[0].method and "27 dB" in alone.settings
    undo = alone.setup(pipe)  # the calibrated threshold reaches diffusers' hook
    try:
        assert pipe.transformer._diffusers_hook.get_hook("sea_cache_root").config.threshold == 0.7
    finally:
        undo()
    with pytest.raises(ValueError, match="choose one of FirstBlockCache, SeaCache"):
        calibratable_cache("MagCache")


def test_attention_cache_hooks_stack_with_a_diffattn_method(pipe):
    """PyramidAttentionBroadcast and FasterCache serve some attention calls from cache; stacked with a diffattn
    method those calls are not refused (the module computed no attention) and the method acts on the others."""
    from diffattn_bench.peers import cache_peers

    caches = {p.label: p for p in cache_peers(None, 4)}
    tile = method_peer("sliding tile", diffattn.SlidingTileAttention(tile=(4, 4, 4), window=(1, 1, 1)))
    peers = [
        combined(f"{name} + sliding tile", caches[name], tile) for name in ("PyramidAttentionBroadcast", "FasterCache")
    ]
    rows, _ = run_video(pipe, SIZE, peers, prompts=[PROMPT], steps=4)
    for row in rows[1:]:
        assert not row.error, row.error
        assert row.density < 1.0 and row.psnr < 100, row
