"""Train the embedded image model: a standard StableDiffusionPipeline on synthetic shapes scenes, on the CPU.

Stages (each time-boxed, seeded): render a fixed training set -> train a small AutoencoderKL (2x down, 4 latent
channels) -> encode the set -> train a UNet2DConditionModel and a CLIP text encoder jointly with the v-prediction
objective (10% empty captions for classifier-free guidance, EMA weights) -> save in diffusers format (safetensors)
with the grammar's tokenizer, a DPM-Solver scheduler and a loss-curve PNG.

    python scripts/train_shapes_image.py --out pipelines/diffattn_bench/assets/shapes-image   # 60 minutes on 2 cores
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

from diffattn_bench.embedded import MAX_TEXT_TOKENS, shapes_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

logger = logging.getLogger("train_shapes_image")

IMAGE_SIZE = 32


def build_models(tokenizer, text_layers: int = 4):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from diffattn_bench.embedded import shapes_text_encoder

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=IMAGE_SIZE,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )
    text_encoder = shapes_text_encoder(tokenizer, layers=text_layers)
    # Four levels (16 -> 8 -> 4 -> 2 latent pixels): at 2x2 and 4x4 every cell sees a different zero-padding
    # pattern, the UNet's only absolute-position cue (it has no positional encoding), so "on the left" is learnable.
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64, 96),
        norm_num_groups=16,
        cross_attention_dim=64,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    return vae, text_encoder, unet


def distinct_frozen_token_embeddings(text_encoder, seed: int) -> list[torch.nn.Parameter]:
    """Give every grammar word a fixed, well-separated embedding and train only the rest of the text encoder.

    Trained jointly from CLIP's tiny initial embeddings (std 0.02), the words a denoiser has not learnt to use yet
    get no gradient and collapse: in an earlier run 'left' and 'right' ended 0.07 apart (colours: ~6), and the model
    ignored positions. Returns the text encoder's trainable parameters.
    """
    embedding = text_encoder.get_input_embeddings()
    with torch.no_grad():
        embedding.weight.copy_(torch.randn(embedding.weight.shape, generator=torch.Generator().manual_seed(seed)))
    embedding.weight.requires_grad_(False)
    return [p for p in text_encoder.parameters() if p.requires_grad]


def render_set(count: int, seed: int, two_objects: float) -> tuple[torch.Tensor, list[str]]:
    """``count`` scenes, a fraction ``two_objects`` of them with two objects, the rest with one, shuffled."""
    from diffattn_bench.render import ShapesDataset

    two = round(count * two_objects)
    singles = ShapesDataset(count - two, seed=seed, size=IMAGE_SIZE, max_objects=1)
    pairs = ShapesDataset(two, seed=seed + 1, size=IMAGE_SIZE, min_objects=2, max_objects=2) if two else None
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for i in tqdm(rng.permutation(count).tolist(), desc="rendering scenes", leave=False):
        image, _, text = singles.example(i) if i < count - two else pairs.example(i - (count - two))
        images.append(torch.from_numpy(image))
        captions.append(text)
    return torch.stack(images).permute(0, 3, 1, 2).contiguous(), captions


def to_pixels(batch_uint8: torch.Tensor) -> torch.Tensor:
    return batch_uint8.float().div(127.5).sub(1.0)


def train_vae(vae, images: torch.Tensor, seconds: float, batch: int, rng: torch.Generator, curve: list) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    vae.train()
    start, step = time.time(), 0
    bar = tqdm(desc="VAE", unit="step", total=None)
    while time.time() - start < seconds:
        idx = torch.randint(0, len(images), (batch,), generator=rng)
        x = to_pixels(images[idx])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=rng)).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        curve.append(("vae", step, float(loss)))
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss):.4f}")
    bar.close()
    vae.eval()


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat(
        [
            vae.encode(to_pixels(images[i : i + batch])).latent_dist.mode()
            for i in tqdm(range(0, len(images), batch), desc="encoding", leave=False)
        ]
    )


def update(loss, opt, params, ema, curve: list, bar, step: int) -> int:
    """One optimiser step with gradient clipping and EMA; logs the loss. Returns the new step count."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    ema.step(params)
    curve.append(("denoiser", step + 1, float(loss)))
    bar.update(1)
    bar.set_postfix(loss=f"{float(loss):.4f}")
    return step + 1


