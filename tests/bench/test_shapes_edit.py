"""ShapesEdit v2 (diffattn_bench.shapes_edit): case generators and pixel checks on rendered ground truth, the Wilson
interval, and one smoke run of scripts/eval_editing_scenes.py's task loop on a tiny random pipeline."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from diffattn_bench.grammar import COLOURS, POSITION_CENTRES, SHAPES
from diffattn_bench.scenes import (
    PATTERNS,
    SCENE_SIZES,
    Scene,
    _clamped_centre,
    object_masks,
    parse_caption,
    render,
    render_without,
)
from diffattn_bench.shapes_edit import (
    SPLITS,
    TASKS,
    case_seed,
    check_consistency,
    check_layout,
    check_refine,
    check_removal,
    check_replace,
    check_reweight,
    make_cases,
    removal_mask,
    tasks_of,
    wilson_interval,
)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "eval_editing_scenes.py"
N = 6  # cases per task and check on rendered truth


def _with(scene: Scene, index: int, **changes) -> Scene:
    objects = list(scene.objects)
    objects[index] = dataclasses.replace(objects[index], **changes)
    return Scene(tuple(objects), scene.background)


def _moved(scene: Scene, index: int, dx: float) -> Scene:
    """Object ``index`` moved by ``dx`` (fraction of the image) towards the image's middle."""
    x, y = scene.objects[index].centre
    return _with(scene, index, centre=(x + (dx if x < 0.5 else -dx), y))


def _edited(case) -> np.ndarray:
    """A correct rendering of a replace / refine case: only the edited attribute changes."""
    return render(_with(case.scene, case.index, **{case.attribute: case.new}))


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
    with pytest.raises(ValueError, match="case index"):
        case_seed("dev", TASKS[0], 1_000_000)
    assert SPLITS == ("dev", "report")


def test_task_families_expand_in_report_order():
    assert tasks_of(["replace"]) == ("replace/colour", "replace/shape", "replace/pattern")
    assert tasks_of(["layout", "refine/size"]) == ("refine/size", "layout")
    assert tasks_of(["all"]) == TASKS
    with pytest.raises(ValueError, match="unknown task"):
        tasks_of(["recolour"])


@pytest.mark.parametrize("task", [t for t in TASKS if t.split("/")[0] in ("replace", "refine", "consistency")])
def test_captions_change_exactly_one_word(task):
    for case in make_cases(task, "dev", N):
        source, _ = parse_caption(case.source)
        target, _ = parse_caption(case.target)
        assert len(source) == len(target) == len(case.scene.objects)
        changed = [i for i, (s, t) in enumerate(zip(source, target)) if s != t]
        assert changed == [case.index], case
        s, t = source[case.index], target[case.index]
        for name in ("colour", "shape", "size", "pattern", "position"):
            if name == case.attribute:
                assert getattr(t, name) == case.new and getattr(s, name) == case.old, case
            else:
                assert getattr(s, name) == getattr(t, name), case
        if task.startswith("replace"):  # the noise decides position, size and background
            assert all(o.position is None and o.size is None for o in source)
            assert "background" not in case.source
            assert len(case.source.split()) == len(case.target.split())  # a word swap keeps the token count
        if task.startswith("refine"):
            assert len(case.target.split()) == len(case.source.split()) + 1


# --------------------------------------------------------------------------------------------
# Checks on rendered ground truth
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["replace/colour", "replace/shape", "replace/pattern"])
def test_replace_accepts_the_edit_and_rejects_wrong_ones(task):
    for case in make_cases(task, "dev", N):
        source = render(case.scene)
        assert check_replace(source, _edited(case), case).ok, case
        untouched = check_replace(source, source, case).failures
        assert untouched == (("edited_missing",) if task.endswith("colour") else ("edited_wrong",)), case
        moved = render(_moved(_with(case.scene, case.index, **{case.attribute: case.new}), case.index, 0.12))
        assert "edited_moved" in check_replace(source, moved, case).failures, case
        others = [i for i in range(len(case.scene.objects)) if i != case.index]
        if others:
            edited = _with(case.scene, case.index, **{case.attribute: case.new})
            j = others[0]
            other = edited.objects[j]
            wrong_shape = _with(edited, j, shape=next(s for s in SHAPES if s != other.shape))
            assert "other_changed" in check_replace(source, render(wrong_shape), case).failures, case
        background = dataclasses.replace(
            case.scene.background, colour="white" if case.scene.background.dark else "black"
        )
        new_bg = Scene(_with(case.scene, case.index, **{case.attribute: case.new}).objects, background)
        assert "background_changed" in check_replace(source, render(new_bg), case).failures, case


