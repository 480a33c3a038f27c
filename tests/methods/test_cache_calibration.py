"""calibrate_cache: the threshold of one of diffusers' step caches that keeps a PSNR target against dense attention,
and tune(..., cache=...): a profile whose PSNR search runs under that cache (issue #30)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import diffattn
from diffattn.errors import DiffattnError
from diffattn.tuning.cache import CacheCalibration, describe_cache
from diffattn.tuning.tune import pooled_psnr

PROMPTS = ["a red circle", "a blue square"]
CALL = {"num_frames": 5, "height": 32, "width": 32, "guidance_scale": 4.0}
STEPS = 6
THRESHOLDS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 1e6)


@functools.cache
def _pipe():
    from diffattn.testing import tiny_pipeline

    pipe = tiny_pipeline("wan", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _first_block(threshold: float):
    from diffusers.hooks import FirstBlockCacheConfig

    return FirstBlockCacheConfig(threshold=threshold)


def _frames(config=None, profile=None) -> list[np.ndarray]:
    pipe = _pipe()
    if config is not None:
        pipe.transformer.enable_cache(config)
    handle = diffattn.apply(pipe, profile) if profile is not None else None
    try:
        return [
            np.asarray(
                pipe(
                    p,
                    num_inference_steps=STEPS,
                    generator=torch.Generator().manual_seed(i),
                    output_type="np",
                    **CALL,
                ).frames,
                dtype=np.float32,
            )
            for i, p in enumerate(PROMPTS)
        ]
    finally:
        if handle is not None:
            handle.remove()
        if config is not None:
            pipe.transformer.disable_cache()


@functools.cache
def _dense() -> tuple[np.ndarray, ...]:
    return tuple(_frames())


def _calibrate(target: float, thresholds=THRESHOLDS) -> CacheCalibration:
    return diffattn.calibrate_cache(
        _pipe(),
        _first_block,
        PROMPTS,
        psnr_target=target,
        num_inference_steps=STEPS,
        thresholds=thresholds,
        progress=False,
        **CALL,
    )


@functools.cache
def _psnr_at(threshold: float) -> float:
    return pooled_psnr(_frames(_first_block(threshold)), _dense())


def test_the_chosen_threshold_keeps_the_target_and_the_next_one_tried_misses_it():
    # a target between what the no-skip and the skip-everything thresholds give, so the search must choose
    loose, tight = _psnr_at(1e6), _psnr_at(0.0)
    assert tight == float("inf") and loose < 60, "the cache must skip at the largest threshold for this test"
    target = loose + 0.5 * (min(tight, 80.0) - loose)
    found = _calibrate(target)
    assert found.psnr >= target and found.threshold in [t.threshold for t in found.trials]
    # its PSNR and call share are the cached run's, measured again outside the search
    assert found.psnr == pytest.approx(_psnr_at(found.threshold), abs=1e-6)
    assert 0 < found.computed <= 1
    larger = [t for t in found.trials if t.threshold > found.threshold]
    assert larger and all(t.psnr < target for t in larger if t.threshold == min(x.threshold for x in larger))
    assert found.cache == describe_cache(_first_block(found.threshold)) and "threshold=" in found.cache


def test_refinement_bisects_between_the_chosen_threshold_and_the_first_that_missed():
    target = _psnr_at(1.0) + 1.0  # 1.0 misses it, 0.0 (no skip) keeps it
    found = _calibrate(target, thresholds=(0.0, 1.0))
    tried = [t.threshold for t in found.trials]
    assert tried[:2] == [0.0, 1.0] and len(tried) == 4  # the grid, then refine=2 bisections
    assert tried[2] == 0.5 and tried[3] in (0.25, 0.75)
    passing = [t for t in found.trials if t.psnr >= target]
    assert found.threshold == max(t.threshold for t in passing) and found.psnr >= target


def test_skipping_blocks_makes_fewer_attention_calls_and_no_skip_makes_them_all():
    everything = _calibrate(1.0, thresholds=(1e6,))
    assert everything.computed < 0.9, everything
    nothing = _calibrate(99.0, thresholds=(0.0,))
    assert nothing.computed == 1.0 and nothing.psnr == float("inf")


def test_an_unreachable_target_says_what_to_change():
    with pytest.raises(DiffattnError, match="lower psnr_target or try smaller thresholds"):
        _calibrate(99.0, thresholds=(1e6,))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"thresholds": (0.5, 0.1)}, "increasing"),
        ({"thresholds": ()}, "increasing"),
        ({"psnr_target": 0}, "in dB"),
    ],
)
def test_bad_arguments_say_how_to_fix(change, message):
    kwargs = {"psnr_target": 30.0, "num_inference_steps": STEPS, "thresholds": (0.1,), **change}
    with pytest.raises(ValueError, match=message):
        diffattn.calibrate_cache(_pipe(), _first_block, PROMPTS, progress=False, **kwargs)


def test_a_model_without_caches_is_refused():
    from diffattn.testing import tiny_pipeline

    with pytest.raises(DiffattnError, match="enable_cache"):
        diffattn.calibrate_cache(
            tiny_pipeline("sd"), _first_block, PROMPTS, psnr_target=30, num_inference_steps=2, thresholds=(0.1,)
        )


def test_a_calibration_saves_and_reloads_equal(tmp_path):
    found = _calibrate(1.0, thresholds=(0.1, 1e6))
    found.save(tmp_path)
    assert CacheCalibration.exists(tmp_path) and CacheCalibration.load(tmp_path) == found
    with pytest.raises(FileNotFoundError, match="calibrate_cache"):
        CacheCalibration.load(tmp_path / "nothing")


def test_a_profile_tuned_under_a_cache_keeps_the_target_with_it_and_records_it(tmp_path):
    cache = _first_block(0.1)
    with_cache = _psnr_at(0.1)
    target = min(with_cache, 60.0) - 3.0
    profile = diffattn.tune(
        _pipe(),
        "dynamic-topk",
        PROMPTS,
        num_inference_steps=STEPS,
        psnr_target=target,
        cache=cache,
        block_size=16,
        candidates=(0.25, 0.5, 0.75),
        weigh_costs=False,
        refine=0,
        progress=False,
        **CALL,
    )
    assert profile.cache == describe_cache(cache)
    # the search's PSNR is that of the cache and the profile together, against dense without either
    both = pooled_psnr(_frames(cache, profile), _dense())
    assert profile.calibration_psnr == pytest.approx(both, abs=1e-6) and both >= target
    profile.save(tmp_path)
    assert diffattn.TunedProfile.load(tmp_path) == profile


def test_a_cache_without_a_psnr_target_is_refused():
    with pytest.raises(ValueError, match="give psnr_target"):
        diffattn.tune(
            _pipe(), "dynamic-topk", PROMPTS, num_inference_steps=2, error_target=0.1, cache=_first_block(0.1), **CALL
        )
