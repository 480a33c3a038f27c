"""The demo's logic called directly (no server, no browser): input checks with their messages, and each tab's result
on the embedded image model (few steps), scored from pixels."""

from __future__ import annotations

import math
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffattn_demo.images import DIFFERENCE_STOPS, difference_colours, difference_map, enlarge, shrink, to_uint8
from diffattn_demo.inputs import (
    DemoInputError,
    check_number,
    check_seed,
    check_steps,
    fit_prompt,
    load_upload,
    mask_from_editor,
    parse_scales,
    parse_subjects,
    unknown_words,
    vocabulary_warning,
)
from diffattn_demo.models import CFG, Models
from diffattn_demo.tabs.edit import run_edit
from diffattn_demo.tabs.guidance import run_guidance
from diffattn_demo.tabs.layout import BOX_COLOURS, draw_boxes, run_layout
from diffattn_demo.tabs.speed import SPEED_MAX_STEPS, SPEED_SIZES, run_speed

STEPS = 8


@pytest.fixture(scope="module")
def models():
    return Models(embedded_image="shapes-image").load()


@pytest.fixture(scope="module")
def pipe(models):
    with models.image() as p:  # the pipeline itself; its lock is taken again by each tab's call
        return p


def _objects(image: np.ndarray) -> list[tuple[str, str, str]]:
    from diffattn_bench.scoring import segment

    return [(c.colour, c.shape, c.position) for c in segment(image).components]


# ----------------------------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [(0, 0), (7.0, 7), ("12", 12), (2**31 - 1, 2**31 - 1)])
def test_seed_accepts_whole_numbers(value, expected):
    assert check_seed(value) == expected


@pytest.mark.parametrize(
    "value, message",
    [
        (-1, "between 0 and"),
        (2**31, "between 0 and"),
        (1.5, "whole number"),
        ("x", "whole number"),
        (None, "whole number"),
        (True, "whole number"),
    ],
)
def test_seed_refuses_with_a_message(value, message):
    with pytest.raises(DemoInputError, match=message):
        check_seed(value)


@pytest.mark.parametrize("value", [0, 51, 1000, "many"])
def test_steps_are_bounded(value):
    with pytest.raises(DemoInputError, match="steps must be"):
        check_steps(value)
    assert check_steps(50) == 50 and check_steps(1.0) == 1


@pytest.mark.parametrize("steps", [0, -1, 51, 500, 2.5])
@pytest.mark.parametrize("tab", ["edit", "layout", "erase", "generate", "guidance", "speed"])
def test_every_tab_refuses_steps_outside_its_range_naming_the_range(tab, steps, tmp_path):
    """API calls reach the logic without the sliders' bounds: the steps are refused (never clamped) before any
    model is used, with the range this tab allows."""
    from diffattn_demo.tabs.erase import generate_image, run_erase

    calls = {
        "edit": lambda: run_edit(None, "a red circle", "", "MasaCtrl", 0, steps),
        "layout": lambda: run_layout(None, "a red circle", "circle: 0 0 1 1", 0, steps),
        "erase": lambda: run_erase(None, None, 0, steps),
        "generate": lambda: generate_image(None, "a red circle", 0, steps),
        "guidance": lambda: run_guidance(None, "a red circle", ["PAG"], "1", 0, steps),
        "speed": lambda: run_speed(None, ["sliding tile"], next(iter(SPEED_SIZES)), steps, tmp_path),
    }
    allowed = f"between 1 and {SPEED_MAX_STEPS}" if tab == "speed" else "between 1 and 50"
    message = "whole number" if steps == 2.5 else allowed
    with pytest.raises(DemoInputError, match=message):
        calls[tab]()


def test_long_prompt_is_cut_to_the_tokenizer_limit_with_a_note(pipe):
    limit = pipe.tokenizer.model_max_length
    long = " ".join(["a red circle on the left and"] * 10) + " a blue square"
    prompt, note = fit_prompt(pipe, long)
    assert len(pipe.tokenizer(long).input_ids) > limit
    assert len(pipe.tokenizer(prompt).input_ids) == limit
    assert long.startswith(prompt) and f"{limit} tokens" in note and prompt in note
    assert fit_prompt(pipe, "  a red   circle ") == ("a red circle", "")
    with pytest.raises(DemoInputError, match="enter a prompt"):
        fit_prompt(pipe, "   ")


def _save(folder: Path, name: str, array: np.ndarray, **kwargs) -> Path:
    path = folder / name
    Image.fromarray(array).save(path, **kwargs)
    return path


def test_upload_checks_format_size_and_place(tmp_path):
    scene = np.zeros((64, 64, 3), np.uint8)
    scene[8:24, 8:24] = (225, 30, 30)
    size = (32, 32)
    image, note = load_upload(_save(tmp_path, "s.png", scene), tmp_path, size)
    assert note == "" and image.shape == (32, 32, 3)
    assert np.array_equal(image, shrink(scene, 2))  # a 2x enlargement comes back exactly
    image, note = load_upload(_save(tmp_path, "s.jpg", np.zeros((40, 50, 3), np.uint8), quality=95), tmp_path, size)
    assert image.shape == (32, 32, 3) and "50 x 40 px was resized" in note.replace("(", "").replace(")", "")
    with pytest.raises(DemoInputError, match="PNG, JPEG or WebP.*GIF"):
        load_upload(_save(tmp_path, "s.gif", scene), tmp_path, size)
    with pytest.raises(DemoInputError, match="2049 x 8 px.*2048"):
        load_upload(_save(tmp_path, "wide.png", np.zeros((8, 2049, 3), np.uint8)), tmp_path, size)
    big = tmp_path / "big.png"
    noise = np.random.default_rng(0).integers(0, 256, (2048, 1400, 3), dtype=np.uint8)  # ~8.6 MB raw
    Image.fromarray(noise).save(big, compress_level=0)
    with open(big, "ab") as f:
        f.write(b"\0" * (2 * 2**20))  # past 10 MB
    with pytest.raises(DemoInputError, match="MB; upload one of at most 10 MB"):
        load_upload(big, tmp_path, size)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(DemoInputError, match="not a readable"):
        load_upload(tmp_path / "notes.png", tmp_path, size)
    elsewhere = _save(tmp_path.parent, "outside.png", scene)  # no path outside the upload folder is read
    with pytest.raises(DemoInputError, match="uploaded through the page"):
        load_upload(elsewhere, tmp_path, size)
    with pytest.raises(DemoInputError, match="uploaded through the page"):
        load_upload(tmp_path / ".." / elsewhere.name, tmp_path, size)


