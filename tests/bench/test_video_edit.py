"""ShapesEdit-Video (diffattn_bench.video_edit): seeded cases and the per-frame pixel checks on rendered clips (a
correct edit passes; a wrong colour or shape, a moved path, a changed other object, a lost size or shade fail), and
one smoke run of scripts/eval_editing_video.py on the embedded video architecture with random weights."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from diffattn_bench.grammar import COLOURS, SHAPES, Motion, Scene, parse_caption
from diffattn_bench.render import render_video, video_problem
from diffattn_bench.video_edit import (
    CASE_CLIP,
    SPLITS,
    TASKS,
    VideoEditCase,
    VideoEditThresholds,
    case_problem,
    case_seed,
    check_consistency,
    check_replace,
    make_cases,
    render_case,
    tasks_of,
)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "eval_editing_video.py"
N = 6  # cases per task and check
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def _with(scene: Scene, index: int, **changes) -> Scene:
    objects = list(scene.objects)
    objects[index] = dataclasses.replace(objects[index], **changes)
    return Scene(tuple(objects), scene.background)


def _target(case: VideoEditCase, scene: Scene | None = None, motions=None) -> np.ndarray:
    """The case's target clip rendered from ``scene`` / ``motions`` (default: the truth) with the case's seed."""
    scene = case.target_scene if scene is None else scene
    motions = case.target_motions if motions is None else motions
    clip, _ = render_video(scene, motions, CASE_CLIP[0], CASE_CLIP[1], rng=case.seed)
    return clip


def _reversed(motions, index: int):
    """``motions`` with object ``index``'s linear motion reversed (None for a circular one)."""
    motion = motions[index]
    if motion.kind != "linear":
        return None
    out = list(motions)
    out[index] = Motion("linear", OPPOSITE[motion.direction])
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


def test_cases_are_deterministic_per_seed_and_splits_disjoint():
    for task in TASKS:
        a, b = make_cases(task, "dev", 3), make_cases(task, "dev", 3)
        assert a == b, task
        report = make_cases(task, "report", 3)
        assert {c.seed for c in a}.isdisjoint(c.seed for c in report)
        assert [c.scene for c in a] != [c.scene for c in report], task
    dev = {case_seed("dev", t, i) for t in TASKS for i in (0, 1, 999_999)}
    report = {case_seed("report", t, i) for t in TASKS for i in (0, 1, 999_999)}
    assert dev.isdisjoint(report) and len(dev) == len(report) == 3 * len(TASKS)
    with pytest.raises(ValueError, match="unknown split"):
        case_seed("test", TASKS[0], 0)
    assert set(SPLITS) == {"dev", "report"}


def test_cases_change_one_word_of_one_object_and_fit_the_clip():
    for task in TASKS:
        for case in make_cases(task, "dev", N):
            src, tgt = parse_caption(case.source), parse_caption(case.target)
            assert len(src) == len(tgt) == (1 if task.startswith("consistency") else 2)
            assert case.source != case.target
            for i, (a, b) in enumerate(zip(src, tgt)):
                if i != case.index:
                    assert a == b, "the other object's words are kept"
                    continue
                if case.attribute == "colour":
                    assert (a.colour, b.colour) == (case.old, case.new) and b.colour not in {o.colour for o in src}
                    assert (a.shape, a.motion) == (b.shape, b.motion)
                elif case.attribute == "shape":
                    assert (a.shape, b.shape) == (case.old, case.new) and a.shape != b.shape
                else:
                    assert a.motion != b.motion and (a.colour, a.shape, a.position) == (b.colour, b.shape, b.position)
            assert case_problem(case, *CASE_CLIP) is None
            assert case_problem(case, 16, 64, 64) is None, "objects and motions scale with the clip"


def test_tasks_of_expands_families():
    assert tasks_of(["all"]) == TASKS
    assert tasks_of(["replace"]) == ("replace/colour", "replace/shape")
    assert tasks_of(["consistency", "replace/shape"]) == ("replace/shape", "consistency/motion")
    with pytest.raises(ValueError, match="unknown task"):
        tasks_of(["removal"])


def test_thresholds_are_checked():
    with pytest.raises(ValueError, match="frame_share"):
        VideoEditThresholds(frame_share=0.0)
    with pytest.raises(ValueError, match="max_shift"):
        VideoEditThresholds(max_shift=-1.0)


