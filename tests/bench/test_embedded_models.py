"""The shipped embedded models load offline with the standard diffusers classes and generate in seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffattn_bench import embedded


def test_image_model_loads_offline_with_stable_diffusion_pipeline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(embedded.IMAGE_MODEL_DIR, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    from diffattn_bench.scoring import evaluate_image

    prompt = "a red circle on the left"
    out = pipe(
        prompt,
        num_inference_steps=10,
        guidance_scale=4.0,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images  # < 8 steps leave this v-prediction model flat
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
    result = evaluate_image((out[0].clip(0, 1) * 255).round().astype(np.uint8), prompt)
    assert result.count_correct and result.objects[0].position_correct and result.objects[0].shape_correct, result


def test_video_model_loads_offline_and_generates():
    from diffattn_bench.shapes_video import ShapesVideoPipeline

    pipe = ShapesVideoPipeline.from_pretrained(embedded.VIDEO_MODEL_DIR, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(
        "a blue square on the left moving right", num_inference_steps=4, generator=torch.Generator().manual_seed(0)
    ).frames
    assert frames.shape == (1, 8, 32, 32, 3) and np.isfinite(frames).all()
    assert frames.std() > 0.05


def test_model_cards_and_sizes():
    total = 0
    for folder in (embedded.IMAGE_MODEL_DIR, embedded.VIDEO_MODEL_DIR):
        card = (folder / "README.md").read_text()
        assert "ShapesBench" in card and "training" in card.lower()
        json.loads((folder / "training.json").read_text())
        weights = list(folder.rglob("*.safetensors"))
        assert weights and not list(folder.rglob("*.bin"))
        total += sum(w.stat().st_size for w in weights)
    assert total < 50 * 2**20, f"shipped models must stay under 50 MB, are {total / 2**20:.1f} MB"


def test_video_coordinates_give_absolute_position_and_check_channels():
    """The transformer's rotary embeddings are relative; the coordinate channels tell frames and sides apart."""
    from diffattn_bench.shapes_video import COORDINATE_CHANNELS, with_coordinates

    transformer = embedded.video_transformer()
    x = torch.zeros(2, 3, 4, 8, 12)
    full = with_coordinates(x, transformer)
    assert full.shape == (2, 3 + COORDINATE_CHANNELS, 4, 8, 12) and torch.equal(full[:, :3], x)
    t, row, col = full[0, 3:]
    assert t[0].eq(-1).all() and t[-1].eq(1).all(), "frame channel runs -1 -> 1 over the clip"
    assert row[:, 0].eq(-1).all() and row[:, -1].eq(1).all() and col[..., 0].eq(-1).all() and col[..., -1].eq(1).all()
    assert torch.equal(full[0, 3:], full[1, 3:])
    with torch.no_grad():
        assert transformer(full, torch.tensor([500, 500]), torch.zeros(2, 5, 64), return_dict=False)[0].shape == x.shape
    with pytest.raises(ValueError, match="input channels"):
        with_coordinates(torch.zeros(1, 4, 2, 8, 8), transformer)
