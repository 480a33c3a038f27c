"""Train the second embedded image model on CPU: a standard StableDiffusionPipeline on 64 x 64 scenes whose captions
leave room for the noise (``diffattn_bench.scenes``), with checkpoints so a long run can stop and resume.

Stages, each time-boxed and seeded, as ``train_shapes_image.py`` (whose functions this reuses): render a fixed
training set of ``--images`` scenes (train split: no HELD_OUT combination) -> train an AutoencoderKL (4x down to
16 x 16 x 4 latents) for ``--vae-minutes`` -> encode the set -> train a UNet2DConditionModel and the CLIP text encoder
jointly with v-prediction and EMA for ``--minutes``. Each step draws a fresh caption for each image (position, size,
pattern and background each left out with probability 0.5; 10% empty captions for classifier-free guidance).

Every ``--checkpoint-minutes`` the full training state (models, optimizers, EMA, step, RNG states, elapsed time, loss
curve) goes to ``OUT/checkpoint/`` and the EMA model to ``OUT`` (loadable with
``StableDiffusionPipeline.from_pretrained(OUT)``), with ``OUT/training.json`` and ``OUT/loss.png``. Ctrl-C saves a
checkpoint too. ``--resume`` continues from ``OUT/checkpoint/``; raise ``--minutes`` on resume to train longer (and
``--vae-minutes``, before the denoiser has taken a step, to train the VAE longer).

    python scripts/train_shapes_scenes.py --vae-minutes 10 --minutes 80            # ~95 minutes on 2 cores
    python scripts/train_shapes_scenes.py --vae-minutes 10 --minutes 80 --resume   # continue after a stop

Training further. A checkpoint does not outlive the work session that wrote it (``OUT/checkpoint/`` is not committed);
the shipped model is. ``--init-from FOLDER`` starts a new run from a saved pipeline's weights, e.g. the shipped one:

    python scripts/train_shapes_scenes.py --init-from pipelines/diffattn_bench/assets/shapes-scenes \\
        --out outputs/shapes-scenes-further --vae-minutes 0 --minutes 120
    python scripts/train_shapes_scenes.py --out outputs/shapes-scenes-further --vae-minutes 0 --minutes 180 --resume

The UNet, text encoder and VAE weights are read (float16 files into the float32 models); a folder whose tokenizer,
UNet, VAE or text encoder differs from what this script builds (``--channels``) is refused. The VAE stage is skipped:
the VAE stays frozen as given (the UNet has learnt its latents), so ``--vae-minutes`` must be 0; the training set is
encoded with it and scaled by its config's ``scaling_factor``. The optimiser starts fresh (the same 200-step warm-up);
the EMA starts from the loaded weights and keeps a constant decay of 0.999 (no EMA warm-up, which would replace them
by the first steps' training weights). ``training.json`` records ``init_from`` and the source folder's own
``training.json`` (``init_from_training``), so the history survives shipping. ``--resume`` continues such a run from
its checkpoint, which holds every weight: the folder is not read again (``--init-from`` may be left out, or repeated
with the same folder; another folder is refused).

To ship the result, copy the model files over the shipped ones and update the model card (``README.md`` there: the
steps, minutes and scores of the new weights):

    cd outputs/shapes-scenes-further && cp -r model_index.json scheduler tokenizer text_encoder unet vae \\
        training.json loss.png ../../pipelines/diffattn_bench/assets/shapes-scenes/
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_shapes_image import distinct_frozen_token_embeddings, encode_all, save_curve, to_pixels, update  # noqa: E402

from diffattn_bench.embedded import SCENES_MAX_TEXT_TOKENS, SCENES_MODEL_DIR, scenes_tokenizer  # noqa: E402
from diffattn_bench.interrupts import stop_on_signals
from diffattn_bench.scenes import HELD_OUT, IMAGE_SIZE, LEAVE_OUT, caption, render, sample_scene  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

logger = logging.getLogger("train_shapes_scenes")

LATENT_SIZE = IMAGE_SIZE // 4
EMPTY_CAPTIONS = 0.1
#: UNet widths per level (16 -> 8 -> 4 -> 2 latent pixels; 5.8 M parameters). The 4x VAE gives the same 16 x 16
#: latents as the first model at 32 px, whose (32, 64, 64, 96) UNet (2.9 M) ran ~2.3 steps/s at batch 32 on 2 cores.
#: 1.5x its widths for textures, patterns and three objects costs ~1.5x per step (CPU time 0.98 s vs 0.64 s per step
#: on one core): ~6,000 steps in 70 minutes on 2 cores, close to the first model's 7,472.
UNET_CHANNELS = (48, 96, 96, 128)
CHECKPOINT = "checkpoint"
STATE = "state.pt"
LATENTS = "latents.pt"
# Settings a resumed run takes from its checkpoint (the data and models must stay the same).
FIXED = ("seed", "images", "batch", "lr", "channels")
#: The EMA decay of a run started from saved weights: constant from the first step (see the module docstring).
INIT_EMA_DECAY = 0.999
#: Config keys that may differ between a saved model and the one this script builds (bookkeeping, not architecture;
#: the VAE's scaling factor is read from the saved folder).
UNCHECKED = {"scaling_factor", "architectures", "dtype", "torch_dtype", "transformers_version"}


def build_models(tokenizer, channels: tuple[int, ...] = UNET_CHANNELS):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from diffattn_bench.embedded import shapes_text_encoder

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=IMAGE_SIZE,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
    )
    text_encoder = shapes_text_encoder(tokenizer, layers=4, max_tokens=SCENES_MAX_TEXT_TOKENS)
    # Four levels as the first model: at 2x2 and 4x4 the zero padding tells cells apart, the UNet's only cue for
    # "on the left".
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=tuple(channels),
        norm_num_groups=16,
        cross_attention_dim=64,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    return vae, text_encoder, unet


def _architecture(config) -> dict:
    """A model config as plain JSON values, without the bookkeeping keys (``UNCHECKED`` and ``_``-prefixed ones)."""
    items = config.to_dict().items() if hasattr(config, "to_dict") else dict(config).items()
    return json.loads(json.dumps({k: v for k, v in items if not k.startswith("_") and k not in UNCHECKED}))


def load_init(path: Path, tokenizer, vae, text_encoder, unet) -> dict | None:
    """Copy a saved scenes pipeline's VAE, text encoder and UNet weights into the freshly built models and set the
    VAE's ``scaling_factor`` to the saved one. Refuses (SystemExit) a folder whose tokenizer or architectures differ.
    Returns the folder's ``training.json`` (None if it has none)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if not (path / "model_index.json").is_file():
        raise SystemExit(
            f"--init-from {path}: not a saved pipeline folder (no model_index.json); pass the folder of a model this "
            "script saved, e.g. pipelines/diffattn_bench/assets/shapes-scenes"
        )
    saved_tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    if (
        saved_tokenizer.get_vocab() != tokenizer.get_vocab()
        or saved_tokenizer.model_max_length != tokenizer.model_max_length
    ):
        raise SystemExit(
            f"--init-from {path}: its tokenizer ({len(saved_tokenizer)} tokens, up to "
            f"{saved_tokenizer.model_max_length}) differs from scenes_tokenizer() ({len(tokenizer)} tokens, up to "
            f"{tokenizer.model_max_length}): not a scenes model, or the scenes vocabulary changed since it was saved; "
            "train from scratch (leave out --init-from)"
        )
    pairs = (
        ("vae", vae, AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)),
        (
            "text_encoder",
            text_encoder,
            CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True),
        ),
        ("unet", unet, UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)),
    )
    for name, model, saved in pairs:
        built, given = _architecture(model.config), _architecture(saved.config)
        differing = sorted(k for k in built.keys() | given.keys() if built.get(k) != given.get(k))
        if differing:
            hint = ""
            if name == "unet" and "block_out_channels" in differing:
                hint = f"; pass --channels {' '.join(map(str, given['block_out_channels']))} to build its UNet"
            raise SystemExit(
                f"--init-from {path}: its {name} differs from the one this script builds in "
                + ", ".join(f"{k} ({given.get(k)} there, {built.get(k)} here)" for k in differing)
                + (hint or "; train from scratch (leave out --init-from)")
            )
        try:
            model.load_state_dict(saved.state_dict())  # float16 files: copied into the float32 parameters
        except RuntimeError as exc:
            raise SystemExit(
                f"--init-from {path}: its {name} weights do not fit the model this script builds "
                f"({str(exc).splitlines()[0]}); train from scratch (leave out --init-from)"
            ) from None
    vae.register_to_config(scaling_factor=float(pairs[0][2].config.scaling_factor))
    info = path / "training.json"
    return json.loads(info.read_text()) if info.is_file() else None


