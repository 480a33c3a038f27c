"""Train the embedded video model: ShapesVideoPipeline (WanTransformer3DModel in pixel space) on moving shapes.

Flow matching (x_t = (1 - s) x0 + s noise, target noise - x0, timestep = 1000 s with Wan's shifted sigmas), 10%
empty captions for classifier-free guidance, EMA weights, seeded. The transformer sees the noisy frames plus frame /
row / column coordinate channels (its rotary embeddings are relative only, so "on the left" needs them). Saves in
diffusers format (safetensors).

Clips come in several sizes (``--sizes``, frames x height x width, with sampling weights): a step draws one size and
a batch of about ``--batch-tokens`` tokens of it, so the model learns that objects, positions and motions scale with
the frame and the clip length instead of learning one token grid. ``--then-sizes`` switches to other weights after
``--switch`` of the training time (a curriculum). ``--object-weight W`` weighs the squared error on the objects'
pixels (grown by one pixel, so their edges count) 1 + W times the background's: a shape is a few percent of a frame,
and with plain MSE the random background texture dominates the loss.

Every ``--checkpoint-minutes`` the full training state (transformer, text encoder, optimizer, EMA, step, RNG states,
training time, loss curve, clips drawn per size) goes to ``OUT/checkpoint/`` and the EMA model to ``OUT`` (loadable
with ``ShapesVideoPipeline.from_pretrained(OUT)``), with ``OUT/training.json``. Ctrl-C saves a checkpoint too.
``--resume`` continues from ``OUT/checkpoint/`` (the clips are rendered again from the seed; raise ``--minutes`` to
train longer). ``--init-from MODEL`` starts a fresh run from a saved pipeline's weights (e.g. the shipped
``pipelines/diffattn_bench/assets/shapes-video``) instead of random ones, to train a model further.

    python scripts/train_shapes_video.py --out pipelines/diffattn_bench/assets/shapes-video   # 60 minutes
    python scripts/train_shapes_video.py --out outputs/video-more --sizes 16x64x64:2 8x64x64:1 8x32x32:1 \\
        --init-from pipelines/diffattn_bench/assets/shapes-video --lr 3e-4 --minutes 120   # further (then --resume)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from train_shapes_image import distinct_frozen_token_embeddings, save_curve, update  # noqa: E402

from diffattn_bench.embedded import MAX_TEXT_TOKENS, shapes_text_encoder, shapes_tokenizer, video_transformer  # noqa: E402
from diffattn_bench.interrupts import stop_on_signals

logger = logging.getLogger("train_shapes_video")
PATCH = 4
# frames x height x width : sampling weight. The trained range: 512 to 4,096 tokens, frames 32 to 64 px square.
DEFAULT_SIZES = ("8x32x32:3", "16x32x32:1", "32x32x32:1", "8x48x48:1", "4x64x64:1", "8x64x64:1", "16x64x64:2")
CHECKPOINT = "checkpoint"
STATE = "state.pt"
EMPTY_CAPTIONS = 0.1
SHIFT = 3.0
WARMUP_STEPS = 200


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

    def spec(self) -> str:
        return f"{self.label()}:{self.weight:g}"


@dataclass(frozen=True)
class TrainConfig:
    """The settings a resumed run takes from its checkpoint: they fix the data and the models."""

    seed: int = 0
    clips: int = 12000
    sizes: tuple[str, ...] = DEFAULT_SIZES
    then_sizes: tuple[str, ...] | None = None
    switch: float = 0.6
    batch_tokens: int = 8192
    lr: float = 1e-3
    text_layers: int = 4
    ffn_dim: int = 256
    object_weight: float = 0.0
    init_from: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.switch < 1:
            raise ValueError(f"--switch {self.switch}: a fraction of the training time, strictly between 0 and 1")
        if self.object_weight < 0:
            raise ValueError(f"--object-weight {self.object_weight}: 0 (plain MSE) or more")

    def first(self) -> list[ClipSize]:
        return [ClipSize.parse(s) for s in self.sizes]

    def then(self) -> list[ClipSize] | None:
        return None if self.then_sizes is None else [ClipSize.parse(s) for s in self.then_sizes]


def resolve_config(args: argparse.Namespace, saved: dict | None) -> TrainConfig:
    """The run's settings: the checkpoint's on resume (a differing option given again is an error), else the
    options given over the defaults."""
    given = {
        "seed": args.seed,
        "clips": args.clips,
        "sizes": None if args.sizes is None else tuple(s.spec() for s in args.sizes),
        "then_sizes": None if args.then_sizes is None else tuple(s.spec() for s in args.then_sizes),
        "switch": args.switch,
        "batch_tokens": args.batch_tokens,
        "lr": args.lr,
        "text_layers": args.text_layers,
        "ffn_dim": args.ffn_dim,
        "object_weight": args.object_weight,
        "init_from": None if args.init_from is None else str(args.init_from),
    }
    if saved is None:
        return TrainConfig(**{k: v for k, v in given.items() if v is not None})
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
    saved = {**{k: f.default for k, f in TrainConfig.__dataclass_fields__.items()}, **saved}  # older checkpoints
    for key, value in given.items():
        if value is not None and value != saved[key]:
            raise SystemExit(
                f"--{key.replace('_', '-')} {value} differs from the checkpoint's {saved[key]}; a resumed run keeps "
                "it (leave the option out, or start a new run in another --out)"
            )
    return TrainConfig(**saved)


@dataclass
class Progress:
    """What a checkpoint holds besides the weights: how far the run is and what it has done."""

    steps: int = 0
    seconds: float = 0.0
    switched: bool = False
    drawn: dict[str, int] = field(default_factory=dict)
    curve: list = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    checkpoints: int = 0


def render_set(count: int, seed: int, size: ClipSize) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``count`` clips of ``size``: frames (N, 3, T, H, W) uint8, object masks (N, T, H, W) bool, captions."""
    from diffattn_bench.grammar import caption
    from diffattn_bench.render import random_video_scene, render_video

    videos, masks, captions = [], [], []
    hw = (size.height, size.width)
    for i in tqdm(range(count), desc=f"rendering {size.label()} clips", leave=False):
        rng = np.random.default_rng((seed, size.frames, size.height, size.width, i))
        scene, motions = random_video_scene(rng, max_objects=2, frames=size.frames, size=hw)
        clip, records = render_video(scene, motions, frames=size.frames, size=hw, rng=rng)
        videos.append(torch.from_numpy(clip))
        masks.append(torch.from_numpy(np.stack([np.logical_or.reduce([o.mask for o in r.objects]) for r in records])))
        captions.append(caption(scene, motions=motions))
    return torch.stack(videos).permute(0, 4, 1, 2, 3).contiguous(), torch.stack(masks), captions


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor, object_weight: float) -> torch.Tensor:
    """MSE with the squared error on object pixels (``masks`` (B, T, H, W), grown by one pixel) weighted
    ``1 + object_weight``, normalised by the mean weight so the loss stays on MSE's scale."""
    if object_weight == 0:
        return F.mse_loss(pred, target)
    grown = F.max_pool2d(masks.flatten(0, 1).unsqueeze(1).float(), 3, stride=1, padding=1).view_as(masks)
    weight = (1 + object_weight * grown).unsqueeze(1)  # (B, 1, T, H, W): every colour channel alike
    return ((pred - target) ** 2 * weight).mean() / weight.mean()


