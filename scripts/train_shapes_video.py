"""Train the embedded video model: ShapesVideoPipeline (WanTransformer3DModel in pixel space) on moving shapes.

Flow matching (x_t = (1 - s) x0 + s noise, target noise - x0, timestep = 1000 s with Wan's shifted sigmas), 10%
empty captions for classifier-free guidance, EMA weights, seeded. The transformer sees the noisy frames plus frame /
row / column coordinate channels (its rotary embeddings are relative only, so "on the left" needs them). Saves in
diffusers format (safetensors).

Clips come in several sizes (``--sizes``, frames x height x width, with sampling weights): a step draws one size and
a batch of about ``--batch-tokens`` tokens of it, so the model learns that objects, positions and motions scale with
the frame and the clip length instead of learning one token grid.

    python scripts/train_shapes_video.py --out pipelines/diffattn_bench/assets/shapes-video   # 60 minutes
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from train_shapes_image import distinct_frozen_token_embeddings, save_curve, update  # noqa: E402

from diffattn_bench.embedded import MAX_TEXT_TOKENS, shapes_text_encoder, shapes_tokenizer, video_transformer  # noqa: E402

logger = logging.getLogger("train_shapes_video")
PATCH = 4
# frames x height x width : sampling weight. The trained range: 512 to 4,096 tokens, frames 32 to 64 px square.
DEFAULT_SIZES = ("8x32x32:3", "16x32x32:1", "32x32x32:1", "8x48x48:1", "4x64x64:1", "8x64x64:1", "16x64x64:2")


@dataclass(frozen=True)
class ClipSize:
    frames: int
    height: int
    width: int
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> ClipSize:
        """``"16x64x64"`` or ``"16x64x64:2"`` (frames x height x width, optional sampling weight)."""
        dims, _, weight = text.partition(":")
        try:
            t, h, w = (int(v) for v in dims.lower().split("x"))
            size = cls(t, h, w, float(weight) if weight else 1.0)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"size {text!r}: write FRAMESxHEIGHTxWIDTH[:WEIGHT], e.g. 16x64x64:2"
            ) from None
        if h % PATCH or w % PATCH or min(t, h, w) < 1 or size.weight <= 0:
            raise argparse.ArgumentTypeError(
                f"size {text!r}: height and width must be multiples of {PATCH}, all dimensions and the weight positive"
            )
        return size

    @property
    def tokens(self) -> int:
        return self.frames * (self.height // PATCH) * (self.width // PATCH)

    def label(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


def render_set(count: int, seed: int, size: ClipSize) -> tuple[torch.Tensor, list[str]]:
    from diffattn_bench.grammar import caption
    from diffattn_bench.render import random_video_scene, render_video

    videos, captions = [], []
    hw = (size.height, size.width)
    for i in tqdm(range(count), desc=f"rendering {size.label()} clips", leave=False):
        rng = np.random.default_rng((seed, size.frames, size.height, size.width, i))
        scene, motions = random_video_scene(rng, max_objects=2, frames=size.frames, size=hw)
        clip, _ = render_video(scene, motions, frames=size.frames, size=hw, rng=rng)
        videos.append(torch.from_numpy(clip))
        captions.append(caption(scene, motions=motions))
    return torch.stack(videos).permute(0, 4, 1, 2, 3).contiguous(), captions  # (N, 3, T, H, W) uint8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("pipelines/diffattn_bench/assets/shapes-video"))
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps (reproducible runs)")
    parser.add_argument("--clips", type=int, default=12000, help="clips rendered in all, shared by the sizes by weight")
    parser.add_argument(
        "--sizes",
        type=ClipSize.parse,
        nargs="+",
        default=[ClipSize.parse(s) for s in DEFAULT_SIZES],
        help="clip sizes FRAMESxHEIGHTxWIDTH[:WEIGHT] a step draws from (default: %(default)s)",
    )
    parser.add_argument(
        "--then-sizes",
        type=ClipSize.parse,
        nargs="+",
        default=None,
        help="sizes (with weights) drawn after --switch of the time: a curriculum that learns the scenes "
        "at the first sizes, then their scaling",
    )
    parser.add_argument("--switch", type=float, default=0.6, help="fraction of the time before --then-sizes")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="tokens per batch (batch = this / clip tokens)")
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

    from diffattn_bench.shapes_video import ShapesVideoPipeline, with_coordinates

    tokenizer = shapes_tokenizer()
    started = time.time()
    text_encoder, transformer = shapes_text_encoder(tokenizer, layers=args.text_layers), video_transformer()
    text_params = distinct_frozen_token_embeddings(text_encoder, seed=1)
    first = {s.label(): s.weight for s in args.sizes}
    then = {s.label(): s.weight for s in (args.then_sizes or args.sizes)}
    sizes = list({s.label(): s for s in [*args.sizes, *(args.then_sizes or [])]}.values())
    weights = torch.tensor([first.get(s.label(), 0.0) for s in sizes], dtype=torch.float64)
    later = torch.tensor([then.get(s.label(), 0.0) for s in sizes], dtype=torch.float64)
    batches = [max(1, round(args.batch_tokens / s.tokens)) for s in sizes]
    # each size gets clips in proportion to the clips its steps draw (the phases weighted by their time)
    share = args.switch * weights / weights.sum() + (1 - args.switch) * later / later.sum()
    counts = [
        max(4 * b, int(args.clips * float(w) * b / float((share * torch.tensor(batches)).sum())))
        for w, b in zip(share.tolist(), batches)
    ]
    data = [render_set(n, args.seed, s) for n, s in zip(counts, sizes)]
    logger.info("sizes %s, batches %s, clips %s", [s.label() for s in sizes], batches, counts)
    empty = tokenizer(
        [""], padding="max_length", max_length=MAX_TEXT_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids[0]
    ids = [
        tokenizer(c, padding="max_length", max_length=MAX_TEXT_TOKENS, truncation=True, return_tensors="pt").input_ids
        for _, c in data
    ]
    shift = 3.0
    params = list(transformer.parameters()) + text_params
    opt = torch.optim.AdamW(
        [
            {"params": list(transformer.parameters()), "weight_decay": 1e-2},
            {"params": text_params, "weight_decay": 0.0},
        ],
        lr=args.lr,
    )
    ema = EMAModel(params, decay=0.999, use_ema_warmup=True)
    curve: list = []
    end = started + args.minutes * 60 - 30  # rendering counts toward the budget; 30 s left for saving
    step = 0
    bar = tqdm(desc="Wan transformer + text encoder", unit="step", total=args.steps)
    drawn = [0] * len(sizes)
    switch_at = time.time() + args.switch * (end - time.time())  # a fraction of the training time after rendering
    switched = args.then_sizes is None
    while time.time() < end and (args.steps is None or step < args.steps):
        if not switched and time.time() >= switch_at:
            weights, switched = later, True
            logger.info("step %d: now drawing %s", step, {k: v for k, v in then.items()})
        k = int(torch.multinomial(weights, 1, generator=rng))
        batch = batches[k]
        idx = torch.randint(0, len(ids[k]), (batch,), generator=rng)
        x0 = data[k][0][idx].float().div(127.5).sub(1.0)
        tokens = ids[k][idx].clone()
        tokens[torch.rand(batch, generator=rng) < 0.1] = empty
        u = torch.sigmoid(torch.randn(batch, generator=rng))  # logit-normal sigmas, then Wan's shift
        sigma = shift * u / (1 + (shift - 1) * u)
        drawn[k] += 1
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
    pipe = ShapesVideoPipeline(
        transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
    )
    pipe.save_pretrained(args.out, safe_serialization=True)
    args.curve.parent.mkdir(parents=True, exist_ok=True)
    save_curve(curve, args.curve)
    info = {
        "seed": args.seed,
        "sizes": {
            s.label(): {
                "weight": first.get(s.label(), 0.0),
                "then_weight": then.get(s.label(), 0.0),
                "batch": b,
                "clips": n,
                "steps": d,
            }
            for s, b, n, d in zip(sizes, batches, counts, drawn)
        },
        "switch": args.switch if args.then_sizes else None,
        "batch_tokens": args.batch_tokens,
        "lr": args.lr,
        "text_layers": args.text_layers,
        "threads": args.threads,
        "steps": step,
        "minutes": round((time.time() - started) / 60, 1),
        "final_loss": float(np.mean([v for *_, v in curve][-200:])),
        "torch": torch.__version__,
    }
    (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    logger.info("saved %s: %s", args.out, info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