def training_scenes(count: int, seed: int) -> list:
    """The fixed training set: scene ``i`` is ``sample_scene(default_rng((seed, i)), "train")``."""
    return [sample_scene(np.random.default_rng((seed, i)), "train") for i in range(count)]


def render_all(scenes: list) -> torch.Tensor:
    images = np.stack([render(s) for s in tqdm(scenes, desc="rendering scenes", leave=False)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


class Run:
    """The training state that a checkpoint holds, and the clock for the next checkpoint."""

    def __init__(self, out: Path, every_minutes: float, config: dict) -> None:
        self.out = out
        self.folder = out / CHECKPOINT
        self.every = every_minutes * 60
        self.config = config
        self.last = time.time()
        self.stage = "vae"
        self.vae_steps = self.steps = 0
        self.vae_seconds = self.seconds = 0.0
        self.curve: list = []
        self.commands: list[str] = []
        self.scaling: float | None = None
        self.checkpoints = 0
        self.init_training: dict | None = None  # the --init-from folder's training.json

    def due(self) -> bool:
        return time.time() - self.last >= self.every

    def save(self, models: dict, rng: torch.Generator, caption_rng: np.random.Generator) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {
            "config": self.config,
            "stage": self.stage,
            "vae_steps": self.vae_steps,
            "steps": self.steps,
            "vae_seconds": self.vae_seconds,
            "seconds": self.seconds,
            "curve": self.curve,
            "commands": self.commands,
            "scaling": self.scaling,
            "checkpoints": self.checkpoints + 1,
            "init_training": self.init_training,
            "torch_rng": rng.get_state(),
            "global_torch_rng": torch.get_rng_state(),
            "caption_rng": caption_rng.bit_generator.state,
            **{name: m.state_dict() for name, m in models.items()},
        }
        tmp = self.folder / (STATE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.folder / STATE)  # a stop while writing keeps the previous checkpoint
        self.checkpoints += 1
        self.last = time.time()
        logger.info(
            "checkpoint %d: stage %s, VAE %d steps, denoiser %d steps",
            self.checkpoints,
            self.stage,
            self.vae_steps,
            self.steps,
        )

    def load(self) -> dict:
        state = torch.load(self.folder / STATE, weights_only=False)
        for key in (
            "stage",
            "vae_steps",
            "steps",
            "vae_seconds",
            "seconds",
            "curve",
            "commands",
            "scaling",
            "checkpoints",
        ):
            setattr(self, key, state[key])
        self.init_training = state.get("init_training")  # checkpoints written before --init-from have none
        return state


def resolve_config(args: argparse.Namespace, saved: dict | None) -> dict:
    """The run's settings: the checkpoint's on resume (a differing option given again is an error), else the options
    given over the defaults. ``init_from`` (the folder a run started from, or None) is kept by the checkpoint too: on
    resume the same folder given again is ignored (the checkpoint holds the weights), another one is refused."""
    defaults = {"seed": 0, "images": 40000, "batch": 32, "lr": 1e-3, "channels": list(UNET_CHANNELS)}
    config = {}
    given_init = None if args.init_from is None else str(args.init_from)
    if saved is None:
        config["init_from"] = given_init
    else:
        config["init_from"] = saved.get("init_from")  # checkpoints written before --init-from have none
        if given_init is not None:
            if config["init_from"] is None or Path(given_init).resolve() != Path(config["init_from"]).resolve():
                raise SystemExit(
                    f"--init-from {given_init} differs from the checkpoint's ({config['init_from']}); a resumed run "
                    "continues from its checkpoint (leave out --init-from, or start a new run in another --out)"
                )
            logger.info("--init-from %s ignored: a resumed run continues from its checkpoint", given_init)
    for key in FIXED:
        given = getattr(args, key)
        if given is not None and key == "channels":
            given = list(given)
        if saved is not None:
            if given is not None and given != saved[key]:
                raise SystemExit(f"--{key} {given} differs from the checkpoint's {saved[key]}; a resumed run keeps it")
            config[key] = saved[key]
        else:
            config[key] = defaults[key] if given is None else given
    return config


def train_vae_stage(run, vae, opt, images, seconds, batch, rng, save) -> None:
    vae.train()
    bar = tqdm(desc="VAE", unit="step", initial=run.vae_steps, total=None)
    while run.vae_seconds < seconds:
        tick = time.time()
        idx = torch.randint(0, len(images), (batch,), generator=rng)
        x = to_pixels(images[idx])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=rng)).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run.vae_steps += 1
        run.curve.append(("vae", run.vae_steps, loss.item()))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        run.vae_seconds += time.time() - tick
        if run.due():
            save()
    bar.close()
    vae.eval()


