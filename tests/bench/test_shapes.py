"""Shapes world: grammar, seeded generators and ShapesBench (pixel-only evaluator)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from diffattn_bench.grammar import (
    BACKGROUNDS,
    CIRCLE_RADIUS,
    COLOURS,
    LINEAR_DISTANCE,
    MOTION_DIRECTIONS,
    POSITION_CENTRES,
    POSITIONS,
    SHAPES,
    SIZES,
    VOCABULARY,
    Motion,
    ParsedObject,
    Scene,
    ShapeSpec,
    caption,
    parse_caption,
    position_of,
    shape_coverage,
)
from diffattn_bench.render import (
    BACKGROUND_AMPLITUDE,
    ShapesDataset,
    random_scene,
    random_video_scene,
    render_scene,
    render_video,
    scene_problem,
)
from diffattn_bench.scoring import (
    BenchConfig,
    classify_shape,
    evaluate_image,
    evaluate_video,
    in_boxes,
    main,
    psnr,
    ssim,
    summarize,
    summarize_videos,
)

ALL_MOTIONS = (None, Motion("circular"), *(Motion("linear", d) for d in MOTION_DIRECTIONS))
BOTH_BACKGROUNDS = tuple(BACKGROUNDS)


def _example(seed: int, size: int, min_objects: int = 1) -> tuple[Scene, np.ndarray, object]:
    """Scene drawn from seed [seed, 0], rendered with seed [seed, 1] (so it can be re-rendered)."""
    scene = random_scene([seed, 0], 3, min_objects=min_objects, size=size, backgrounds=BOTH_BACKGROUNDS)
    image, record = render_scene(scene, size, [seed, 1])
    return scene, image, record


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        p = np.pad(mask, 1)
        h, w = mask.shape
        mask = np.logical_or.reduce([p[y : y + h, x : x + w] for y in range(3) for x in range(3)])
    return mask


# --------------------------------------------------------------------------------------------
# Grammar
# --------------------------------------------------------------------------------------------


def test_palette_is_well_separated_and_far_from_backgrounds():
    colours = np.array(list(COLOURS.values()), float)
    assert len(colours) >= 6
    pairwise = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
    assert pairwise[~np.eye(len(colours), dtype=bool)].min() >= 190
    for bg in BACKGROUNDS.values():
        assert np.linalg.norm(colours - np.array(bg), axis=-1).min() >= 190


def test_position_words_map_to_their_own_region():
    for word, (x, y) in POSITION_CENTRES.items():
        assert position_of(x, y) == word
    assert position_of(0.34, 0.5) == "left" and position_of(0.36, 0.5) == "centre"
    assert position_of(0.2, 0.3) == "top left"


@pytest.mark.parametrize("with_size", [False, True])
def test_caption_parse_round_trip_all_single_object_combinations(with_size):
    for colour, shape, position, size, motion in itertools.product(COLOURS, SHAPES, POSITIONS, SIZES, ALL_MOTIONS):
        scene = Scene((ShapeSpec(shape, colour, position, size),))
        text = caption(scene, with_size=with_size, motions=(motion,))
        assert set(text.replace(",", " , ").split()) <= set(VOCABULARY), text
        (parsed,) = parse_caption(text)
        assert parsed.matches(scene.objects[0]) and parsed.motion == motion
        assert parsed.size == (size if with_size else None)


@st.composite
def scenes_with_motions(draw):
    n = draw(st.integers(1, 4))
    positions = draw(st.lists(st.sampled_from(POSITIONS), min_size=n, max_size=n, unique=True))
    objects = tuple(
        ShapeSpec(draw(st.sampled_from(SHAPES)), draw(st.sampled_from(tuple(COLOURS))), p, draw(st.sampled_from(SIZES)))
        for p in positions
    )
    motions = tuple(draw(st.sampled_from(ALL_MOTIONS)) for _ in objects)
    return Scene(objects, draw(st.sampled_from(BOTH_BACKGROUNDS))), motions, draw(st.booleans())


@settings(max_examples=200, deadline=None)
@given(scenes_with_motions())
def test_caption_parse_round_trip_multi_object(example):
    scene, motions, with_size = example
    text = caption(scene, with_size=with_size, motions=motions)
    parsed = parse_caption(text)
    assert len(parsed) == len(scene.objects)
    for p, spec, motion in zip(parsed, scene.objects, motions):
        assert p.matches(spec) and p.motion == motion and (p.size is not None) == with_size
    assert parse_caption(" " + text.replace("centre", "center").upper() + ". ") == parsed


def test_caption_example_and_lenient_parsing():
    scene = Scene((ShapeSpec("circle", "red", "left"), ShapeSpec("square", "blue", "right")))
    assert caption(scene) == "a red circle on the left and a blue square on the right"
    three = Scene((*scene.objects, ShapeSpec("triangle", "green", "top left")))
    assert caption(three) == "a red circle on the left, a blue square on the right and a green triangle at the top left"
    assert parse_caption("A red circle in the center") == (ParsedObject("red", "circle", "centre"),)


@pytest.mark.parametrize(
    "text, hint",
    [
        ("", "empty"),
        ("a purple circle on the left", "unknown colour 'purple'"),
        ("a red hexagon on the left", "unknown shape 'hexagon'"),
        ("a red circle", "missing position phrase"),
        ("a red circle on the middle", "unknown position 'middle'"),
        ("red circle on the left", "must start with 'a'"),
        ("a red circle on the left moving sideways", "unknown motion"),
        ("a red circle on the left and", "unknown position"),
        ("a red circle on the left, , a blue square on the right", "empty phrase"),
    ],
)
def test_parse_errors_name_the_problem(text, hint):
    with pytest.raises(ValueError, match="cannot parse") as info:
        parse_caption(text)
    assert hint in str(info.value)


def test_dataclasses_validate_with_helpful_messages():
    with pytest.raises(ValueError, match="unknown colour 'purple'; use one of 'red'"):
        ShapeSpec("circle", "purple", "left")
    with pytest.raises(ValueError, match="unknown position"):
        ShapeSpec("circle", "red", "middle")
    with pytest.raises(ValueError, match="own position"):
        Scene((ShapeSpec("circle", "red", "left"), ShapeSpec("square", "blue", "left")))
    with pytest.raises(ValueError, match="non-empty"):
        Scene(())
    with pytest.raises(ValueError, match="unknown background"):
        Scene((ShapeSpec("circle", "red", "left"),), background="grey")
    with pytest.raises(ValueError, match="needs a direction"):
        Motion("linear")
    with pytest.raises(ValueError, match="takes no direction"):
        Motion("circular", "left")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ShapeSpec("circle", "red", "left").colour = "blue"  # type: ignore[misc]
    assert Scene([ShapeSpec("circle", "red", "left")]).objects == (ShapeSpec("circle", "red", "left"),)


@pytest.mark.parametrize("frames", [2, 8, 13])
def test_motion_trajectories_are_exact(frames):
    centre = (0.5, 0.5)
    for motion in ALL_MOTIONS[1:]:
        path = np.array([motion.position(t, frames, centre) for t in range(frames)])
        np.testing.assert_allclose(path.mean(axis=0), centre, atol=1e-12)  # position word = mean position
        if motion.kind == "linear":
            dx, dy = MOTION_DIRECTIONS[motion.direction]
            np.testing.assert_allclose(path[-1] - path[0], (dx * LINEAR_DISTANCE, dy * LINEAR_DISTANCE))
        else:
            np.testing.assert_allclose(np.linalg.norm(path - centre, axis=1), CIRCLE_RADIUS)
            np.testing.assert_allclose(path[0], (0.5, 0.5 - CIRCLE_RADIUS), atol=1e-12)  # starts at the top
            if frames >= 4:  # clockwise on screen (y down): top -> right
                assert path[1][0] > 0.5
    with pytest.raises(ValueError, match="outside"):
        Motion("circular").position(8, 8, centre)


# --------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64, (32, 48)])
def test_render_is_seeded_and_records_match_pixels(size):
    for seed in range(20):
        scene, image, record = _example(seed, size)
        _, again, _ = _example(seed, size)
        np.testing.assert_array_equal(image, again)
        h, w = record.size
        assert image.shape == (h, w, 3) and image.dtype == np.uint8
        occupied = np.zeros((h, w), bool)
        for obj in record.objects:
            cx, cy = obj.centre
            assert obj.mask[int(cy), int(cx)]  # the centroid lies inside the shape
            x0, y0, x1, y1 = obj.bbox
            assert obj.mask[y0:y1, x0:x1].sum() == obj.mask.sum() > 0
            assert not (occupied & obj.mask).any()  # no overlap
            occupied |= obj.mask
            assert position_of(cx / w, cy / h) == obj.spec.position
            assert len({o.spec.colour for o in record.objects}) == len(record.objects)
        # background: within the texture amplitude of its base colour, far from every palette colour
        background = image[~_dilate(occupied, 2)].astype(float)
        assert np.abs(background - record.background).max() <= BACKGROUND_AMPLITUDE
        palette = np.array(list(COLOURS.values()), float)
        assert np.linalg.norm(background[:, None] - palette, axis=-1).min() > 150
    assert not np.array_equal(_example(0, size)[1], _example(1, size)[1])


def test_random_scene_respects_options_and_rejects_impossible_ones():
    counts = set()
    for seed in range(200):
        scene = random_scene(seed, 3, size=32)
        counts.add(len(scene.objects))
        assert scene_problem(scene, 32) is None
        assert len({o.colour for o in scene.objects}) == len(scene.objects)
    assert counts == {1, 2, 3}
    scene = random_scene(0, 2, min_objects=2, shapes=("square",), colours=("red", "blue"), positions=("left", "right"))
    assert {o.colour for o in scene.objects} == {"red", "blue"} and {o.shape for o in scene.objects} == {"square"}
    with pytest.raises(ValueError, match="distinct colours"):
        random_scene(0, 3, colours=("red", "blue"))
    with pytest.raises(ValueError, match="no readable layout"):
        random_scene(0, 3, min_objects=3, positions=("left", "centre", "right"), sizes=("large",))


def test_render_refuses_unreadable_scenes():
    crowded = Scene((ShapeSpec("square", "red", "left", "large"), ShapeSpec("square", "blue", "centre", "large")))
    with pytest.raises(ValueError, match="cannot render scene: .* apart; use smaller sizes"):
        render_scene(crowded, 32, 0)
    with pytest.raises(ValueError, match="at least 16 px"):
        render_scene(Scene((ShapeSpec("circle", "red", "left"),)), 8, 0)


def test_dataset_items_are_deterministic_normalised_tensors():
    data = ShapesDataset(16, seed=3, size=32)
    item = data[5]
    x = item["pixel_values"]
    assert isinstance(x, torch.Tensor) and x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    torch.testing.assert_close(x, ShapesDataset(16, seed=3, size=32)[5]["pixel_values"])
    assert not torch.equal(x, ShapesDataset(16, seed=4, size=32)[5]["pixel_values"])
    assert parse_caption(item["caption"])
    image, record, text = data.example(5)
    assert text == item["caption"] and all(p.matches(o.spec) for p, o in zip(parse_caption(text), record.objects))
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and len(batch["caption"]) == 4
    assert parse_caption(ShapesDataset(4, with_size=True)[0]["caption"])[0].size is not None
    with pytest.raises(IndexError):
        data.example(16)


# --------------------------------------------------------------------------------------------
# ShapesBench on ground truth
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, n", [(32, 400), (64, 150)])
def test_ground_truth_scores_perfect(size, n):
    results = []
    for seed in range(n):
        scene, image, _ = _example(seed, size)
        result = evaluate_image(image, caption(scene))
        assert result.correct, (seed, caption(scene), result)
        results.append(result)
    summary = summarize(results)
    assert summary.n_single > 0 and summary.n_two > 0
    assert summary.colour_position_single == summary.colour_position_two == 1.0
    assert summary.shape_accuracy == summary.count_accuracy == 1.0
    assert summary.leakage_rate == 0.0 and summary.overall_accuracy == 1.0


def test_ground_truth_without_antialiasing_scores_perfect():
    for seed in range(40):
        scene = random_scene([seed, 0], 3, size=32)
        image, _ = render_scene(scene, 32, [seed, 1], antialias=False)
        assert evaluate_image(image, caption(scene)).correct


@pytest.mark.parametrize("side", [8.0, 9.0, 9.5, 12.8, 25.0])
def test_classify_shape_on_ideal_templates(side):
    for shape in SHAPES:
        for phase in (0.0, 0.25, 0.5, 0.8):
            cov = shape_coverage(shape, (20 + phase, 20 + phase / 2), side, (40, 40))
            assert classify_shape(cov)[0] == shape
            assert classify_shape(cov >= 0.5)[0] == shape  # a hard mask works too


# --------------------------------------------------------------------------------------------
# ShapesBench detects corruptions
# --------------------------------------------------------------------------------------------

SEEDS = range(30)


def _unused_colour(scene: Scene) -> str:
    return next(c for c in COLOURS if c not in {o.colour for o in scene.objects})


@pytest.mark.parametrize("size", [32, 64])
def test_detects_wrong_colour(size):
    for seed in SEEDS:
        scene, _, _ = _example(seed, size)
        new = _unused_colour(scene)
        bad = Scene((dataclasses.replace(scene.objects[0], colour=new), *scene.objects[1:]), scene.background)
        image, _ = render_scene(bad, size, [seed, 1])
        result = evaluate_image(image, caption(scene))
        assert not result.objects[0].colour_present and not result.count_correct and new in result.extra
        assert all(o.colour_position_correct for o in result.objects[1:])


@pytest.mark.parametrize("size", [32, 64])
def test_detects_moved_object(size):
    tested = 0
    for seed in SEEDS:
        scene, _, _ = _example(seed, size)
        for position in [p for p in POSITIONS if p not in {o.position for o in scene.objects}]:
            moved = dataclasses.replace(scene.objects[0], position=position)
            bad = Scene((moved, *scene.objects[1:]), scene.background)
            if scene_problem(bad, size) is None:
                break
        else:
            continue
        tested += 1
        image, _ = render_scene(bad, size, [seed, 1])
        result = evaluate_image(image, caption(scene))
        first = result.objects[0]
        assert first.colour_present and not first.position_correct and first.component.position == position
        assert result.count_correct and not result.colour_position_correct
    assert tested >= 20


@pytest.mark.parametrize("size", [32, 64])
def test_detects_missing_object(size):
    for seed in SEEDS:
        scene, image, record = _example(seed, size)
        painted = image.copy()
        painted[_dilate(record.objects[0].mask, 2)] = record.background  # paint over with background
        result = evaluate_image(painted, caption(scene))
        assert not result.objects[0].colour_present and not result.count_correct and not result.correct
        assert all(o.colour_position_correct for o in result.objects[1:])


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_detects_colour_leakage(size, strength):
    for seed in SEEDS:
        scene, image, record = _example(seed, size, min_objects=2)
        a, b = record.objects[0], record.objects[1]
        leaked = image.astype(float)
        half = b.mask & (np.arange(image.shape[1])[None, :] < b.centre[0])  # left half of B
        leaked[half] = (1 - strength) * leaked[half] + strength * np.array(a.colour)
        result = evaluate_image(np.rint(leaked).astype(np.uint8), caption(scene))
        assert (a.spec.colour, b.spec.colour) in result.leaked_pairs, (seed, caption(scene), result.leaked_pairs)
        assert result.objects[0].colour_position_correct  # A itself is unharmed


@pytest.mark.parametrize("size", [32, 64])
def test_detects_wrong_shape(size):
    tested = 0
    for seed in SEEDS:
        scene, _, _ = _example(seed, size)
        for shape in SHAPES:
            bad = Scene((dataclasses.replace(scene.objects[0], shape=shape), *scene.objects[1:]), scene.background)
            if shape != scene.objects[0].shape and scene_problem(bad, size) is None:
                break
        else:
            continue
        tested += 1
        image, _ = render_scene(bad, size, [seed, 1])
        result = evaluate_image(image, caption(scene))
        first = result.objects[0]
        assert first.colour_present and not first.shape_correct and first.component.shape == shape
        assert result.count_correct and not result.correct
    assert tested >= 25


def test_summary_fractions_and_empty_categories():
    scene = Scene((ShapeSpec("circle", "red", "left"), ShapeSpec("square", "blue", "right")))
    good, record = render_scene(scene, 32, 0)
    bad = good.copy()
    bad[_dilate(record.objects[1].mask, 2)] = record.background
    results = [evaluate_image(good, caption(scene)), evaluate_image(bad, caption(scene))]
    s = summarize(results)
    assert (s.n_images, s.n_single, s.n_two) == (2, 0, 2)
    assert s.colour_position_two == 0.5 and s.shape_accuracy == 0.75 and s.count_accuracy == 0.5
    assert math.isnan(s.colour_position_single) and s.leakage_rate == 0.0 and s.overall_accuracy == 0.5
    assert math.isnan(summarize([]).overall_accuracy)


def test_unprompted_colour_and_extra_object_fail_count():
    scene = Scene((ShapeSpec("circle", "red", "left"), ShapeSpec("square", "blue", "right")))
    image, _ = render_scene(scene, 32, 0)
    one = evaluate_image(image, "a red circle on the left")
    assert one.objects[0].colour_position_correct and not one.count_correct and one.extra == ("blue",)
    same = evaluate_image(image, "a red circle on the left and a red square on the right")
    assert not same.count_correct and not same.objects[1].colour_present


def test_bench_config_and_inputs_are_validated():
    with pytest.raises(ValueError, match="between 0 and 1"):
        BenchConfig(leak_fraction=1.5)
    with pytest.raises(ValueError, match="RGB distance"):
        BenchConfig(colour_residual=0)
    with pytest.raises(ValueError, match="uint8"):
        evaluate_image(np.zeros((32, 32, 3)), "a red circle on the left")
    with pytest.raises(ValueError, match="H x W x 3"):
        evaluate_image(np.zeros((32, 32), np.uint8), "a red circle on the left")


# --------------------------------------------------------------------------------------------
# Videos
# --------------------------------------------------------------------------------------------

_WRONG = {
    None: Motion("circular"),
    Motion("circular"): Motion("linear", "left"),
    Motion("linear", "left"): Motion("linear", "right"),
    Motion("linear", "right"): Motion("linear", "left"),
    Motion("linear", "up"): Motion("linear", "down"),
    Motion("linear", "down"): Motion("linear", "up"),
}


@pytest.mark.parametrize("size, frames", [(32, 8), (64, 12)])
def test_video_trajectories(size, frames):
    for seed in range(12):
        scene, motions = random_video_scene([seed, 0], 2, frames=frames, size=size, allow_static=True)
        video, records = render_video(scene, motions, frames, size, [seed, 1])
        assert video.shape == (frames, size, size, 3) and len(records) == frames
        text = caption(scene, motions=motions)
        good = evaluate_video(video, text)
        assert good.trajectory_error < 0.01 and all(good.positions_correct)
        assert good.missing_frames == (0,) * len(motions)
        assert good.flicker == 0.0  # the background is identical in every frame
        assert all(f.count_correct and not f.leakage for f in good.frames)
        wrong = evaluate_video(video, caption(scene, motions=tuple(_WRONG[m] for m in motions)))
        assert min(wrong.object_errors) > 0.05


def test_video_flicker_and_missing_frames():
    scene = Scene((ShapeSpec("square", "red", "centre"),))
    motions = (Motion("linear", "right"),)
    video, _ = render_video(scene, motions, 8, 32, 0)
    noisy = video.astype(int)
    noisy[1::2] += 6  # every other frame brighter: 6 levels of flicker
    result = evaluate_video(np.clip(noisy, 0, 255).astype(np.uint8), caption(scene, motions=motions))
    assert result.flicker == pytest.approx(6.0, abs=0.5) and result.trajectory_error < 0.01
    blank = video.copy()
    blank[2:] = video[0, 0, 0]
    result = evaluate_video(blank, caption(scene, motions=motions))
    assert result.missing_frames == (6,) and math.isfinite(result.object_errors[0])
    blank[1] = video[0, 0, 0]
    assert math.isnan(evaluate_video(blank, caption(scene, motions=motions)).trajectory_error)


def _two_shape_clip(frames: int, size: int) -> tuple[Scene, tuple]:
    """A seeded two-object clip whose objects differ in shape (so swapping their colours changes what each shows)."""
    for seed in range(100):
        scene, motions = random_video_scene([seed, 7], 2, min_objects=2, frames=frames, size=size)
        if scene.objects[0].shape != scene.objects[1].shape:
            return scene, motions
    raise AssertionError("no two-shape clip in 100 seeds")


def _with_objects(scene: Scene, **changes: dict) -> Scene:
    """``scene`` with object ``i``'s fields replaced by ``changes["o<i>"]``."""
    return dataclasses.replace(
        scene,
        objects=tuple(dataclasses.replace(o, **changes.get(f"o{i}", {})) for i, o in enumerate(scene.objects)),
    )