def test_a_text_file_named_png_gets_the_demos_message_not_gradios(models, tmp_path):
    """Gradio's image preprocessing opened uploads first and showed PIL's error with the server's path in it; the
    demo's upload fields hand the file to the tab's logic, which says what is wrong (no path)."""
    import gradio as gr
    from gradio.data_classes import FileData

    from diffattn_demo.tabs import edit

    with gr.Blocks():
        inputs, _ = edit._input_column(models)
    upload = next(i for i in inputs if i.elem_id == "edit-upload")
    assert upload.get_block_name() == "image"  # the page draws the same image field
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    value = upload.preprocess(FileData(path=str(notes), orig_name="notes.png"))
    with pytest.raises(DemoInputError, match="not a readable PNG, JPEG or WebP image") as refused:
        run_edit(models, "a red circle", "", "MasaCtrl", 0, 2, upload=value, upload_folder=tmp_path)
    assert str(tmp_path) not in str(refused.value) and "notes" not in str(refused.value)
    picture = _save(tmp_path, "picture.png", np.zeros((32, 32, 3), np.uint8))
    assert upload.preprocess(FileData(path=str(picture), orig_name="picture.png")) == str(picture)


def test_erase_canvas_refuses_a_file_that_is_not_an_image_with_the_demos_message(models, tmp_path):
    import gradio as gr
    from gradio.components.image_editor import EditorData
    from gradio.data_classes import FileData
    from gradio.exceptions import Error

    from diffattn_demo.tabs import erase

    with gr.Blocks():
        editor = erase._input_column(models)[2]
    assert editor.get_block_name() == "imageeditor"
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    payload = EditorData(background=FileData(path=str(notes), orig_name="notes.png"), layers=[], composite=None)
    with pytest.raises(Error, match="not a readable PNG, JPEG or WebP image") as refused:
        editor.preprocess(payload)
    assert str(tmp_path) not in str(refused.value)


def test_editor_mask_is_resized_or_refused_with_a_message():
    background = np.zeros((256, 256, 4), np.uint8)
    background[..., 3] = 255
    layer = np.zeros((128, 128, 4), np.uint8)  # half the canvas size: resized, with a note
    layer[10:20, 30:50, 3] = 255
    image, mask, note = mask_from_editor({"background": background, "layers": [layer]}, (32, 32))
    assert image.shape == (32, 32, 3) and mask.shape == (32, 32)
    expected = np.zeros((32, 32), bool)
    expected[2:5, 7:13] = True  # rows 20..39, columns 60..99 of 256 -> model pixels 2..4, 7..12
    assert np.array_equal(mask, expected), np.argwhere(mask)
    assert "128 x 128 px" in note and "256 x 256 px" in note
    one = np.zeros((256, 256, 4), np.uint8)
    one[100, 100, 3] = 255  # one painted screen pixel still masks its model pixel
    _, mask, _ = mask_from_editor({"background": background, "layers": [one]}, (32, 32))
    assert np.argwhere(mask).tolist() == [[12, 12]]
    with pytest.raises(DemoInputError, match="paint over the object"):
        mask_from_editor({"background": background, "layers": [np.zeros((256, 256, 4), np.uint8)]}, (32, 32))
    with pytest.raises(DemoInputError, match="upload or generate"):
        mask_from_editor({"background": None, "layers": []}, (32, 32))
    with pytest.raises(DemoInputError, match="RGBA"):
        mask_from_editor({"background": background, "layers": [np.zeros((256, 256), np.uint8)]}, (32, 32))


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "at least one subject"),
        ("circle 0 0 1 1", "word: x0 y0 x1 y1"),
        ("circle: 0 0 1", "word: x0 y0 x1 y1"),
        ("circle: 0 0 a 1", "four numbers"),
        ("circle: 0.5 0 0.2 1", "x0 < x1"),
        ("circle: 0 0 1.5 1", "x0 < x1"),
        ("\n".join(f"w{i}: 0 0 1 1" for i in range(5)), "at most 4"),
    ],
)
def test_subject_lines_are_checked(text, message):
    with pytest.raises(DemoInputError, match=message):
        parse_subjects(text)


def test_subjects_and_scales_parse():
    assert parse_subjects("circle: 0, 0, 0.5, 0.5\n\nsquare: 0.5 0.5 1 1") == [
        ("circle", (0.0, 0.0, 0.5, 0.5)),
        ("square", (0.5, 0.5, 1.0, 1.0)),
    ]
    assert parse_scales("3, 1.5 3") == [0.0, 1.5, 3.0]
    for bad in ("3, x", "-1", "25", "1 2 3 4 5 6"):
        with pytest.raises(DemoInputError):
            parse_scales(bad)


def test_enlarge_and_shrink():
    image = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    big = enlarge(image, 3)
    assert big.shape == (12, 15, 3) and np.array_equal(big[3:6, 6:9], np.broadcast_to(image[1, 2], (3, 3, 3)))
    assert np.array_equal(shrink(big, 3), image)