# --------------------------------------------------------------------------------------------
# replace/colour and replace/shape on rendered clips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["replace/colour", "replace/shape"])
def test_a_correct_replace_passes(task):
    for case in make_cases(task, "dev", N):
        source, target = render_case(case)
        verdict = check_replace(source, target, case)
        assert verdict.ok, (case.source, case.target, verdict.failures)


def test_a_wrong_colour_or_no_colour_change_fails():
    for case in make_cases("replace/colour", "dev", N):
        source, _ = render_case(case)
        third = next(c for c in COLOURS if c not in {case.old, case.new, *(o.colour for o in case.scene.objects)})
        wrong = _target(case, _with(case.scene, case.index, colour=third))
        assert "edited_missing" in check_replace(source, wrong, case).failures
        unchanged = check_replace(source, source, case).failures
        assert "edited_missing" in unchanged and "old_colour_left" in unchanged


def test_a_wrong_shape_fails():
    for case in make_cases("replace/shape", "dev", N):
        source, _ = render_case(case)
        third = next(s for s in SHAPES if s not in (case.old, case.new))
        wrong_scene = _with(case.scene, case.index, shape=third)
        if video_problem(wrong_scene, case.motions, CASE_CLIP[0], CASE_CLIP[1]) is None:
            assert "edited_wrong" in check_replace(source, _target(case, wrong_scene), case).failures
        assert "edited_wrong" in check_replace(source, source, case).failures, "the old shape is not the new one"


def test_a_shape_edit_counts_only_when_the_source_shows_the_old_shape():
    for case in make_cases("replace/shape", "dev", N):
        _, target = render_case(case)
        assert check_replace(target, target, case).failures == ("source_shape_wrong",), case.source


def test_a_colour_edit_that_changes_the_shape_fails():
    for case in make_cases("replace/colour", "dev", N):
        source, _ = render_case(case)
        obj = case.target_scene.objects[case.index]
        other = next(s for s in SHAPES if s != obj.shape)
        scene = _with(case.target_scene, case.index, shape=other)
        if video_problem(scene, case.motions, CASE_CLIP[0], CASE_CLIP[1]) is None:
            assert "edited_reshaped" in check_replace(source, _target(case, scene), case).failures


@pytest.mark.parametrize("task", ["replace/colour", "replace/shape"])
def test_a_moved_trajectory_fails(task):
    tested = 0
    for case in make_cases(task, "dev", 3 * N):
        motions = _reversed(case.motions, case.index)
        if motions is None or video_problem(case.target_scene, motions, CASE_CLIP[0], CASE_CLIP[1]):
            continue
        source, _ = render_case(case)
        failures = check_replace(source, _target(case, motions=motions), case).failures
        assert failures == ("edited_moved",), (case.source, failures)
        tested += 1
    assert tested >= 3


@pytest.mark.parametrize("change", ["shape", "colour", "motion"])
def test_a_changed_other_object_fails(change):
    tested = 0
    for case in make_cases("replace/colour", "dev", 3 * N):
        other = 1 - case.index
        scene, motions = case.target_scene, case.target_motions
        if change == "shape":
            scene = _with(scene, other, shape=next(s for s in SHAPES if s != scene.objects[other].shape))
        elif change == "colour":
            used = {case.old, case.new, *(o.colour for o in scene.objects)}
            scene = _with(scene, other, colour=next(c for c in COLOURS if c not in used))
        else:
            motions = _reversed(motions, other)
            if motions is None:
                continue
        if video_problem(scene, motions, CASE_CLIP[0], CASE_CLIP[1]):
            continue
        source, _ = render_case(case)
        failures = check_replace(source, _target(case, scene, motions), case).failures
        expected = {"shape": "other_changed", "colour": "other_missing", "motion": "other_moved"}[change]
        assert failures == (expected,), (case.source, change, failures)
        tested += 1
    assert tested >= 3


def test_an_unreadable_source_fails_both_arms_alike():
    case = make_cases("replace/colour", "dev", 1)[0]
    source, target = render_case(case)
    blank = np.repeat(source[:, :1, :1], 32, axis=1).repeat(32, axis=2)  # the corner pixel everywhere: no object
    assert check_replace(blank, target, case).failures == ("source_unreadable",)