def clip_counts(config: TrainConfig, sizes: list[ClipSize], batches: list[int]) -> list[int]:
    """Clips to render per size: in proportion to the clips its steps draw (the phases weighted by their time)."""
    first = {s.label(): s.weight for s in config.first()}
    then = {s.label(): s.weight for s in (config.then() or config.first())}
    weights = torch.tensor([first.get(s.label(), 0.0) for s in sizes], dtype=torch.float64)
    later = torch.tensor([then.get(s.label(), 0.0) for s in sizes], dtype=torch.float64)
    share = config.switch * weights / weights.sum() + (1 - config.switch) * later / later.sum()
    per_clip = float((share * torch.tensor(batches, dtype=torch.float64)).sum())
    return [max(4 * b, int(config.clips * float(w) * b / per_clip)) for w, b in zip(share.tolist(), batches)]


def grow_ffn(saved: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``saved``'s transformer weights widened to ``model``'s feed-forward width: the saved units are copied, the
    new units keep their fresh input weights and get zero output weights, so the grown model computes what the
    saved one did until training moves them."""
    own = model.state_dict()
    grown = dict(saved)
    for name, value in saved.items():
        target = own[name]
        if value.shape == target.shape:
            continue
        if name.endswith("ffn.net.0.proj.weight") or name.endswith("ffn.net.0.proj.bias"):
            widened = target.clone()
            widened[: value.shape[0]] = value
        elif name.endswith("ffn.net.2.weight"):
            widened = torch.zeros_like(target)
            widened[:, : value.shape[1]] = value
        else:
            raise SystemExit(f"--init-from: {name} is {tuple(value.shape)} there, {tuple(target.shape)} here")
        grown[name] = widened
    return grown


def load_init(path: Path, transformer: torch.nn.Module, text_encoder: torch.nn.Module) -> None:
    """Copy a saved ShapesVideoPipeline's transformer and text encoder weights into the freshly built models (a
    narrower feed-forward is grown to this run's ``--ffn-dim``)."""
    from diffusers import WanTransformer3DModel
    from transformers import CLIPTextModel

    if not (path / "model_index.json").is_file():
        raise SystemExit(f"--init-from {path}: not a saved pipeline folder (no model_index.json)")
    saved_transformer = WanTransformer3DModel.from_pretrained(path, subfolder="transformer", local_files_only=True)
    saved_text = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
    pairs = (
        (transformer, grow_ffn(saved_transformer.state_dict(), transformer)),
        (text_encoder, saved_text.state_dict()),
    )
    for model, state in pairs:
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise SystemExit(
                f"--init-from {path}: its {type(model).__name__} differs from the one this script builds "
                f"({str(exc).splitlines()[0]}); pass --text-layers to match its text encoder, or start from scratch"
            ) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("pipelines/diffattn_bench/assets/shapes-video"))
    parser.add_argument("--minutes", type=float, default=60.0, help="training time (rendering not counted)")
    parser.add_argument("--steps", type=int, default=None, help="also stop after this many steps in all")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (fresh start if none)")
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="a saved ShapesVideoPipeline whose weights a fresh run starts from (train a model further)",
    )
    parser.add_argument("--clips", type=int, default=None, help="clips rendered in all, shared by the sizes by weight")
    parser.add_argument(
        "--sizes",
        type=ClipSize.parse,
        nargs="+",
        default=None,
        help=f"clip sizes FRAMESxHEIGHTxWIDTH[:WEIGHT] a step draws from (default: {' '.join(DEFAULT_SIZES)})",
    )
    parser.add_argument(
        "--then-sizes",
        type=ClipSize.parse,
        nargs="+",
        default=None,
        help="sizes (with weights) drawn after --switch of the time: a curriculum that learns the scenes "
        "at the first sizes, then their scaling",
    )
    parser.add_argument("--switch", type=float, default=None, help="fraction of the time before --then-sizes (0.6)")
    parser.add_argument("--batch-tokens", type=int, default=None, help="tokens per batch (8192; batch = this / clip)")
    parser.add_argument("--seed", type=int, default=None, help="default 0")
    parser.add_argument("--lr", type=float, default=None, help="default 1e-3")
    parser.add_argument("--text-layers", type=int, default=None, help="layers of the CLIP text encoder (default 4)")
    parser.add_argument(
        "--ffn-dim",
        type=int,
        default=None,
        help="the transformer's feed-forward width (default 256); with --init-from a narrower saved model is grown, "
        "its function unchanged at the start (the new units' output weights are zero)",
    )
    parser.add_argument(
        "--object-weight", type=float, default=None, help="extra loss weight on object pixels (default 0: plain MSE)"
    )
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--curve", type=Path, default=Path("outputs/shapes-video-loss.png"))
    args = parser.parse_args(argv)
    stop_on_signals()  # kill -INT / kill stop a background run with a checkpoint, as Ctrl+C does
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    out: Path = args.out
    folder = out / CHECKPOINT
    state = None
    if (folder / STATE).is_file():
        if not args.resume:
            raise SystemExit(f"{folder} holds a checkpoint; pass --resume to continue it, or delete it to start over")
        state = torch.load(folder / STATE, weights_only=False)
    elif args.resume:
        logger.warning("no checkpoint in %s: starting a fresh run", folder)
    config = resolve_config(args, None if state is None else state["config"])
    torch.manual_seed(config.seed)
    rng = torch.Generator().manual_seed(config.seed)

    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import EMAModel

    from diffattn_bench.shapes_video import ShapesVideoPipeline, with_coordinates

    tokenizer = shapes_tokenizer()
    text_encoder, transformer = (
        shapes_text_encoder(tokenizer, layers=config.text_layers),
        video_transformer(config.ffn_dim),
    )
    text_params = distinct_frozen_token_embeddings(text_encoder, seed=1)
    if state is None and config.init_from is not None:
        load_init(Path(config.init_from), transformer, text_encoder)
        logger.info("starting from the weights of %s", config.init_from)
    params = list(transformer.parameters()) + text_params
    opt = torch.optim.AdamW(
        [
            {"params": list(transformer.parameters()), "weight_decay": 1e-2},
            {"params": text_params, "weight_decay": 0.0},
        ],
        lr=config.lr,
    )
    ema = EMAModel(params, decay=0.999, use_ema_warmup=True)  # both models, so the pair stays consistent
    models = {"transformer": transformer, "text_encoder": text_encoder, "opt": opt, "ema": ema}
    progress = Progress()
    if state is not None:
        for name, m in models.items():
            m.load_state_dict(state[name])
        rng.set_state(state["torch_rng"])
        torch.set_rng_state(state["global_torch_rng"])
        progress = Progress(**state["progress"])
        logger.info("resumed %s: %d steps, %.1f minutes", folder, progress.steps, progress.seconds / 60)
    progress.commands.append(shlex.join([Path(sys.executable).name, *sys.argv] if argv is None else ["main", *argv]))

    first = {s.label(): s.weight for s in config.first()}
    then = {s.label(): s.weight for s in (config.then() or config.first())}
    sizes = list({s.label(): s for s in [*config.first(), *(config.then() or [])]}.values())
    weights = torch.tensor([first.get(s.label(), 0.0) for s in sizes], dtype=torch.float64)
    later = torch.tensor([then.get(s.label(), 0.0) for s in sizes], dtype=torch.float64)
    batches = [max(1, round(config.batch_tokens / s.tokens)) for s in sizes]
    counts = clip_counts(config, sizes, batches)
    data = [render_set(n, config.seed, s) for n, s in zip(counts, sizes)]
    logger.info("sizes %s, batches %s, clips %s", [s.label() for s in sizes], batches, counts)
    empty = tokenizer(
        [""], padding="max_length", max_length=MAX_TEXT_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids[0]
    ids = [
        tokenizer(c, padding="max_length", max_length=MAX_TEXT_TOKENS, truncation=True, return_tensors="pt").input_ids
        for *_, c in data
    ]
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    out.mkdir(parents=True, exist_ok=True)
    last_save = time.time()

    def save() -> None:
        """The full state to OUT/checkpoint (atomically), the EMA weights as a pipeline to OUT, training.json."""
        nonlocal last_save
        folder.mkdir(parents=True, exist_ok=True)
        progress.checkpoints += 1
        payload = {
            "config": asdict(config),
            "progress": asdict(progress),
            "torch_rng": rng.get_state(),
            "global_torch_rng": torch.get_rng_state(),
            **{name: m.state_dict() for name, m in models.items()},
        }
        tmp = folder / (STATE + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, folder / STATE)  # a stop while writing keeps the previous checkpoint
        ema.store(params)
        ema.copy_to(params)
        pipe = ShapesVideoPipeline(
            transformer=transformer.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, scheduler=scheduler
        )
        pipe.save_pretrained(out, safe_serialization=True)
        ema.restore(params)
        transformer.train()
        text_encoder.train()
        write_info(out, config, progress, sizes, batches, counts, first, then, args.threads)
        args.curve.parent.mkdir(parents=True, exist_ok=True)
        save_curve(progress.curve, args.curve)
        last_save = time.time()
        logger.info(
            "checkpoint %d: %d steps, %.1f minutes", progress.checkpoints, progress.steps, progress.seconds / 60
        )

    seconds = args.minutes * 60
    bar = tqdm(desc="Wan transformer + text encoder", unit="step", initial=progress.steps, total=args.steps)
    transformer.train()
    text_encoder.train()
    try:
        while progress.seconds < seconds and (args.steps is None or progress.steps < args.steps):
            tick = time.time()
            if config.then_sizes is not None and not progress.switched and progress.seconds >= config.switch * seconds:
                progress.switched = True
                logger.info("step %d: now drawing %s", progress.steps, then)
            k = int(torch.multinomial(later if progress.switched else weights, 1, generator=rng))
            batch = batches[k]
            idx = torch.randint(0, len(ids[k]), (batch,), generator=rng)
            x0 = data[k][0][idx].float().div(127.5).sub(1.0)
            tokens = ids[k][idx].clone()
            tokens[torch.rand(batch, generator=rng) < EMPTY_CAPTIONS] = empty
            u = torch.sigmoid(torch.randn(batch, generator=rng))  # logit-normal sigmas, then Wan's shift
            sigma = SHIFT * u / (1 + (SHIFT - 1) * u)
            progress.drawn[sizes[k].label()] = progress.drawn.get(sizes[k].label(), 0) + 1
            noise = torch.randn(x0.shape, generator=rng)
            s = sigma.view(-1, 1, 1, 1, 1)
            xt = (1 - s) * x0 + s * noise
            for group in opt.param_groups:
                group["lr"] = config.lr * min(1.0, (progress.steps + 1) / WARMUP_STEPS)
            inputs = with_coordinates(xt, transformer)  # + frame / row / column channels (absolute position cue)
            pred = transformer(inputs, sigma * 1000, text_encoder(tokens)[0], return_dict=False)[0]
            loss = weighted_mse(pred, noise - x0, data[k][1][idx], config.object_weight)
            progress.steps = update(loss, opt, params, ema, progress.curve, bar, progress.steps)
            progress.seconds += time.time() - tick
            if time.time() - last_save >= args.checkpoint_minutes * 60:
                save()
    except KeyboardInterrupt:
        bar.close()
        logger.warning("interrupted: saving a checkpoint (continue with --resume)")
        save()
        return 130
    bar.close()
    save()
    logger.info("saved %s (%d steps, %.1f minutes)", out, progress.steps, progress.seconds / 60)
    return 0


def write_info(
    out: Path,
    config: TrainConfig,
    progress: Progress,
    sizes: list[ClipSize],
    batches: list[int],
    counts: list[int],
    first: dict[str, float],
    then: dict[str, float],
    threads: int,
) -> None:
    import diffusers

    info = {
        **asdict(config),
        "sizes": {
            s.label(): {
                "weight": first.get(s.label(), 0.0),
                "then_weight": then.get(s.label(), 0.0),
                "batch": b,
                "clips": n,
                "steps": progress.drawn.get(s.label(), 0),
            }
            for s, b, n in zip(sizes, batches, counts)
        },
        "switch": config.switch if config.then_sizes else None,
        "threads": threads,
        "steps": progress.steps,
        "minutes": round(progress.seconds / 60, 1),
        "final_loss": float(np.mean([v for *_, v in progress.curve][-200:])) if progress.curve else None,
        "checkpoints": progress.checkpoints,
        "commands": progress.commands,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