def test_difference_map_has_one_fixed_scale():
    """The same number of levels has the same colour in every map (never scaled to the image's own largest
    difference): a 16-level change stays dim beside a 200-level one and alone; identical pixels are black."""
    image = np.full((4, 4, 3), 100, np.uint8)
    small, both = image.copy(), image.copy()
    small[0, 0, 1] += 16  # 16 levels in one channel
    both[0, 0, 1] += 16
    both[3, 3] = (255, 0, 0)  # 155 and 100 levels: the largest channel counts
    alone, beside = difference_map(image, small), difference_map(image, both)
    assert alone[0, 0].tolist() == beside[0, 0].tolist() == list(DIFFERENCE_STOPS[1][1])
    assert beside[3, 3].tolist() == difference_colours(np.uint8(155)).tolist()
    assert not alone[1:].any() and not alone[0, 1:].any()
    assert not difference_map(image, image).any()
    scale = difference_colours(np.arange(256, dtype=np.uint8))
    assert scale[0].tolist() == [0, 0, 0] and scale[255].tolist() == [255, 255, 255]
    assert (scale[1:].max(-1) > 0).all()  # a change of one level is not black
    luminance = scale.astype(float) @ np.array([0.2126, 0.7152, 0.0722])
    assert (np.diff(luminance[::8]) > 0).all()  # brighter as the difference grows
    with pytest.raises(ValueError, match="one shape"):
        difference_map(image, image[:2])


def test_difference_legend_draws_the_maps_scale():
    from diffattn_demo.tabs.edit import difference_legend

    html = difference_legend()
    stops = re.findall(r"rgb\((\d+), (\d+), (\d+)\) ([\d.]+)%", html)
    assert [(tuple(map(int, s[:3])), float(s[3])) for s in stops] == [
        (colour, pytest.approx(100 * level / 255, abs=0.01)) for level, colour in DIFFERENCE_STOPS
    ]
    ticks = re.findall(r">(\d+)</span>", html)
    assert ticks == [str(level) for level, _ in DIFFERENCE_STOPS] and "levels of 255" in html


def test_unknown_words_are_named_and_the_models_words_listed():
    from diffattn_bench.grammar import VOCABULARY
    from diffattn_demo.models import IMAGE_MODELS, LOCAL_IMAGE_MODEL
    from diffattn_demo.tabs.common import words_text

    prompts = ["a red Cat on the left, and a dog", "  a blue   circle,", None, "a cat"]
    assert unknown_words(prompts, VOCABULARY) == ["cat", "dog"]
    assert unknown_words(["a red circle, and a blue square on the left"], VOCABULARY) == []
    assert unknown_words(prompts, None) == []  # a local model's tokenizer: no list to check against
    warning = vocabulary_warning(prompts, VOCABULARY)
    assert "'cat', 'dog'" in warning and warning.startswith("**Warning")
    assert vocabulary_warning(["a red circle"], VOCABULARY) == ""
    info = IMAGE_MODELS["shapes-image"]
    shown = words_text(info, ["a red cat"])
    assert shown.startswith(info.words()) and "'cat'" in shown
    assert words_text(info, ["a red circle"]) == info.words()
    assert words_text(LOCAL_IMAGE_MODEL, ["a red cat"]) == LOCAL_IMAGE_MODEL.words()


def test_the_vocabulary_is_what_the_tokenizer_reads(pipe):
    """The words the page lists are the embedded model's caption tokens, one token each; a word not listed is not
    one of them (the tokenizer cuts it into pieces: 'cat' is 'c' + 'at')."""
    from diffattn_demo.models import IMAGE_MODELS

    tokenizer = pipe.tokenizer
    known = set()
    for word in IMAGE_MODELS["shapes-image"].vocabulary:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, word
        known.add(ids[0])
    for word in ("cat", "of", "dog", "house"):
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) > 1 or ids[0] not in known, word


def test_a_prompt_with_unknown_words_runs_with_a_warning_naming_them(models):
    from diffattn_demo.tabs.erase import generate_image

    image, note = generate_image(models, "a red cat on the left", 0, 1)
    assert image.ndim == 3 and note.startswith("**Warning: the model does not know 'cat'**"), note
    _, note = generate_image(models, "a red circle on the left", 0, 1)
    assert "Warning" not in note


def test_number_checks_refuse_what_they_cannot_use():
    assert check_number("2.5", "w", 0, 5) == 2.5 and check_number(0, "w", 0, 5) == 0.0
    for bad, message in [(5.1, "between 0 and 5"), (-1, "between 0 and 5"), (math.nan, "between"), ("x", "number")]:
        with pytest.raises(DemoInputError, match=message):
            check_number(bad, "the re-weight factor", 0, 5)
    with pytest.raises(DemoInputError, match="re-weight factor must be between 0 and 5, got 9"):
        run_edit(None, "a red circle", "", "prompt-to-prompt", 0, 8, reweight=9)


def test_every_numeric_field_hands_its_value_to_the_logic_unclamped(models, tmp_path):
    """Gradio's own preprocessing refuses a number outside a field's bounds with its message and rounds a seed of 1.5
    to 2; every number and slider of the page hands the value as sent, so the tab's logic answers in the demo's
    words (the tests above: steps, seeds, the re-weight factor)."""
    import gradio as gr

    from diffattn_demo.app import build_app

    app = build_app(models, tmp_path)
    assert not [b.elem_id for b in app.blocks.values() if isinstance(b, gr.Slider)]  # they clamp typed values unsaid
    fields = [b for b in app.blocks.values() if isinstance(b, gr.Number)]
    ids = sorted(f.elem_id for f in fields)
    assert ids == sorted(
        ["edit-seed", "edit-steps", "edit-weight", "layout-seed", "layout-steps", "erase-seed", "erase-steps"]
        + ["guidance-seed", "guidance-steps", "speed-steps"]
        + ["edit-cfg", "edit-cross", "edit-self", "edit-start-step", "layout-cfg"]
        + ["erase-strength", "erase-guidance", "erase-ss-scale", "erase-dilation"]
        + ["guidance-cfg", "guidance-start", "guidance-end"]
    )
    for field in fields:
        for value in (10**9, -5, 1.5):
            assert field.preprocess(value) == value, (field.elem_id, value)
    with pytest.raises(DemoInputError, match="seed must be a whole number, got 1.5"):
        check_seed(next(f for f in fields if f.elem_id == "edit-seed").preprocess(1.5))