# --------------------------------------------------------------------------------------------
# consistency/motion on rendered clips
# --------------------------------------------------------------------------------------------


def test_a_correct_motion_change_passes_and_the_source_motion_fails():
    for case in make_cases("consistency/motion", "dev", N):
        source, target = render_case(case)
        assert check_consistency(source, target, case).ok, case.target
        assert check_consistency(source, source, case).failures == ("motion",), case.target


def test_a_motion_change_that_loses_size_shape_or_shade_fails():
    bigger = {"small": "medium", "medium": "large", "large": "medium"}
    seen = set()
    for case in make_cases("consistency/motion", "dev", N):
        source, _ = render_case(case)
        obj = case.scene.objects[0]
        for name, scene in (
            ("size_changed", _with(case.scene, 0, size=bigger[obj.size])),
            ("shape_changed", _with(case.scene, 0, shape=next(s for s in SHAPES if s != obj.shape))),
        ):
            if video_problem(scene, case.target_motions, CASE_CLIP[0], CASE_CLIP[1]) is None:
                assert name in check_consistency(source, _target(case, scene), case).failures, (case.target, name)
                seen.add(name)
        clip, records = render_video(case.target_scene, case.target_motions, CASE_CLIP[0], CASE_CLIP[1], rng=case.seed)
        shaded = clip.astype(int)
        low = int(np.argmin(COLOURS[obj.colour]))  # a channel at 30: room to shift the shade by 40 levels
        for frame, record in zip(shaded, records):
            frame[record.objects[0].mask, low] += 40
        failures = check_consistency(source, shaded.astype(np.uint8), case).failures
        assert failures == ("colour_changed",), (case.target, failures)
    assert seen == {"size_changed", "shape_changed"}


# --------------------------------------------------------------------------------------------
# Smoke run of the script on the embedded architecture with random weights
# --------------------------------------------------------------------------------------------


def _script():
    spec = importlib.util.spec_from_file_location("eval_editing_video", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["eval_editing_video"] = module
    spec.loader.exec_module(module)
    return module


def test_script_runs_every_task_on_a_random_video_pipeline(tmp_path):
    from diffattn_bench.embedded import random_video_pipeline

    script = _script()
    settings = script.Settings(split="dev", cases=1, steps=2, frames=4)
    examples: list = []
    results = script.run(random_video_pipeline(), ["all"], settings, examples, tmp_path / "clips")
    assert [r["task"] for r in results] == list(TASKS)
    assert [r["method"] for r in results] == ["PromptToPrompt", "PromptToPrompt", "MutualSelfAttention"]
    for r in results:
        record = r["case_records"][0]
        assert record["seed"] == case_seed("dev", r["task"], 0) and record["split"] == "dev"
        assert r["cases"] == 1 and r["success"] in (0.0, 1.0) and r["baseline_success"] in (0.0, 1.0)
        assert 0.0 <= r["ci95"][0] <= r["success"] <= r["ci95"][1] <= 1.0
        assert r["seconds_per_edit"] > 0 and r["cpu_seconds_per_edit"] > 0 and r["baseline_seconds_per_edit"] > 0
        assert record["method"]["ok"] == (r["success"] == 1.0)
        assert record["method"]["ok"] or record["method"]["failures"], "a failed case says why"
    assert [e[2][0].shape for e in examples] == [(4, 32, 32, 3)] * 3
    for task in TASKS:
        kept = np.load(tmp_path / "clips" / f"clips_dev_{task.replace('/', '-')}_0.npz")
        assert kept["seed"].tolist() == [case_seed("dev", task, 0)]
        assert kept["method"].shape == kept["baseline"].shape == (1, 4, 32, 32, 3) and kept["source"].dtype == np.uint8
    table = script.format_table(results)
    assert all(task in table for task in TASKS)
    path = script.write_results(results, settings, tmp_path, str(tmp_path / "no-model"))
    saved = json.loads(path.read_text())
    assert saved["settings"]["frames"] == 4 and math.isfinite(saved["results"][0]["cpu_seconds_per_edit"])
    script.save_grid(examples, tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0
    with pytest.raises(ValueError, match="height/--width >= 32"):
        script.cases_of("replace/colour", script.Settings(split="dev", cases=1, height=16, width=16))