@pytest.mark.parametrize("size, frames", [(32, 8), (64, 16)])
def test_video_shape_frames_count_colour_and_shape_per_object_per_frame(size, frames):
    scene, motions = _two_shape_clip(frames, size)
    a, b = scene.objects
    text = caption(scene, motions=motions)
    video, _ = render_video(scene, motions, frames, size, 1)
    truth = evaluate_video(video, text)
    assert truth.shape_frames == (2 * frames, 2 * frames) and truth.object_shape_frames == (frames, frames)

    other_shape = next(s for s in SHAPES if s not in (a.shape, b.shape))
    other_colour = next(c for c in COLOURS if c not in (a.colour, b.colour))
    variants = {
        "shape": _with_objects(scene, o0={"shape": other_shape}),
        "colour": _with_objects(scene, o0={"colour": other_colour}),
        "colours swapped": _with_objects(scene, o0={"colour": b.colour}, o1={"colour": a.colour}),
    }
    wrong_per_frame = {"shape": (1, 0), "colour": (1, 0), "colours swapped": (1, 1)}
    results = []
    for name, changed in variants.items():
        swapped, _ = render_video(changed, motions, frames, size, 1)
        clip = video.copy()
        clip[frames // 2] = swapped[frames // 2]  # one frame shows the wrong object(s)
        result = evaluate_video(clip, text)
        lost = wrong_per_frame[name]
        assert result.object_shape_frames == (frames - lost[0], frames - lost[1]), name
        assert result.shape_frames == (2 * frames - sum(lost), 2 * frames), name
        assert result.frames[frames // 2].objects[0].colour_shape_correct is False
        results.append(result)
    summary = summarize_videos([truth, *results])
    assert summary["shape_frames"] == pytest.approx((8 * frames - 4) / (8 * frames))
    assert summarize_videos([truth])["shape_frames"] == 1.0


def test_video_shape_frames_count_a_missing_object_as_wrong():
    scene = Scene((ShapeSpec("square", "red", "centre"),))
    motions = (Motion("linear", "right"),)
    video, _ = render_video(scene, motions, 8, 32, 0)
    video[3:5] = video[0, 0, 0]  # two frames of background only
    assert evaluate_video(video, caption(scene, motions=motions)).shape_frames == (6, 8)


def test_render_video_refuses_objects_leaving_the_frame():
    scene = Scene((ShapeSpec("circle", "red", "left", "large"),))
    with pytest.raises(ValueError, match="cannot render video: frame 0: .* does not fit"):
        render_video(scene, (Motion("linear", "right"),), 8, 32, 0)


# --------------------------------------------------------------------------------------------
# PSNR / SSIM
# --------------------------------------------------------------------------------------------


def test_psnr_ssim_hand_checked_values():
    a = np.full((32, 32, 3), 100, np.uint8)
    b = np.full((32, 32, 3), 110, np.uint8)
    assert psnr(a, a) == math.inf and ssim(a, a) == pytest.approx(1.0)
    assert psnr(np.zeros_like(a), b - 100) == pytest.approx(10 * math.log10(255**2 / 100))  # mse = 100
    # constant images: contrast/structure terms are (C2 / C2), only the luminance term remains
    c1 = (0.01 * 255) ** 2
    assert ssim(a, b) == pytest.approx((2 * 100 * 110 + c1) / (100**2 + 110**2 + c1), rel=1e-12)
    assert ssim(a[..., 0], b[..., 0]) == pytest.approx(ssim(a, b))
    # [0, 1] floats default to data_range 1; other floats need it explicitly
    assert psnr(a / 255, b / 255) == pytest.approx(psnr(a, b))
    with pytest.raises(ValueError, match="data_range"):
        ssim(a * 2.0, b * 2.0)
    assert ssim(a / 127.5, b / 127.5, data_range=2.0) == pytest.approx(ssim(a, b))  # scale-invariant
    assert psnr(a / 127.5 - 1, b / 127.5 - 1, data_range=2.0) == pytest.approx(psnr(a, b))
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(a, b[:16])
    with pytest.raises(ValueError, match="win_size"):
        ssim(a[:8, :8], b[:8, :8])


def test_ssim_matches_filter_based_reference():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 37, 3)).astype(np.uint8)
    b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    x, y = a.astype(float), b.astype(float)

    def blur(z):  # scikit-image's Gaussian weights: sigma 1.5, truncate 3.5 -> 11 taps, border cropped below
        return np.stack([ndimage.gaussian_filter(z[..., c], 1.5, truncate=3.5) for c in range(3)], axis=-1)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    full = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert ssim(a, b) == pytest.approx(full[5:-5, 5:-5].mean(), rel=1e-12)


