"""The scenes model's data (diffattn_bench.scenes) and its training script (scripts/train_shapes_scenes.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from diffattn_bench.scenes import (
    HELD_OUT,
    IMAGE_SIZE,
    SCENE_VOCABULARY,
    caption,
    object_masks,
    parse_caption,
    render,
    render_without,
    sample_scene,
    visible_masks,
)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_shapes_scenes.py"


def test_render_is_deterministic_for_a_seed():
    for seed in range(5):
        a, b = sample_scene(seed), sample_scene(np.random.default_rng(seed))
        assert a == b
        image = render(a)
        assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(image, render(b))
    assert not np.array_equal(render(sample_scene(0)), render(sample_scene(1)))


def test_captions_name_exactly_what_they_say():
    rng = np.random.default_rng(0)
    seen_left_out = seen_named = 0
    for _ in range(300):
        scene = sample_scene(rng)
        text, named = caption(scene, rng)
        objects, background = parse_caption(text)
        assert len(objects) == len(scene.objects)
        assert (background is not None) == named.background
        if background is not None:
            assert (background.kind, background.colour) == (scene.background.kind, scene.background.colour)
        for obj, parsed, flags in zip(scene.objects, objects, named.objects):
            assert (parsed.colour, parsed.shape) == (obj.colour, obj.shape)
            for attribute in ("position", "size", "pattern"):
                value = getattr(parsed, attribute)
                if flags[attribute]:
                    assert value == getattr(obj, attribute), (text, attribute)
                    seen_named += 1
                else:
                    assert value is None, (text, attribute)
                    seen_left_out += 1
        words = text.replace(",", " , ").split()
        assert set(words) <= set(SCENE_VOCABULARY), text
    assert seen_named > 200 and seen_left_out > 200
    full, _ = caption(sample_scene(3), 0, {"position": 0, "size": 0, "pattern": 0, "background": 0})
    bare, named = caption(sample_scene(3), 0, {"position": 1, "size": 1, "pattern": 1, "background": 1})
    assert full.endswith(" background") and "background" not in bare
    assert not named.background and not any(any(f.values()) for f in named.objects)


def test_held_out_combinations_stay_out_of_the_train_split():
    rng = np.random.default_rng(1)
    train = {o.combination for _ in range(500) for o in sample_scene(rng, "train").objects}
    assert not train & HELD_OUT
    assert len(train) > 30  # the rest of the 54 combinations do appear
    held = [sample_scene(rng, "held_out") for _ in range(50)]
    assert all(any(o.combination in HELD_OUT for o in s.objects) for s in held)
    # every single word of a held-out combination is seen in training
    for colour, shape, pattern in HELD_OUT:
        assert any(c == colour for c, _, _ in train) and any(s == shape for _, s, _ in train)
        assert any(p == pattern for _, _, p in train)


def test_render_without_changes_only_the_removed_object():
    rng = np.random.default_rng(2)
    checked = 0
    while checked < 20:
        scene = sample_scene(rng)
        if len(scene.objects) < 2:
            continue
        full = render(scene)
        masks = object_masks(scene)
        for i in range(len(scene.objects)):
            changed = np.any(render_without(scene, i) != full, axis=-1)
            assert changed.any()
            assert not (changed & ~masks[i]).any()
        for visible, mask in zip(visible_masks(scene), masks):
            assert visible.sum() > 0 and not (visible & ~mask).any()
        checked += 1


def _script():
    spec = importlib.util.spec_from_file_location("train_shapes_scenes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_training_smoke_run_saves_a_pipeline_and_resumes(tmp_path):
    from diffusers import StableDiffusionPipeline

    script = _script()
    out = tmp_path / "model"
    common = ["--out", str(out), "--images", "32", "--batch", "4", "--vae-minutes", "0.05", "--threads", "2"]
    assert script.main([*common, "--minutes", "0.1", "--checkpoint-minutes", "0.05"]) == 0
    first = json.loads((out / "training.json").read_text())
    assert first["denoiser_steps"] >= 1 and first["vae_steps"] >= 1 and (out / "loss.png").is_file()
    assert (out / "checkpoint" / "state.pt").is_file()
    with pytest.raises(SystemExit):  # an existing checkpoint is never overwritten without --resume
        script.main([*common, "--minutes", "0.1"])
    assert script.main([*common, "--minutes", "0.2", "--checkpoint-minutes", "0.05", "--resume"]) == 0
    second = json.loads((out / "training.json").read_text())
    assert second["denoiser_steps"] > first["denoiser_steps"] and second["vae_steps"] == first["vae_steps"]
    assert len(second["commands"]) == 2
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    image = pipe(
        "a red striped circle", height=64, width=64, num_inference_steps=2, guidance_scale=2, output_type="np"
    ).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def _weights(folder: Path, part: str) -> dict:
    from safetensors.torch import load_file

    return load_file(next((folder / part).glob("*.safetensors")))


def test_init_from_starts_from_saved_weights_skips_the_vae_stage_and_refuses_other_models(tmp_path):
    import torch

    script = _script()
    tiny = ["--images", "6", "--batch", "2", "--channels", *["16"] * 4, "--threads", "1"]
    source = tmp_path / "source"
    assert script.main([*tiny, "--out", str(source), "--vae-minutes", "0.002", "--steps", "2"]) == 0
    before = json.loads((source / "training.json").read_text())
    assert before["vae_steps"] >= 1 and before["denoiser_steps"] == 2

    further = tmp_path / "further"
    start = [*tiny, "--out", str(further), "--init-from", str(source), "--seed", "1"]  # another seed: another init
    with pytest.raises(SystemExit, match="pass --vae-minutes 0"):  # the default 10 minutes would retrain the VAE
        script.main(start)
    assert script.main([*start, "--vae-minutes", "0", "--steps", "0"]) == 0  # step 0: the weights it started from
    info = json.loads((further / "training.json").read_text())
    assert info["vae_steps"] == 0 and info["vae_minutes"] == 0 and info["denoiser_steps"] == 0
    assert info["init_from"] == str(source) and info["init_from_training"]["denoiser_steps"] == 2
    assert info["scaling_factor"] == before["scaling_factor"]  # the given VAE's, not re-measured
    state = torch.load(further / "checkpoint" / "state.pt", weights_only=False)
    assert not [entry for entry in state["curve"] if entry[0] == "vae"]
    for part in ("unet", "text_encoder", "vae"):
        saved = _weights(source, part)  # float16 files
        trained = state[part]  # float32 training weights of the new run
        exported = _weights(further, part)  # its EMA export at step 0
        assert saved.keys() == exported.keys() and set(saved) <= set(trained)
        for key, value in saved.items():
            assert trained[key].dtype == torch.float32 and torch.equal(trained[key], value.float()), (part, key)
            assert torch.equal(exported[key], value), (part, key)

    # the checkpoint holds the weights: the same folder again is ignored on resume, another one refused
    resume = [*tiny, "--out", str(further), "--seed", "1", "--vae-minutes", "0", "--resume"]
    with pytest.raises(SystemExit, match="differs from the checkpoint"):
        script.main([*resume, "--init-from", str(tmp_path)])
    assert script.main([*resume, "--init-from", str(source), "--steps", "1"]) == 0
    resumed = json.loads((further / "training.json").read_text())
    assert resumed["denoiser_steps"] == 1 and resumed["vae_steps"] == 0 and len(resumed["commands"]) == 2
    assert resumed["init_from_training"] == info["init_from_training"]

    wider = [*tiny, "--channels", *["32"] * 4]  # the last --channels wins
    with pytest.raises(SystemExit, match="block_out_channels.*pass --channels 16 16 16 16"):
        script.main([*wider, "--out", str(tmp_path / "wider"), "--init-from", str(source), "--vae-minutes", "0"])
    first_model = SCRIPT.parents[1] / "pipelines" / "diffattn_bench" / "assets" / "shapes-image"
    with pytest.raises(SystemExit, match="tokenizer"):  # the 32 px model: another vocabulary
        script.main([*tiny, "--out", str(tmp_path / "other"), "--init-from", str(first_model), "--vae-minutes", "0"])