# ----------------------------------------------------------------------------------------------------------------
# the tabs on the embedded image model
# ----------------------------------------------------------------------------------------------------------------
def test_edit_prompt_to_prompt_recolours_and_swap_fills_the_target(models):
    out = run_edit(
        models, "a red circle on the left", "", "prompt-to-prompt", 0, STEPS, swap_word="red", swap_to="blue"
    )
    factor = out.source.shape[0] // 32
    source, target = shrink(out.source, factor), shrink(out.target, factor)
    assert _objects(source) == [("red", "circle", "left")]
    assert _objects(target) == [("blue", "circle", "left")]
    assert '"a red circle on the left" -> "a blue circle on the left"' in out.note
    diff = shrink(out.difference, factor)
    changed = np.abs(source.astype(int) - target.astype(int)).max(-1)
    assert np.array_equal(diff, difference_colours(changed.astype(np.uint8)))  # the fixed scale, not the peak's
    assert np.array_equal(diff.max(-1) == 0, changed == 0)
    assert f"largest difference to the source {changed.max()} levels of 255" in out.note


def test_edit_refuses_what_it_cannot_do(models):
    with pytest.raises(DemoInputError, match="equal token count"):
        run_edit(models, "a red circle on the left", "a big red circle on the left", "prompt-to-prompt", 0, 2)
    with pytest.raises(DemoInputError, match="'green' to swap is not in"):
        run_edit(models, "a red circle", "", "prompt-to-prompt", 0, 2, swap_word="green", swap_to="blue")
    with pytest.raises(DemoInputError, match="'square' to re-weight"):
        run_edit(
            models, "a red circle", "a blue circle", "prompt-to-prompt", 0, 2, reweight_word="square", reweight=2.0
        )
    with pytest.raises(DemoInputError, match="method must be one of"):
        run_edit(models, "a red circle", "a blue circle", "sdedit", 0, 2)


def test_edit_of_an_uploaded_image_inverts_it(models, tmp_path):
    from diffattn_bench.grammar import Scene, ShapeSpec
    from diffattn_bench.render import render_scene
    from diffattn_bench.scoring import psnr

    scene, _ = render_scene(Scene((ShapeSpec("square", "green", "left"),)), 32, rng=0, jitter=False)
    path = _save(tmp_path, "scene.png", enlarge(scene, 4))  # shown-size upload: shrinks back exactly
    out = run_edit(
        models,
        "a green square on the left",
        "a green square on the right",
        "MasaCtrl",
        0,
        20,
        upload=path,
        upload_folder=tmp_path,
    )
    factor = out.source.shape[0] // 32
    assert psnr(shrink(out.source, factor), scene) > 25  # the inverted source regenerates the upload
    assert "from the inverted upload" in out.note
    assert "dB PSNR (in domain: >=" in out.note and "Warning" not in out.note  # the model knows the scene


