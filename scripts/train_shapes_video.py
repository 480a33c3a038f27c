"""Train the embedded video model: ShapesVideoPipeline (WanTransformer3DModel in pixel space) on moving shapes.

Flow matching (x_t = (1 - s) x0 + s noise, target noise - x0, timestep = 1000 s with Wan's shifted sigmas), 10%
empty captions for classifier-free guidance, EMA weights, seeded. The transformer sees the noisy frames plus frame /
row / column coordinate channels (its rotary embeddings are relative only, so "on the left" needs them). Saves in
diffusers format (safetensors).

    python scripts/train_shapes_video.py --out pipelines/assets/shapes-video   # 60 minutes
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from train_shapes_image import distinct_frozen_token_embeddings, save_curve, update  # noqa: E402

from diffattn.pipelines.embedded import MAX_TEXT_TOKENS, shapes_text_encoder, shapes_tokenizer, video_transformer  # noqa: E402

logger = logging.getLogger("train_shapes_video")
FRAMES, SIZE = 8, 32


def render_set(count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    from diffattn.pipelines.shapes_data import random_video_scene, render_video
    from diffattn.shapes import caption

    videos, captions = [], []
    for i in tqdm(range(count), desc="rendering clips", leave=False):
        rng = np.random.default_rng((seed, i))
        scene, motions = random_video_scene(rng, max_objects=2, frames=FRAMES, size=SIZE)
        clip, _ = render_video(scene, motions, frames=FRAMES, size=SIZE, rng=rng)
        videos.append(torch.from_numpy(clip))
        captions.append(caption(scene, motions=motions))
    return torch.stack(videos).permute(0, 4, 1, 2, 3).contiguous(), captions  # (N, 3, T, H, W) uint8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("pipelines/assets/shapes-video"))
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps (reproducible runs)")
    parser.add_argument("--clips", type=int, default=12000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--curve", type=Path, default=Path("outputs/shapes-video-loss.png"))
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--text-layers", type=int, default=4, help="layers of the CLIP text encoder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = torch.Generator().manual_seed(args.seed)

    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import EMAModel

    from diffattn.pipelines.shapes_video import ShapesVideoPipeline, with_coordinates

    tokenizer = shapes_tokenizer()
    text_encoder, transformer = shapes_text_encoder(tokenizer, layers=args.text_layers), video_transformer()
    started = time.time()
    videos, captions = render_set(args.clips, args.seed)
    ids = tokenizer(captions + [""], padding="max_length", max_length=MAX_TEXT_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    empty, ids = ids[-1], ids[:-1]
    shift = 3.0
    text_params = distinct_frozen_token_embeddings(text_encoder, seed=1)
    params = list(transformer.parameters()) + text_params
    opt = torch.optim.AdamW([{"params": list(transformer.parameters()), "weight_decay": 1e-2},
                             {"params": text_params, "weight_decay": 0.0}], lr=args.lr)
    ema = EMAModel(params, decay=0.999, use_ema_warmup=True)
    curve: list = []
    seconds = args.minutes * 60 - (time.time() - started) - 30
    step = 0
    bar = tqdm(desc="Wan transformer + text encoder", unit="step", total=args.steps)
    while time.time() - started < seconds and (args.steps is None or step < args.steps):
        idx = torch.randint(0, len(videos), (args.batch,), generator=rng)
        x0 = videos[idx].float().div(127.5).sub(1.0)
        tokens = ids[idx].clone()
        tokens[torch.rand(args.batch, generator=rng) < 0.1] = empty
        u = torch.sigmoid(torch.randn(args.batch, generator=rng))  # logit-normal sigmas, then Wan's shift
        sigma = shift * u / (1 + (shift - 1) * u)
        noise = torch.randn(x0.shape, generator=rng)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 200)
        inputs = with_coordinates(xt, transformer)  # + frame / row / column channels (absolute position cue)
        pred = transformer(inputs, sigma * 1000, text_encoder(tokens)[0], return_dict=False)[0]
        step = update(F.mse_loss(pred, noise - x0), opt, params, ema, curve, bar, step)
    bar.close()
    ema.copy_to(params)
    transformer.eval()
    text_encoder.eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    pipe = ShapesVideoPipeline(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
    pipe.save_pretrained(args.out, safe_serialization=True)
    args.curve.parent.mkdir(parents=True, exist_ok=True)
    save_curve(curve, args.curve)
    info = {"seed": args.seed, "clips": args.clips, "frames": FRAMES, "size": SIZE, "batch": args.batch,
            "lr": args.lr, "text_layers": args.text_layers, "threads": args.threads,
            "steps": step, "minutes": round((time.time() - started) / 60, 1),
            "final_loss": float(np.mean([v for *_, v in curve][-200:])), "torch": torch.__version__}
    (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    logger.info("saved %s: %s", args.out, info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
