"""The scenes model's pixel scorer (diffattn_bench.scene_scoring) on rendered ground truth."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from diffattn_bench.scene_scoring import (
    ATTRIBUTES,
    background_psnr,
    calibrate,
    evaluate_scene,
    main,
    object_mask,
    read_scene,
)
from diffattn_bench.scenes import caption, render, render_without, sample_scene, visible_masks

FULL = {"position": 0, "size": 0, "pattern": 0, "background": 0}


@pytest.fixture(scope="module")
def report():
    return calibrate(100, seed=3)


def test_rendered_truth_with_full_captions_passes(report):
    truth = report["truth"]
    assert truth["all_checks"] >= 0.97, truth
    for attribute in (*ATTRIBUTES, "count"):
        assert truth[attribute] >= 0.98, (attribute, truth)


def test_a_wrong_word_in_the_caption_fails_that_attribute(report):
    for attribute, caught in report["perturbed"].items():
        assert caught >= 0.95, (attribute, report["perturbed"])


def test_open_attributes_report_what_the_image_shows():
    rng = np.random.default_rng(0)
    for seed in range(12):
        scene = sample_scene(seed)
        image = render(scene)
        text, _ = caption(scene, rng, leave_out={"position": 1, "size": 1, "pattern": 1, "background": 1})
        result = evaluate_scene(image, text)
        assert result.all_checks, text
        checks = result.checks()
        assert not any(checks[a] for a in ("position", "size", "pattern", "background_kind")), checks
        shown = result.open_attributes()
        assert shown["background"] == {"kind": scene.background.kind, "colour": scene.background.colour}
        for obj, seen in zip(scene.objects, shown["objects"]):
            assert seen == {"position": obj.position, "size": obj.size, "pattern": obj.pattern}


def test_missing_and_extra_objects_fail_the_count():
    scene = sample_scene(np.random.default_rng(5), objects=2)
    image = render(scene)
    text, _ = caption(scene, 0, leave_out=FULL)
    assert evaluate_scene(image, text).all_checks
    alone = render(scene.without(1))
    missing = evaluate_scene(alone, text)
    assert not missing.count_correct and not missing.objects[1].colour_present and not missing.all_checks
    one, _ = caption(scene.without(1), 0, leave_out=FULL)
    extra = evaluate_scene(image, one)
    assert not extra.count_correct and extra.extra == (scene.objects[1].colour,)


def test_object_mask_and_background_psnr_for_removal():
    scene = sample_scene(np.random.default_rng(11), objects=2)
    image = render(scene)
    obj = scene.objects[-1]  # drawn on top, so fully visible
    mask = object_mask(image, obj.colour, obj.shape)
    truth = visible_masks(scene)[-1]
    assert (mask & truth).sum() / (mask | truth).sum() > 0.8
    clean = render_without(scene, len(scene.objects) - 1)
    assert background_psnr(clean, clean, mask) == float("inf")
    assert background_psnr(image, clean, mask) < 15  # the object is still there
    assert background_psnr(image, clean, ~mask) > 40  # outside it nothing changed
    absent = next(c for c in ("red", "green", "blue", "cyan") if c not in {o.colour for o in scene.objects})
    assert not object_mask(image, absent).any()


def test_cli_scores_a_folder(tmp_path, capsys):
    prompts = {}
    for i in range(3):
        scene = sample_scene(i)
        Image.fromarray(render(scene)).save(tmp_path / f"{i}.png")
        prompts[f"{i}.png"] = caption(scene, i)[0]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "all_checks % 100.0" in out and out.count("yes") == 3


def test_reading_survives_noise_and_desaturation():
    rng = np.random.default_rng(1)
    ok = 0
    for seed in range(20):
        scene = sample_scene(np.random.default_rng((9, seed)))
        image = render(scene).astype(float)
        grey = image.mean(axis=-1, keepdims=True)
        image = grey + 0.8 * (image - grey) + rng.normal(0, 4, image.shape)
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        ok += evaluate_scene(image, caption(scene, rng, leave_out=FULL)[0]).all_checks
    assert ok >= 18


def test_read_scene_rejects_non_images():
    with pytest.raises(ValueError, match="uint8"):
        read_scene(np.zeros((64, 64, 3), np.float32))


def test_scenes_prompts_are_seeded_and_split():
    from diffattn_bench.scene_scoring import scenes_prompts
    from diffattn_bench.scenes import HELD_OUT, parse_caption

    first = scenes_prompts(12, "train")
    assert first == scenes_prompts(12, "train")
    assert first != scenes_prompts(12, "train", seed=5)
    for text in first:
        objects, _ = parse_caption(text)
        assert not any((o.colour, o.shape, o.pattern) in HELD_OUT for o in objects if o.pattern)
    held = [parse_caption(t)[0] for t in scenes_prompts(30, "held_out")]
    named = [(o.colour, o.shape, o.pattern) for objs in held for o in objs if o.pattern]
    assert any(k in HELD_OUT for k in named)
    with pytest.raises(ValueError, match="count"):
        scenes_prompts(0)