def train_denoiser_stage(
    run,
    unet,
    text_encoder,
    tokenizer,
    opt,
    ema,
    params,
    latents,
    scenes,
    seconds,
    args,
    rng,
    caption_rng,
    save,
    save_model,
) -> None:
    from diffusers import DDPMScheduler

    alphas = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    ).alphas_cumprod
    batch, lr = run.config["batch"], run.config["lr"]
    unet.train()
    text_encoder.train()
    bar = tqdm(desc="UNet + text encoder", unit="step", initial=run.steps, total=None)
    while run.seconds < seconds and (args.steps is None or run.steps < args.steps):
        tick = time.time()
        idx = torch.randint(0, len(latents), (batch,), generator=rng)
        drop = torch.rand(batch, generator=rng) < EMPTY_CAPTIONS
        texts = ["" if d else caption(scenes[i], caption_rng)[0] for i, d in zip(idx.tolist(), drop.tolist())]
        tokens = tokenizer(
            texts, padding="max_length", max_length=SCENES_MAX_TEXT_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids
        x0 = latents[idx].float()
        noise = torch.randn(x0.shape, generator=rng)
        t = torch.randint(0, 1000, (batch,), generator=rng)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (run.steps + 1) / 200)
        target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v-prediction, as the first model
        pred = unet(xt, t, text_encoder(tokens)[0]).sample
        run.steps = update(F.mse_loss(pred, target), opt, params, ema, run.curve, bar, run.steps)
        run.seconds += time.time() - tick
        if run.due():
            save()
            save_model()
    bar.close()