def test_replace_rejects_a_wrong_colour():
    for case in make_cases("replace/colour", "dev", N):
        used = {o.colour for o in case.scene.objects} | {case.new}
        wrong = next(c for c in COLOURS if c not in used)
        image = render(_with(case.scene, case.index, colour=wrong))
        assert check_replace(render(case.scene), image, case).failures == ("edited_missing",)


@pytest.mark.parametrize("task", ["refine/pattern", "refine/size"])
def test_refine_accepts_the_added_word_and_rejects_its_absence(task):
    rejected = 0
    for case in make_cases(task, "dev", N):
        source = render(case.scene)
        obj = case.scene.objects[case.index]
        centre = _clamped_centre(obj.shape, SCENE_SIZES[case.new if task.endswith("size") else obj.size], *obj.centre)
        target = render(_with(case.scene, case.index, **{case.attribute: case.new}, centre=centre))
        assert check_refine(source, target, case).ok, case
        if getattr(obj, case.attribute) != case.new:  # the source does not show the word already
            assert "word_missing" in check_refine(source, source, case).failures, case
            rejected += 1
    assert rejected >= 1  # the case set exercises the rejection at least once (open attributes may already match)


def test_reweight_sees_a_rise_only_where_there_is_one():
    for case in make_cases("reweight/size", "dev", N):
        small = _with(case.scene, 0, size="small")
        obj = case.scene.objects[0]
        small = _with(small, 0, centre=_clamped_centre(obj.shape, SCENE_SIZES["small"], *obj.centre))
        assert check_reweight(render(small), render(case.scene), case).ok, case
        assert check_reweight(render(case.scene), render(small), case).failures == ("no_rise",)
        assert check_reweight(render(case.scene), render(case.scene), case).failures == ("no_rise",)
    for case in make_cases("reweight/pattern", "dev", N):
        solid = render(_with(case.scene, 0, pattern="solid"))
        assert check_reweight(solid, render(case.scene), case).ok, case
        assert not check_reweight(render(case.scene), solid, case).ok


def test_consistency_accepts_the_move_and_rejects_lost_identity():
    for case in make_cases("consistency/place", "dev", N):
        obj = case.scene.objects[0]
        centre = _clamped_centre(obj.shape, SCENE_SIZES[obj.size], *POSITION_CENTRES[case.new])
        moved = _with(case.scene, 0, centre=centre)
        source = render(case.scene)
        assert check_consistency(source, render(moved), case).ok, case
        assert "place" in check_consistency(source, source, case).failures
        other_pattern = next(p for p in PATTERNS if p != obj.pattern)
        assert "pattern" in check_consistency(source, render(_with(moved, 0, pattern=other_pattern)), case).failures
        other_size = next(s for s in SCENE_SIZES if s != obj.size)
        resized = _with(moved, 0, size=other_size, centre=_clamped_centre(obj.shape, SCENE_SIZES[other_size], *centre))
        assert "size_changed" in check_consistency(source, render(resized), case).failures, case
        shade = tuple(-40 if v > 128 else 40 for v in COLOURS[obj.colour])
        assert "colour" in check_consistency(source, render(_with(moved, 0, shade=shade)), case).failures, case
    for case in make_cases("consistency/size", "dev", N):
        obj = case.scene.objects[0]
        large = _with(case.scene, 0, size="large", centre=_clamped_centre(obj.shape, SCENE_SIZES["large"], *obj.centre))
        assert check_consistency(render(case.scene), render(large), case).ok, case
        assert check_consistency(render(case.scene), render(case.scene), case).failures == ("size",)


def test_removal_accepts_the_clean_background_and_rejects_an_untouched_hole():
    for case in make_cases("removal", "dev", N):
        mask = removal_mask(case)
        others = [m for i, m in enumerate(object_masks(case.scene)) if i != case.index]
        assert mask.any() and not any((mask & m).any() for m in others)
        clean = render_without(case.scene, case.index)
        assert check_removal(clean, case).ok, case
        assert check_removal(render(case.scene), case).failures == ("hole",), case
        j = next(i for i in range(len(case.scene.objects)) if i != case.index)
        moved = render_without(_moved(case.scene, j, 0.1), case.index)
        assert "other_moved" in check_removal(moved, case).failures or "hole" in check_removal(moved, case).failures
        used = {o.colour for o in case.scene.objects}
        recoloured = _with(case.scene, j, colour=next(c for c in COLOURS if c not in used))
        assert "other_missing" in check_removal(render_without(recoloured, case.index), case, mask=mask).failures


def test_layout_accepts_objects_in_their_boxes_only():
    for case in make_cases("layout", "dev", N):
        assert check_layout(render(case.scene), case).ok, case
        (x0, _, x1, _) = case.subjects[0][1]
        outside = _moved(case.scene, 0, x1 - x0)  # a box side away: the centroid leaves its box
        assert "outside_box" in check_layout(render(outside), case).failures, case
        assert not check_layout(render(case.scene.without(1)), case).ok


