"""How much of a scene survives the scenes model's VAE: reconstruction PSNR and the ShapesBench reading of the
reconstructions (every attribute named), the ceiling for anything the denoiser draws.

    python scripts/check_scenes_vae.py                       # the shipped model's VAE, 200 held-out scenes
    python scripts/check_scenes_vae.py --checkpoint pipelines/diffattn_bench/assets/shapes-scenes/checkpoint/state.pt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffattn_bench.embedded import SCENES_MODEL_DIR
from diffattn_bench.scene_scoring import evaluate_scene, summarize_scenes
from diffattn_bench.scenes import caption, render, sample_scene
from diffattn_bench.scoring import psnr


def load_vae(checkpoint: Path | None):
    from diffusers import AutoencoderKL

    if checkpoint is None:
        return AutoencoderKL.from_pretrained(SCENES_MODEL_DIR / "vae", local_files_only=True).eval()
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_shapes_scenes import build_models

    from diffattn_bench.embedded import scenes_tokenizer

    vae = build_models(scenes_tokenizer())[0]
    vae.load_state_dict(torch.load(checkpoint, weights_only=False)["vae"])
    return vae.eval()


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, batch: int = 50) -> np.ndarray:
    out = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(images[start : start + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        out.append(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="a training checkpoint's state.pt")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--split", default="held_out", choices=("train", "held_out"))
    args = parser.parse_args(argv)
    vae = load_vae(args.checkpoint)
    scenes = [sample_scene(np.random.default_rng((7, i)), args.split) for i in range(args.scenes)]
    truth = np.stack([render(s) for s in scenes])
    recon = reconstruct(vae, truth)
    psnrs = [psnr(a, b, 255.0) for a, b in zip(recon, truth)]
    kinds: dict[str, list[float]] = {}
    for s, p in zip(scenes, psnrs):
        kinds.setdefault(s.background.kind, []).append(p)
    every = {a: 0.0 for a in ("position", "size", "pattern", "background")}
    prompts = [caption(s, 0, leave_out=every)[0] for s in scenes]
    results = [evaluate_scene(r, p) for r, p in zip(tqdm(recon, desc="scoring"), prompts)]
    summary = {
        "psnr_mean": float(np.mean(psnrs)),
        "psnr_by_background": {k: round(float(np.mean(v)), 2) for k, v in sorted(kinds.items())},
        **{k: round(v, 4) for k, v in summarize_scenes(results).items()},
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