def test_psnr_ssim_fall_monotonically_with_noise():
    _, image, _ = _example(0, 64)
    noise = np.random.default_rng(0).normal(size=image.shape)
    levels = [0, 2, 5, 10, 20, 40]
    noisy = [np.clip(image + s * noise, 0, 255).round().astype(np.uint8) for s in levels]
    p = [psnr(image, x) for x in noisy]
    s = [ssim(image, x) for x in noisy]
    assert p[0] == math.inf and s[0] == pytest.approx(1.0)
    assert all(x > y for x, y in zip(p, p[1:])) and all(x > y for x, y in zip(s, s[1:]))
    assert 0 < s[-1] < 0.9
    assert ssim(noisy[3], image) == pytest.approx(s[3])  # symmetric


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_scores_a_folder(tmp_path, capsys):
    prompts = {}
    for seed in range(3):
        scene, image, _ = _example(seed, 32)
        Image.fromarray(image).save(tmp_path / f"img{seed}.png")
        prompts[f"img{seed}.png"] = caption(scene)
    wrong = "a cyan circle on the left" if "cyan" not in prompts["img0.png"] else "a red circle on the left"
    prompts["img0.png"] = wrong  # never matches the image: scores 2 of 3 correct
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "img1.png" in out and "all correct %  66.7" in out
    (tmp_path / "prompts.json").unlink()
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "prompts.json not found" in capsys.readouterr().err


def test_in_boxes_needs_each_colour_inside_its_own_box():
    found = [("red", (0.2, 0.3)), ("blue", (0.8, 0.7))]
    boxes = [("red", (0.0, 0.0, 0.5, 0.5)), ("blue", (0.5, 0.5, 1.0, 1.0))]
    assert in_boxes(found, boxes)
    assert not in_boxes(found, [("red", (0.5, 0.5, 1.0, 1.0))])  # red is drawn, but outside that box
    assert not in_boxes(found, [*boxes, ("green", (0.0, 0.5, 0.5, 1.0))])  # a subject not drawn at all
    assert not in_boxes([("blue", (0.2, 0.3))], [("red", (0.0, 0.0, 0.5, 0.5))])  # the wrong colour in the box