def test_wilson_interval_matches_known_values():
    np.testing.assert_allclose(wilson_interval(5, 10), (0.2366, 0.7634), atol=1e-4)
    np.testing.assert_allclose(wilson_interval(0, 10), (0.0, 0.2775), atol=1e-4)
    np.testing.assert_allclose(wilson_interval(10, 10), (0.7225, 1.0), atol=1e-4)
    np.testing.assert_allclose(wilson_interval(81, 263), (0.2553, 0.3662), atol=1e-4)
    low, high = wilson_interval(45, 50)
    assert low < 0.9 < high
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


# --------------------------------------------------------------------------------------------
# Smoke run of the script's task loop
# --------------------------------------------------------------------------------------------


def _script():
    spec = importlib.util.spec_from_file_location("eval_editing_scenes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["eval_editing_scenes"] = module
    spec.loader.exec_module(module)
    return module


def _tiny_scenes_pipeline():
    """tiny_pipeline("sd") reading with the scenes model's tokenizer (every scene word one token, as the model)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffattn.testing import tiny_pipeline
    from diffattn_bench.embedded import SCENES_MAX_TEXT_TOKENS, scenes_tokenizer

    pipe = tiny_pipeline("sd")
    tokenizer = scenes_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=pipe.unet.config.cross_attention_dim,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=SCENES_MAX_TEXT_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe.text_encoder = CLIPTextModel(config).eval()
    pipe.tokenizer = tokenizer
    return pipe


def test_script_task_loop_runs_every_task(tmp_path):
    script = _script()
    settings = script.Settings(split="dev", cases=1, steps=2)
    examples: list = []
    results = script.run(_tiny_scenes_pipeline(), ["all"], settings, examples)
    assert [r["task"] for r in results] == list(TASKS)
    for r in results:
        record = r["case_records"][0]
        assert record["seed"] == case_seed("dev", r["task"], 0) and record["split"] == "dev"
        if r["task"] == "inversion":
            assert math.isfinite(r["psnr_mean"]) and r["seconds_per_case"] > 0
            continue
        assert r["cases"] == 1 and r["success"] in (0.0, 1.0) and r["baseline_success"] in (0.0, 1.0)
        assert 0.0 <= r["ci95"][0] <= r["success"] <= r["ci95"][1] <= 1.0
        assert r["seconds_per_edit"] > 0 and r["baseline_seconds_per_edit"] > 0
        assert record["method"]["ok"] == (r["success"] == 1.0)
    table = script.format_table(results)
    assert all(task in table for task in TASKS)
    path = script.write_results(results, settings, tmp_path, str(tmp_path / "no-model"))
    assert json.loads(path.read_text())["settings"]["split"] == "dev"
    rows = path.with_suffix(".md").read_text().splitlines()[2:]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == list(TASKS)
    script.save_grid(examples[:2], tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0


def _result(task: str, success: float, baseline: float) -> dict:
    return {
        "task": task,
        "method": "M",
        "success": success,
        "ci95": [0.0, 1.0],
        "baseline_success": baseline,
        "baseline_ci95": [0.0, 1.0],
        "seconds_per_edit": 1.0,
        "baseline_seconds_per_edit": 1.0,
    }


@pytest.mark.parametrize(
    ("task", "success", "baseline", "met"),
    [
        ("replace/colour", 0.95, 0.50, "yes"),
        ("replace/colour", 0.95, 0.60, "no"),  # 35 points above the baseline, 40 needed
        ("replace/shape", 0.85, 0.00, "no"),  # below 90%
        ("consistency/place", 0.90, 0.55, "yes"),
        ("consistency/size", 0.90, 0.65, "no"),
        ("removal", 0.80, 0.79, "yes"),
        ("layout", 0.84, 0.00, "no"),
        ("refine/pattern", 1.0, 0.0, "–"),  # no numeric target
    ],
)
def test_markdown_table_says_whether_the_target_is_met(task, success, baseline, met):
    script = _script()
    row = script.markdown_table([_result(task, success, baseline)]).splitlines()[2].split(" | ")
    assert row[0] == f"| {task}" and row[6] == met
    assert row[4] == f"{100 * (success - baseline):+.1f}"


def test_markdown_table_inversion_against_30_db():
    script = _script()
    record = {"task": "inversion", "method": "DDIM", "cases": 3, "psnr_min": 20.0, "seconds_per_case": 1.0}
    assert " no " in script.markdown_table([{**record, "psnr_mean": 29.9}]).splitlines()[2]
    assert " yes " in script.markdown_table([{**record, "psnr_mean": 30.0}]).splitlines()[2]