def train_denoiser(
    unet, text_encoder, tokenizer, latents, captions, seconds, batch, rng, curve, lr=5e-4, max_steps: int | None = None
) -> dict:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    noise_sched = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    text_params = distinct_frozen_token_embeddings(text_encoder, seed=1)
    params = list(unet.parameters()) + text_params
    opt = torch.optim.AdamW(
        [{"params": list(unet.parameters()), "weight_decay": 1e-2}, {"params": text_params, "weight_decay": 0.0}], lr=lr
    )
    ema = EMAModel(params, decay=0.999, use_ema_warmup=True)  # both models, so the pair stays consistent
    ids = tokenizer(
        captions + [""], padding="max_length", max_length=MAX_TEXT_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids
    empty, ids = ids[-1], ids[:-1]
    unet.train()
    text_encoder.train()
    start, step = time.time(), 0
    bar = tqdm(desc="UNet + text encoder", unit="step", total=None)
    alphas = noise_sched.alphas_cumprod
    while time.time() - start < seconds and (max_steps is None or step < max_steps):
        idx = torch.randint(0, len(latents), (batch,), generator=rng)
        x0 = latents[idx]
        tokens = ids[idx].clone()
        drop = torch.rand(batch, generator=rng) < 0.1
        tokens[drop] = empty
        noise = torch.randn(x0.shape, generator=rng)
        t = torch.randint(0, 1000, (batch,), generator=rng)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        warm = min(1.0, (step + 1) / 200)
        for group in opt.param_groups:
            group["lr"] = lr * warm
        # v-prediction: in x0 terms epsilon's loss is weighted by the SNR (~0.005-0.1 at the high noise levels
        # where the layout, i.e. each object's position, is decided); v's by SNR + 1.
        target = a.sqrt() * noise - (1 - a).sqrt() * x0
        pred = unet(xt, t, text_encoder(tokens)[0]).sample
        step = update(F.mse_loss(pred, target), opt, params, ema, curve, bar, step)
    bar.close()
    ema.copy_to(params)
    unet.eval()
    text_encoder.eval()
    return {"denoiser_steps": step}


def save_curve(curve: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, stage in zip(axes, ("vae", "denoiser")):
        values = np.array([v for s, _, v in curve if s == stage])
        if len(values):
            window = max(1, len(values) // 50)
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(values, alpha=0.25, lw=0.6)
            ax.plot(np.arange(len(smooth)) + window - 1, smooth, lw=1.5)
            ax.set_yscale("log")
        ax.set_title(f"{stage} loss")
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("pipelines/diffattn_bench/assets/shapes-image"))
    parser.add_argument("--minutes", type=float, default=60.0, help="total training budget (VAE gets 12%%)")
    parser.add_argument("--images", type=int, default=40000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="torch threads; use 1 when other jobs share the CPU (OpenMP oversubscription is slow)",
    )
    parser.add_argument("--curve", type=Path, default=Path("outputs/shapes-image-loss.png"))
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=None, help="stop the denoiser after this many steps")
    parser.add_argument(
        "--two-objects",
        type=float,
        default=0.8,
        help="fraction of two-object training scenes (binding two objects needs most of the data)",
    )
    parser.add_argument("--text-layers", type=int, default=4, help="layers of the CLIP text encoder")
    parser.add_argument(
        "--vae-from",
        type=Path,
        default=None,
        help="reuse the VAE of an earlier run (its training minutes count towards the budget)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = torch.Generator().manual_seed(args.seed)

    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    tokenizer = shapes_tokenizer()
    vae, text_encoder, unet = build_models(tokenizer, args.text_layers)
    started = time.time()
    images, captions = render_set(args.images, args.seed, args.two_objects)
    curve: list = []
    budget = args.minutes * 60 - (time.time() - started)
    vae_minutes = 0.0
    if args.vae_from is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from / "vae", local_files_only=True).eval()
        vae_minutes = json.loads((args.vae_from / "training.json").read_text()).get("vae_minutes", 0.12 * args.minutes)
        started -= vae_minutes * 60  # the reused VAE's training time counts towards this run's budget
    else:
        vae_start = time.time()
        train_vae(vae, images, 0.12 * budget, args.batch, rng, curve)
        vae_minutes = (time.time() - vae_start) / 60
    raw = encode_all(vae, images)
    scaling = float(1.0 / raw.std())
    vae.register_to_config(scaling_factor=scaling)
    stats = train_denoiser(
        unet,
        text_encoder,
        tokenizer,
        raw * scaling,
        captions,
        args.minutes * 60 - (time.time() - started) - 30,
        args.batch,
        rng,
        curve,
        lr=args.lr,
        max_steps=args.steps,
    )
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(args.out, safe_serialization=True)
    args.curve.parent.mkdir(parents=True, exist_ok=True)
    save_curve(curve, args.curve)
    info = {
        "seed": args.seed,
        "images": args.images,
        "two_objects": args.two_objects,
        "text_layers": args.text_layers,
        "batch": args.batch,
        "image_size": IMAGE_SIZE,
        "vae_steps": sum(1 for s, *_ in curve if s == "vae"),
        "vae_minutes": round(vae_minutes, 1),
        "vae_from": str(args.vae_from) if args.vae_from else None,
        "lr": args.lr,
        **stats,
        "minutes": round((time.time() - started) / 60, 1),
        "scaling_factor": scaling,
        "final_vae_loss": float(np.mean([v for s, _, v in curve if s == "vae"][-100:] or [float("nan")])),
        "final_denoiser_loss": float(np.mean([v for s, _, v in curve if s == "denoiser"][-200:])),
        "torch": torch.__version__,
    }
    (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    logger.info("saved %s: %s", args.out, info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