def test_an_upload_unlike_the_training_images_gets_a_warning_with_its_psnr(models, tmp_path):
    """A photo-like upload (a smooth colour field with grain, nothing of the shapes world) comes back changed: the
    note warns first, with the reconstruction PSNR, and the edit still runs."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:32, 0:32] / 32
    field = np.stack([np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y)) for _ in range(3)], -1)
    photo = np.clip(128 + 80 * field + rng.normal(0, 8, field.shape), 0, 255).astype(np.uint8)
    out = run_edit(
        models,
        "a red circle on the left",
        "a blue circle on the left",
        "prompt-to-prompt",
        0,
        20,
        upload=_save(tmp_path, "photo.png", photo),
        upload_folder=tmp_path,
    )
    assert out.note.startswith("**Warning: this image looks unlike the model's training images"), out.note
    found = re.search(r"at (\d+\.\d) dB PSNR \(images the model knows: >= ([\d.]+) dB\)", out.note)
    assert found is not None and float(found.group(1)) < float(found.group(2)), out.note


def test_inversion_threshold_is_known_for_the_embedded_model_only():
    from diffattn_bench.embedded import IMAGE_INVERSION_PSNR

    assert Models(embedded_image="shapes-image").inversion_threshold() == IMAGE_INVERSION_PSNR
    assert Models().inversion_threshold() is None  # the default, shapes-scenes: in and out of domain overlap
    assert Models(image_path=Path("elsewhere")).inversion_threshold() is None  # not loaded: no model is read


def test_guidance_sweep_shares_the_unguided_column(models, pipe):
    out = run_guidance(models, "a red circle on the left", ["PAG", "SEG"], "3", 0, STEPS, "up_blocks.2")
    plain = out.cells[("PAG", 0.0)]
    with models.image():
        direct = pipe(
            "a red circle on the left",
            num_inference_steps=STEPS,
            guidance_scale=CFG,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images[0]
    assert np.array_equal(plain, to_uint8(direct))  # scale 0 is the plain pipeline, same seed
    assert np.array_equal(out.cells[("SEG", 0.0)], plain)
    for name in ("PAG", "SEG"):
        assert np.abs(out.cells[(name, 3.0)].astype(int) - plain.astype(int)).max() > 0, name
    cell = out.grid.shape[0] // 2 - 2
    assert out.grid.shape == (2 * cell + 4, 2 * cell + 4, 3)
    assert np.array_equal(shrink(out.grid[:cell, :cell], cell // 32), plain)
    assert "| PAG | 0 / 0.0 |" in out.table
    with pytest.raises(DemoInputError, match="layers must be one of"):
        run_guidance(models, "a red circle", ["PAG"], "3", 0, 2, "up_blocks.99")
    with pytest.raises(DemoInputError, match="at least one guidance method"):
        run_guidance(models, "a red circle", [], "3", 0, 2)


def test_the_declared_structures_are_the_embedded_models_own(models):
    """The page of an embedded model is built from its declared structure while the model loads: each declaration is
    what the shipped model has (its size, MasaCtrl's layer count, the blocks the Guidance tab lists)."""
    from diffattn_bench import embedded
    from diffattn_demo.models import IMAGE_MODELS, structure_of

    with models.image() as pipe:
        assert structure_of(pipe) == IMAGE_MODELS["shapes-image"].structure
    scenes = structure_of(embedded.load_scenes_pipeline())
    assert scenes == IMAGE_MODELS["shapes-scenes"].structure and scenes.size == (64, 64)
    assert scenes.self_attention_layers == 10 and "up_blocks.2" in scenes.guidance_blocks


def test_a_model_loading_in_the_background_holds_calls_until_it_is_in_and_is_checked(monkeypatch, caplog):
    """``load_after(event)``: the page's facts come from the declaration at once, a call waits for the model,
    and a model that is not what its declaration says is refused with a message (logged by the loading thread,
    raised to the call) instead of serving a page built for another model."""
    import dataclasses

    from diffattn_demo.models import IMAGE_MODELS

    info = IMAGE_MODELS["shapes-image"]
    served = threading.Event()
    loading = Models(embedded_image="shapes-image").load_after(served)
    assert loading.structure() == info.structure  # without waiting for the model
    assert loading._image_lock.locked() and loading._image is None  # a call waits; nothing loads before `served`
    told, got = [], []

    def call() -> None:
        with loading.image(lambda fraction, text: told.append(text)) as pipe:
            got.append(pipe)

    caller = threading.Thread(target=call)
    caller.start()
    served.set()
    caller.join(120)
    assert told == ["waiting for the image model to load (once, after start-up)"]
    assert got[0].unet is not None and loading._structure == info.structure
    wrong = dataclasses.replace(info, structure=dataclasses.replace(info.structure, self_attention_layers=3))
    monkeypatch.setitem(IMAGE_MODELS, "shapes-image", wrong)
    refused = Models(embedded_image="shapes-image").load_after(served)
    with pytest.raises(ValueError, match="does not have the structure the demo declares for shapes-image"):
        with refused.image():
            pass
    assert "loading the image model embedded shapes-image failed" in caplog.text
    with pytest.raises(ValueError, match="declares no structure: the page is built from the loaded model"):
        Models(image_path=Path("/nowhere")).load_after(served)


def test_image_size_is_read_off_the_pipeline_never_guessed():
    from types import SimpleNamespace

    from diffattn_demo.models import image_size

    flux_like = SimpleNamespace(vae_scale_factor=8, default_sample_size=(64, 96))
    assert image_size(flux_like) == (512, 768)
    with pytest.raises(ValueError, match="has no vae_scale_factor"):
        image_size(SimpleNamespace(default_sample_size=64))
    with pytest.raises(ValueError, match="has no unet.config.sample_size or default_sample_size"):
        image_size(SimpleNamespace(vae_scale_factor=8))


def test_image_models_say_their_words_and_hold_guidance_defaults_that_fit_them():
    from diffattn_bench.grammar import VOCABULARY
    from diffattn_bench.scenes import SCENE_VOCABULARY, parse_caption
    from diffattn_demo.models import DEFAULT_IMAGE_MODEL, IMAGE_MODELS, LOCAL_IMAGE_MODEL, GuidanceDefaults

    assert Models().image_info is IMAGE_MODELS[DEFAULT_IMAGE_MODEL] and DEFAULT_IMAGE_MODEL == "shapes-scenes"
    scenes = Models(embedded_image="shapes-scenes")
    assert scenes.image_info.vocabulary == SCENE_VOCABULARY and scenes.image_label == "embedded shapes-scenes"
    assert Models(image_path=Path("/x")).image_info is LOCAL_IMAGE_MODEL
    assert Models(Path("/x"), None, "shapes-scenes").image_label == "shapes-scenes from /x"
    assert IMAGE_MODELS["shapes-image"].vocabulary == VOCABULARY
    for info in IMAGE_MODELS.values():
        for prompt in info.prompts.all():
            assert set(prompt.split()) <= set(info.vocabulary), (info.name, prompt)
        subjects = [line.split(":")[0] for line in info.prompts.layout_subjects.splitlines()]
        assert set(subjects) <= set(info.prompts.layout.split()), (info.name, subjects)
        words = info.words()
        assert info.name in words and all(w in words for w in info.vocabulary)
    for prompt in IMAGE_MODELS["shapes-scenes"].prompts.all():
        parse_caption(prompt)  # captions the scenes scorer reads
    assert "any prompt" in LOCAL_IMAGE_MODEL.words()
    assert GuidanceDefaults("mid_block", 3.0, (1.5, 3.0)).scales_text == "0, 1.5, 3"
    with pytest.raises(ValueError, match="unknown embedded image model"):
        Models(embedded_image="shapes-nope")
    with pytest.raises(ValueError, match="hold the default scale"):
        GuidanceDefaults("mid_block", 2.0, (1.5, 3.0))
    with pytest.raises(ValueError, match="methods must be"):
        GuidanceDefaults("mid_block", 3.0, (3.0,), methods=("CFG",))


def test_demo_settings_refuse_an_unknown_embedded_image_model():
    from diffattn_demo.app import DemoSettings, build_parser

    with pytest.raises(ValueError, match="--embedded-image must be one of shapes-scenes, shapes-image"):
        DemoSettings(embedded_image="shapes-nope")
    assert build_parser().parse_args(["--embedded-image", "shapes-scenes"]).embedded_image == "shapes-scenes"


def test_layout_reports_a_word_missing_from_the_prompt(models):
    with pytest.raises(DemoInputError, match="'triangle' is not in the prompt"):
        run_layout(models, "a red circle and a blue square", "triangle: 0 0 0.5 0.5", 0, 2)


def test_box_preview_draws_each_box_in_its_colour():
    canvas = draw_boxes([("circle", (0.0, 0.0, 0.5, 0.5)), ("square", (0.5, 0.5, 1.0, 1.0))], 101)
    first, second = (list(c) for c in BOX_COLOURS[:2])
    assert canvas[0, 25].tolist() == first and canvas[25, 50].tolist() == first  # top and right edges
    assert canvas[100, 75].tolist() == second and canvas[75, 100].tolist() == second  # bottom and right edges
    assert canvas[25, 25].tolist() == [24, 24, 24] and canvas[75, 25].tolist() == [24, 24, 24]


def _row(method: str, speedup: float, error: float, density: float = 0.25):
    from diffattn_bench.compare import CompareRow

    scores = {
        "mean_trajectory_error": error,
        "positions_correct": 1.0,
        "clips_with_objects_found": 1.0,
        "shape_frames": 0.9,
        "shape_frames_vs_dense": 0.0,
    }
    return CompareRow(
        method,
        "diffattn",
        "8x32x64",
        1024,
        1.0 / speedup,
        f"{method} settings(window=(2, 1, 4))",
        attention_seconds=0.5,
        density=density,
        speedup=speedup,
        attention_speedup=1.5,
        psnr=30.0,
        scores=scores,
    )


def _speed_rows(error_of_tile: float, tile_density: float = 0.25) -> list:
    return [
        _row("dense (stock)", 1.0, 0.02, math.nan),
        _row("dense", 0.9, 0.02, 1.0),
        _row("sliding tile", 2.0, error_of_tile, tile_density),
    ]


def test_speed_table_explains_every_row_and_its_verdict():
    from diffattn_demo.tabs.speed import speed_table

    lines = speed_table("a title", _speed_rows(0.109, tile_density=1.0), (8, 8, 16))
    text = "\n".join(lines)
    rows = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["dense (stock)", "dense", "sliding tile"]
    assert [r.split("|")[-2].strip() for r in rows] == ["passes", "passes", "fails"]
    assert rows[2].split("|")[2].strip() == "1.000 (dense here)"  # the measured density, not a placeholder
    notes = {line.split("**")[1]: line for line in lines if line.startswith("- **")}
    assert set(notes) == {"dense (stock)", "dense", "sliding tile"}
    assert "diffusers' own attention processor" in notes["dense (stock)"]
    assert "same timing hook" in notes["dense"]
    assert "window=(2, 1, 4)" in notes["sliding tile"] and "Dense at this size" in notes["sliding tile"]
    assert "8 x 8 x 16 tokens" in notes["sliding tile"] and "trajectory error 0.109 (bar: < 0.04)" in text
    assert "misses it too" not in text  # stock dense passes here
    sparse = "\n".join(speed_table("a title", _speed_rows(0.02), (16, 16, 16)))
    assert "Dense at this size" not in sparse and "| 0.250 |" in sparse
    failing_dense = _speed_rows(0.2)
    failing_dense[0].scores["mean_trajectory_error"] = 0.1
    assert "stock dense attention misses it too" in "\n".join(speed_table("t", failing_dense, (8, 8, 16)))


def _count(image: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int((image == np.array(colour, np.uint8)).all(-1).sum())


def test_speed_plot_colours_mean_the_verdicts_and_fit_the_page():
    from diffattn_demo.tabs.speed import FAIL_COLOUR, PASS_COLOUR, PLOT_WIDTH, speed_plot

    mixed = speed_plot(_speed_rows(0.109))  # stock 1x and dense 0.9x pass, sliding tile 2x fails
    assert mixed.shape[1] == PLOT_WIDTH and mixed.dtype == np.uint8
    green, red = _count(mixed, PASS_COLOUR), _count(mixed, FAIL_COLOUR)
    assert 0.8 < green / red / ((1.0 + 0.9) / 2.0) < 1.25, (green, red)  # bar areas: speedups of each verdict
    assert _count(speed_plot(_speed_rows(0.02)), FAIL_COLOUR) == 0  # all pass: nothing red
    all_fail = _speed_rows(0.2)
    for r in all_fail:
        r.scores["mean_trajectory_error"] = 0.2
    assert _count(speed_plot(all_fail), PASS_COLOUR) == 0  # all fail: nothing green


def test_frame_sheet_labels_every_row():
    from diffattn_demo.tabs.speed import frame_sheet

    rng = np.random.default_rng(0)
    videos = {name: rng.uniform(0, 1, (8, 32, 64, 3)) for name in ("dense (stock)", "dense", "sliding tile")}
    sheet = frame_sheet(_speed_rows(0.02), videos, 2)
    width = 3 * 64 * 2
    label = sheet.shape[1] - width
    assert sheet.shape[0] == 22 + 3 * (64 + 4) - 4 and label > 60
    for i, name in enumerate(videos):
        top = 22 + i * 68
        clip = to_uint8(videos[name])
        frames = enlarge(np.concatenate([clip[0], clip[4], clip[-1]], axis=1), 2)
        assert np.array_equal(sheet[top : top + 64, label:], frames), name
        assert (sheet[top : top + 64, :label] < 128).any(), name  # its label is written beside it
    assert (sheet[:22] < 128).any()  # the frames are named above
    with pytest.raises(ValueError, match="at least one row"):
        frame_sheet(_speed_rows(0.02), {}, 2)


def test_speed_tab_measures_the_chosen_methods_against_dense(models, tmp_path):
    from diffattn_demo.tabs.speed import FAIL_COLOUR, PASS_COLOUR, PLOT_WIDTH, verdict

    size = min(SPEED_SIZES, key=lambda k: np.prod(SPEED_SIZES[k]))
    out = run_speed(models, ["sliding tile"], size, 1, tmp_path)
    labels = [r.method for r in out.rows]
    assert labels == ["dense (stock)", "dense", "sliding tile"]
    tile = out.rows[-1]
    assert tile.speedup > 0 and "mean_trajectory_error" in tile.scores
    # the measured density is the pattern's at this grid: 8 x 32 x 64 px is 8 x 8 x 16 tokens (4 x 4 patches), tiles
    # of 4 x 8 x 8 make 2 x 1 x 2 tiles, and the window (2, 1, 4) tiles covers them all: dense at this size
    assert tile.density == pytest.approx(1.0) and "Dense at this size" in out.table
    assert "| sliding tile | 1.000 (dense here) |" in out.table and "8 x 8 x 16 = 1024 tokens" in out.table
    verdicts = [verdict(r) for r in out.rows]
    assert (_count(out.plot, PASS_COLOUR) > 0) == ("passes" in verdicts) and out.plot.shape[1] == PLOT_WIDTH
    assert (_count(out.plot, FAIL_COLOUR) > 0) == any(v != "passes" for v in verdicts)
    assert out.frames.shape[0] == 22 + 3 * (32 * 2 + 4) - 4  # a row per clip: both dense ones and sliding tile
    assert (tmp_path / "speed.md").read_text().strip() == out.table and (tmp_path / "speed.png").is_file()
    with pytest.raises(DemoInputError, match="pick sparse methods"):
        run_speed(models, ["no such method"], size, 1, tmp_path)
    with pytest.raises(DemoInputError, match=f"at most {SPEED_MAX_STEPS} steps"):
        run_speed(models, ["sliding tile"], size, SPEED_MAX_STEPS + 1, tmp_path)
    # the default size of the tab is the one diffattn compare scores quality at
    from diffattn_bench.compare import QUALITY_SIZE

    assert SPEED_SIZES[list(SPEED_SIZES)[1]] == (
        QUALITY_SIZE.frames,
        QUALITY_SIZE.height,
        QUALITY_SIZE.width,
    )


# ----------------------------------------------------------------------------------------------------------------
# the authors' controls, the plain output beside each edit, drawn boxes, examples
# ----------------------------------------------------------------------------------------------------------------
def test_edit_shows_the_target_without_the_edit_from_the_same_noise(models, pipe):
    from diffattn.editing import edit

    out = run_edit(models, "a red circle on the left", "a blue circle on the left", "prompt-to-prompt", 0, STEPS)
    with models.image():
        plain = edit(
            pipe,
            "a red circle on the left",
            "a blue circle on the left",
            None,
            seed=0,
            num_inference_steps=STEPS,
            guidance_scale=CFG,
        )
    factor = out.source.shape[0] // 32
    assert np.array_equal(shrink(out.plain, factor), to_uint8(plain.target))
    assert not np.array_equal(shrink(out.plain, factor), shrink(out.target, factor))  # the edit changed something
    assert "without the edit:" in out.note


def test_edit_controls_reach_the_method_and_are_checked(models):
    from diffattn_demo.tabs.edit import EditControls

    base = run_edit(models, "a red circle on the left", "a blue circle on the left", "prompt-to-prompt", 0, STEPS)
    late = run_edit(
        models,
        "a red circle on the left",
        "a blue circle on the left",
        "prompt-to-prompt",
        0,
        STEPS,
        controls=EditControls(cross_replace=0.0, self_replace=0.0),
    )
    assert not np.array_equal(base.target, late.target)  # no replaced step: a different edit
    assert np.array_equal(late.target, late.plain)  # replacing nothing is the plain target exactly
    assert "cross-attention from the source for 0 of the steps" in late.note
    refine = run_edit(
        models,
        "a red circle on the left",
        "a small red circle on the left",
        "prompt-to-prompt",
        0,
        STEPS,
        controls=EditControls(mode="refine"),
    )
    assert "refine" in refine.note
    masa = run_edit(
        models,
        "a red circle on the left",
        "a red circle on the right",
        "MasaCtrl",
        0,
        STEPS,
        controls=EditControls(start_step=2, start_layer=3, cfg=2),
    )
    assert "from step 2, layers 3 on" in masa.note and "CFG 2" in masa.note
    for controls, message in [
        (EditControls(cfg=0.5), "the CFG scale must be between 1 and 15"),
        (EditControls(cross_replace=1.5), "cross-attention replace fraction must be between 0 and 1"),
        (EditControls(mode="swap"), "mode must be one of replace, refine"),
        (EditControls(blend_words="triangle"), "triangle"),
    ]:
        with pytest.raises(DemoInputError, match=message):
            run_edit(models, "a red circle", "a blue circle", "prompt-to-prompt", 0, 2, controls=controls)
    with pytest.raises(DemoInputError, match="MasaCtrl's start layer must be between 0 and"):
        run_edit(models, "a red circle", "a blue circle", "MasaCtrl", 0, 2, controls=EditControls(start_layer=99))
    with pytest.raises(DemoInputError, match="MasaCtrl's start step must be between 0 and 1"):
        run_edit(models, "a red circle", "a blue circle", "MasaCtrl", 0, 2, controls=EditControls(start_step=5))


def test_local_blend_keeps_the_source_outside_the_blended_words(models):
    from diffattn_demo.tabs.edit import EditControls

    prompts = (
        "a red circle on the left and a blue square on the right",
        "a green circle on the left and a blue square on the right",
    )
    out = run_edit(models, *prompts, "prompt-to-prompt", 0, STEPS, controls=EditControls(blend_words="circle"))
    factor = out.source.shape[0] // 32
    source, target = shrink(out.source, factor).astype(int), shrink(out.target, factor).astype(int)
    right = np.abs(source[:, 20:] - target[:, 20:]).max()
    left = np.abs(source[:, :12] - target[:, :12]).max()
    assert left > 60 and right < left / 2, (left, right)  # the circle changed, the square's half much less
    assert "only the region of circle may change" in out.note


def test_erase_shows_the_regeneration_without_suppression_and_takes_the_controls(models, pipe):
    from diffattn_demo.tabs.erase import EraseControls, generate_image, run_erase

    image, _ = generate_image(models, "a red circle on the left and a blue square on the right", 0, STEPS)
    small = shrink(image, image.shape[0] // 32)
    mask = np.zeros((256, 256, 4), np.uint8)
    mask[96:160, 16:112, 3] = 255
    editor = {"background": image, "layers": [mask], "composite": image}
    out = run_erase(models, editor, 0, STEPS)
    wide = run_erase(models, editor, 0, STEPS, controls=EraseControls(dilation=2, strength=0.6, ss_scale=0.5))
    factor = out.source.shape[0] // 32
    assert np.array_equal(shrink(out.source, factor), small)
    assert not np.array_equal(out.erased, out.plain)  # the suppression changes the result
    masked = lambda o: int(re.search(r"(\d+) of 1024 pixels masked", o.note).group(1))  # noqa: E731
    assert masked(wide) > masked(out) and "dilated by 2 px" in wide.note and "strength 0.6" in wide.note
    with pytest.raises(DemoInputError, match="the mask dilation must be between 0 and 16"):
        run_erase(models, editor, 0, 2, controls=EraseControls(dilation=40))
    with pytest.raises(DemoInputError, match="the strength must be between 0.05 and 1"):
        run_erase(models, editor, 0, 2, controls=EraseControls(strength=0))


def test_erase_canvas_refuses_an_oversize_image_as_it_arrives():
    from diffattn_demo.inputs import check_canvas_image

    with pytest.raises(DemoInputError, match="the image is 4000 x 3000 px; use one of at most 2048 px"):
        check_canvas_image(np.zeros((3000, 4000, 3), np.uint8))
    assert check_canvas_image(np.zeros((64, 64, 4), np.uint8)).shape == (64, 64, 4)


def test_guidance_start_and_end_steps_and_cfg(models):
    from diffattn_demo.tabs.guidance import GuidanceControls

    full = run_guidance(models, "a red circle on the left", ["PAG"], "3", 0, STEPS, "up_blocks.2")
    late = run_guidance(
        models,
        "a red circle on the left",
        ["PAG"],
        "3",
        0,
        STEPS,
        "up_blocks.2",
        controls=GuidanceControls(start=STEPS - 2),
    )
    plain = full.cells[("PAG", 0.0)]
    assert np.array_equal(late.cells[("PAG", 0.0)], plain)
    assert not np.array_equal(late.cells[("PAG", 3.0)], full.cells[("PAG", 3.0)])  # guided on 2 steps only
    assert not np.array_equal(late.cells[("PAG", 3.0)], plain)
    assert f"steps {STEPS - 2} to {STEPS - 1} of {STEPS}" in late.table
    one = run_guidance(
        models, "a red circle on the left", ["PAG"], "3", 0, STEPS, "up_blocks.2", controls=GuidanceControls(cfg=1)
    )
    assert "CFG 1" in one.table and not np.array_equal(one.cells[("PAG", 0.0)], plain)
    with pytest.raises(DemoInputError, match="the end step must be between 3 and 8"):
        run_guidance(models, "a red circle", ["PAG"], "3", 0, STEPS, controls=GuidanceControls(start=2, end=2))


def test_guidance_progress_counts_images():
    from diffattn_demo.tabs.guidance import run_guidance as sweep

    said: list[str] = []
    sweep(
        Models(embedded_image="shapes-image").load(),
        "a red circle",
        ["PAG", "SEG"],
        "1.5, 3",
        0,
        2,
        progress=lambda f, text: said.append(text),
    )
    assert said[0] == "image 1 of 5: no guidance" and said[-1] == "image 5 of 5: SEG scale 3"


def test_boxes_drawn_on_the_sketch_become_the_subject_lines():
    from diffattn_demo.tabs.layout import boxes_from_sketch

    layer = np.zeros((200, 100, 4), np.uint8)
    layer[20:60, 10:50] = (*BOX_COLOURS[1], 255)  # the second line's colour
    layer[100:180, 60:90] = (*BOX_COLOURS[0], 255)
    text = boxes_from_sketch({"background": None, "layers": [layer]}, "circle: 0 0 1 1\nsquare: 0 0 1 1")
    assert text == "circle: 0.60 0.50 0.90 0.90\nsquare: 0.10 0.10 0.50 0.30"
    with pytest.raises(DemoInputError, match="draw a box with the brush first"):
        boxes_from_sketch({"layers": []}, "circle: 0 0 1 1")
    layer[0:5, 0:5] = (*BOX_COLOURS[2], 255)
    with pytest.raises(DemoInputError, match="colour of subject 3, but there are 2 subject lines"):
        boxes_from_sketch({"layers": [layer]}, "circle: 0 0 1 1\nsquare: 0 0 1 1")


def test_layout_outlines_the_boxes_on_both_results(models):
    out = run_layout(models, "a red circle and a blue square", "circle: 0 0 0.5 0.5\nsquare: 0.5 0.5 1 1", 0, 4)
    side = out.plain.shape[0]
    for image in (out.plain, out.bounded):
        assert image[0, side // 4].tolist() == list(BOX_COLOURS[0])
        assert image[side - 1, 3 * side // 4].tolist() == list(BOX_COLOURS[1])


def test_every_example_of_every_model_is_in_its_vocabulary_and_runs_its_checks():
    from diffattn_demo.models import IMAGE_MODELS
    from diffattn_demo.tabs.edit import EDIT_METHODS, P2P_MODES

    for info in IMAGE_MODELS.values():
        prompts = info.prompts
        assert prompts.edit_examples and prompts.layout_examples and prompts.erase_examples
        assert prompts.guidance_examples
        assert not unknown_words(prompts.all(), info.vocabulary), info.name
        for example in prompts.edit_examples:
            assert example.method in EDIT_METHODS and example.mode in P2P_MODES
            if example.method == "prompt-to-prompt" and example.mode == "replace":
                assert len(example.source.split()) == len(example.target.split()), example
        for prompt, subjects in prompts.layout_examples:
            assert {w for w, _ in parse_subjects(subjects)} <= set(prompt.split()), (info.name, prompt)