def store_half(folder: Path) -> None:
    """Rewrite every floating-point weight under ``folder`` (a saved pipeline) in float16: half the bytes, so the
    shipped model stays small. diffusers loads them back as float32 (its default dtype) without any option."""
    from safetensors.torch import load_file, save_file

    for path in sorted(folder.glob("*/*.safetensors")):
        tensors = load_file(path)
        save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, path, {"format": "pt"})


def write_info(run: Run, args: argparse.Namespace) -> None:
    def last(stage: str, n: int) -> float | None:
        values = [v for s, _, v in run.curve if s == stage][-n:]
        return float(np.mean(values)) if values else None

    import diffusers

    info = {
        **{k: v for k, v in run.config.items()},
        "image_size": IMAGE_SIZE,
        "latent_size": LATENT_SIZE,
        "unet_channels": run.config["channels"],
        "vae_steps": run.vae_steps,
        "vae_minutes": round(run.vae_seconds / 60, 2),
        "denoiser_steps": run.steps,
        "denoiser_minutes": round(run.seconds / 60, 2),
        "minutes": round((run.vae_seconds + run.seconds) / 60, 2),
        "scaling_factor": run.scaling,
        "init_from_training": run.init_training,
        "empty_captions": EMPTY_CAPTIONS,
        "leave_out": dict(LEAVE_OUT),
        "held_out": sorted(list(k) for k in HELD_OUT),
        "final_vae_loss": last("vae", 100),
        "final_denoiser_loss": last("denoiser", 200),
        "checkpoints": run.checkpoints,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "threads": args.threads,
        "commands": run.commands,
    }
    (run.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    save_curve(run.curve, run.out / "loss.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SCENES_MODEL_DIR)
    parser.add_argument("--vae-minutes", type=float, default=10.0, help="VAE training time")
    parser.add_argument("--minutes", type=float, default=80.0, help="UNet + text encoder training time")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (fresh start if none)")
    parser.add_argument("--images", type=int, default=None, help="training scenes (default 40000)")
    parser.add_argument("--seed", type=int, default=None, help="default 0")
    parser.add_argument("--batch", type=int, default=None, help="default 32")
    parser.add_argument("--lr", type=float, default=None, help="UNet + text encoder learning rate (default 1e-3)")
    parser.add_argument("--channels", type=int, nargs=4, default=None, help=f"UNet widths (default {UNET_CHANNELS})")
    parser.add_argument("--steps", type=int, default=None, help="also stop the denoiser after this many steps")
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="a saved scenes pipeline (e.g. pipelines/diffattn_bench/assets/shapes-scenes) whose weights a new run "
        "starts from, to train it further; its VAE stays frozen (pass --vae-minutes 0)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="torch threads; use 1 when other jobs share the CPU (OpenMP oversubscription is slow)",
    )
    args = parser.parse_args(argv)
    stop_on_signals()  # kill -INT / kill stop a background run with a checkpoint, as Ctrl+C does
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    out: Path = args.out
    folder = out / CHECKPOINT
    saved = None
    if (folder / STATE).is_file():
        if not args.resume:
            raise SystemExit(f"{folder} holds a checkpoint; pass --resume to continue it, or delete it to start over")
        saved = torch.load(folder / STATE, weights_only=False)["config"]
    elif args.resume:
        logger.warning("no checkpoint in %s: starting a fresh run", folder)
    config = resolve_config(args, saved)
    if config["init_from"] is not None and args.vae_minutes != 0:
        raise SystemExit(
            f"--vae-minutes {args.vae_minutes:g}: a run started from --init-from {config['init_from']} keeps its VAE "
            "frozen (the UNet has learnt its latents) and skips the VAE stage; pass --vae-minutes 0"
        )
    run = Run(out, args.checkpoint_minutes, config)
    torch.manual_seed(config["seed"])
    rng = torch.Generator().manual_seed(config["seed"])
    caption_rng = np.random.default_rng((config["seed"], 1))

    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from diffusers.training_utils import EMAModel

    tokenizer = scenes_tokenizer()
    vae, text_encoder, unet = build_models(tokenizer, config["channels"])
    text_params = distinct_frozen_token_embeddings(text_encoder, seed=1)
    if saved is None and config["init_from"] is not None:
        run.init_training = load_init(Path(config["init_from"]), tokenizer, vae, text_encoder, unet)
        logger.info("starting from the weights of %s (VAE frozen, stage skipped)", config["init_from"])
    if config["init_from"] is not None:
        vae.requires_grad_(False)
    params = list(unet.parameters()) + text_params
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    opt = torch.optim.AdamW(
        [{"params": list(unet.parameters()), "weight_decay": 1e-2}, {"params": text_params, "weight_decay": 0.0}],
        lr=config["lr"],
    )
    if config["init_from"] is None:
        ema = EMAModel(params, decay=0.999, use_ema_warmup=True)  # both models, so the pair stays consistent
    else:  # from the loaded weights at full decay (step 1's decay 0 copies weights the lr warm-up barely moved)
        ema = EMAModel(params, decay=INIT_EMA_DECAY, min_decay=INIT_EMA_DECAY)
    models = {"vae": vae, "vae_opt": vae_opt, "unet": unet, "text_encoder": text_encoder, "opt": opt, "ema": ema}
    if saved is not None:
        state = run.load()
        for name, m in models.items():
            m.load_state_dict(state[name])
        rng.set_state(state["torch_rng"])
        torch.set_rng_state(state["global_torch_rng"])
        caption_rng.bit_generator.state = state["caption_rng"]
        logger.info(
            "resumed %s: stage %s, VAE %d steps, denoiser %d steps, %.1f + %.1f minutes",
            folder,
            run.stage,
            run.vae_steps,
            run.steps,
            run.vae_seconds / 60,
            run.seconds / 60,
        )
        if run.stage == "denoiser" and run.steps == 0 and run.vae_seconds < args.vae_minutes * 60 - 1:
            # The denoiser has not started: a raised --vae-minutes trains the VAE longer (latents are re-encoded).
            logger.info("training the VAE on to %.1f minutes before the denoiser starts", args.vae_minutes)
            run.stage = "vae"
    run.commands.append(shlex.join([Path(sys.executable).name, *sys.argv] if argv is None else ["main", *argv]))

    def save() -> None:
        run.save(models, rng, caption_rng)
        write_info(run, args)

    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        steps_offset=1,  # unused by the default "linspace" spacing; silences StableDiffusionPipeline's warning
    )

    def save_model() -> None:
        """The EMA weights as a diffusers pipeline in OUT (the training weights stay in the models)."""
        ema.store(params)
        ema.copy_to(params)
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder.eval(),
            tokenizer=tokenizer,
            unet=unet.eval(),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(out, safe_serialization=True)
        store_half(out)
        ema.restore(params)
        unet.train()
        text_encoder.train()

    scenes = training_scenes(config["images"], config["seed"])
    out.mkdir(parents=True, exist_ok=True)
    try:
        if run.stage == "vae":
            images = render_all(scenes)
            if config["init_from"] is None:
                train_vae_stage(run, vae, vae_opt, images, args.vae_minutes * 60, config["batch"], rng, save)
            vae.eval()
            with torch.no_grad():
                raw = encode_all(vae, images)
            if config["init_from"] is None:
                run.scaling = float(1.0 / raw.std())
            else:  # the frozen VAE's own factor: the latents the UNet was trained on
                run.scaling = float(vae.config.scaling_factor)
                logger.info(
                    "latents std %.3f with the given VAE's scaling factor %.4f", raw.std() * run.scaling, run.scaling
                )
            folder.mkdir(parents=True, exist_ok=True)
            torch.save((raw * run.scaling).half(), folder / LATENTS)
            del images, raw
            run.stage = "denoiser"
            save()
        vae.register_to_config(scaling_factor=run.scaling)
        latents = torch.load(folder / LATENTS)
        train_denoiser_stage(
            run,
            unet,
            text_encoder,
            tokenizer,
            opt,
            ema,
            params,
            latents,
            scenes,
            args.minutes * 60,
            args,
            rng,
            caption_rng,
            save,
            save_model,
        )
    except KeyboardInterrupt:
        logger.warning("interrupted: saving a checkpoint (continue with --resume)")
        save()
        if run.stage == "denoiser" and run.steps:
            save_model()
        return 130
    save()
    save_model()
    logger.info(
        "saved %s (%d VAE steps, %d denoiser steps, %.1f minutes)",
        out,
        run.vae_steps,
        run.steps,
        (run.vae_seconds + run.seconds) / 60,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
