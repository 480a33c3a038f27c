"""scripts/train_shapes_video.py: the object-weighted loss, and a tiny run that checkpoints, refuses to overwrite its
checkpoint, resumes with its settings, and starts another run from the saved weights (--init-from)."""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_shapes_video.py"


@functools.cache
def _script():
    spec = importlib.util.spec_from_file_location("train_shapes_video", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_object_weight_counts_object_pixels_and_their_rim_more():
    script = _script()
    masks = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    masks[0, 0, 3:5, 3:5] = True  # a 2 x 2 object; grown by one pixel: 4 x 4
    target = torch.zeros(1, 3, 1, 8, 8)
    on_rim, far = target.clone(), target.clone()
    on_rim[0, :, 0, 2, 2] = 1.0  # the object's grown rim
    far[0, :, 0, 7, 7] = 1.0  # the background
    assert script.weighted_mse(on_rim, target, masks, 0.0) == script.weighted_mse(far, target, masks, 0.0)
    weighted_rim, weighted_far = (script.weighted_mse(x, target, masks, 4.0) for x in (on_rim, far))
    assert weighted_rim == pytest.approx(5 * weighted_far)
    # normalised by the mean weight: a uniform error keeps MSE's value
    assert script.weighted_mse(target + 0.5, target, masks, 4.0) == pytest.approx(0.25)


def test_render_set_masks_are_the_objects():
    script = _script()
    videos, masks, captions = script.render_set(2, 0, script.ClipSize.parse("3x32x32"))
    assert videos.shape == (2, 3, 3, 32, 32) and masks.shape == (2, 3, 32, 32) and len(captions) == 2
    bright = videos.float().amax(dim=1) > 100  # objects are saturated palette colours on a dark background
    assert (bright == masks).float().mean() > 0.97 and masks.any()


@pytest.mark.slow
def test_training_checkpoints_resumes_and_starts_from_saved_weights(tmp_path):
    from diffattn_bench.shapes_video import ShapesVideoPipeline

    script = _script()
    out = tmp_path / "model"
    common = [
        "--out", str(out), "--curve", str(tmp_path / "loss.png"), "--sizes", "2x32x32:1", "4x32x32:1",
        "--clips", "16", "--batch-tokens", "256", "--threads", "1", "--object-weight", "2",
    ]  # fmt: skip
    assert script.main([*common, "--steps", "3", "--checkpoint-minutes", "0"]) == 0
    first = json.loads((out / "training.json").read_text())
    assert first["steps"] == 3 and first["checkpoints"] >= 3 and (out / "checkpoint" / "state.pt").is_file()
    with pytest.raises(SystemExit, match="--resume"):  # an existing checkpoint is never overwritten
        script.main([*common, "--steps", "5"])
    with pytest.raises(SystemExit, match="differs from the checkpoint"):
        script.main([*common, "--steps", "5", "--resume", "--lr", "0.5"])
    assert script.main([*common, "--steps", "5", "--resume"]) == 0
    second = json.loads((out / "training.json").read_text())
    assert second["steps"] == 5 and len(second["commands"]) == 2
    assert sum(s["steps"] for s in second["sizes"].values()) == 5
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    assert state["progress"]["steps"] == 5 and len(state["progress"]["curve"]) == 5

    pipe = ShapesVideoPipeline.from_pretrained(out, local_files_only=True)
    saved = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    further = tmp_path / "further"
    again = [*common[2:], "--out", str(further), "--init-from", str(out), "--steps", "1", "--lr", "1e-12"]
    assert script.main(again) == 0  # one step at a vanishing learning rate: the weights it started from
    started = ShapesVideoPipeline.from_pretrained(further, local_files_only=True).transformer.state_dict()
    assert all(torch.allclose(started[k], v, atol=1e-6) for k, v in saved.items())
    assert json.loads((further / "training.json").read_text())["init_from"] == str(out)
    frames = pipe("a red circle", num_frames=2, height=32, width=32, num_inference_steps=2).frames[0]
    assert frames.shape == (2, 32, 32, 3) and np.isfinite(frames).all()


def test_a_narrow_model_grows_to_a_wider_feed_forward_computing_the_same():
    """--init-from with a wider --ffn-dim: the saved units are copied and the new ones start silent, so the grown
    transformer's output equals the saved one's (training then moves the new units); other shape changes refuse."""
    from diffattn_bench.embedded import video_transformer

    script = _script()
    torch.manual_seed(0)
    narrow, wide = video_transformer(256).eval(), video_transformer(512).eval()
    wide.load_state_dict(script.grow_ffn(narrow.state_dict(), wide))
    x, t, text = torch.randn(1, 6, 2, 16, 16), torch.tensor([400]), torch.randn(1, 5, 64)
    with torch.no_grad():
        assert torch.allclose(narrow(x, t, text).sample, wide(x, t, text).sample, atol=1e-6)
    grown = wide.state_dict()["blocks.0.ffn.net.0.proj.weight"]
    assert grown.shape == (512, 128) and grown[256:].abs().sum() > 0  # the new units' inputs are live
    assert wide.state_dict()["blocks.0.ffn.net.2.weight"][:, 256:].abs().sum() == 0  # their outputs start at zero
    bad = dict(narrow.state_dict(), **{"proj_out.weight": torch.zeros(3, 3)})
    with pytest.raises(SystemExit, match="proj_out.weight is"):
        script.grow_ffn(bad, wide)
