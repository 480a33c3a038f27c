"""Guidance sweep on the scenes model: ShapesBench all-checks rates of PAG / SEG / SoftPAG by layer and scale at low
classifier-free guidance, each configuration paired with no guidance on the same noise.

    python scripts/sweep_guidance.py --quick --model /tmp/scenes-copy            # smoke run (a minute or two)
    python scripts/sweep_guidance.py --model /tmp/scenes-copy --table outputs/sweep_guidance/sweep.md
    python scripts/sweep_guidance.py ... --resume                               # continue a stopped sweep

Items: ``--prompts`` seeded captions per split (``scenes.sample_scene`` + ``scenes.caption``; the train split and the
HELD_OUT split, reported separately) x ``--seeds`` noise seeds each. Every configuration (CFG x method x layer x
scale) generates every item from the same initial latents, so a configuration and the no-guidance baseline of its
CFG form pairs: the table gives each rate with its Wilson 95% interval and the paired difference to the baseline with
Newcombe's interval for paired proportions (method 10) and an exact McNemar p-value. Layers are the UNet's
attention-bearing blocks, read from the model (``attention_blocks``). ``change`` is the mean absolute pixel change
to the baseline image (0-255 levels): a layer and scale the demo can show must move the image visibly.

Results go to ``OUT/sweep.json`` after every configuration (``--resume`` skips the finished ones; the items, steps,
batch and model weights must match, else it says what differs), the baseline images to ``OUT/baseline_cfg*.npz``.
CFG 1 is the conditional prediction alone (diffusers runs no unconditional branch at ``guidance_scale <= 1``).
``--minutes`` stops before the next configuration once that long has passed.

Sizing (smoke run on a 2-core machine, 1 thread, batch 4, 20 steps, CFG 1): about 0.47 CPU s per image without
guidance, 0.66-0.75 with PAG / SEG; the whole default grid (2 CFG x 3 methods x 7 blocks x 4 scales = 170
configurations) is ~140 CPU s per item, so it does not fit in 40 minutes with a useful number of items. Run it in
two stages into the same OUT (the items must match; grids may differ):

    python scripts/sweep_guidance.py --cfg 1 --scales 3 --prompts 48 --seeds 1 --threads 2          # layers
    python scripts/sweep_guidance.py --cfg 1 2 --methods PAG --layers ITS_BEST_BLOCK --scales 1 2 3 5 \
        --prompts 48 --seeds 1 --threads 2 --resume              # scales: once per method, with its best block
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

METHODS = ("none", "PAG", "SEG", "SoftPAG")
SPLITS = ("train", "held_out")
SOFT_U = 0.5  # SoftPAG's interpolation toward PAG, as in the demo's Guidance tab
TARGET_GAIN = 0.10  # issue #28: +10 points of all-checks with the interval's lower bound above it
ATTRIBUTES_SHOWN = ("colour", "shape", "position", "size", "pattern", "background_kind", "count")


# ----------------------------------------------------------------------------------------------------------------
# Configurations and items
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """One sweep cell: classifier-free guidance ``cfg``, a guidance ``method`` ("none" = the baseline, with
    ``layer=None`` and ``scale=0``) on the attention block ``layer`` at ``scale``."""

    cfg: float
    method: str
    layer: str | None
    scale: float

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if not self.cfg >= 1.0:
            raise ValueError(f"cfg must be >= 1 (1 = no classifier-free guidance), got {self.cfg}")
        if self.method == "none":
            if self.layer is not None or self.scale != 0:
                raise ValueError("the 'none' baseline takes no layer and scale 0")
        elif self.layer is None or not self.scale > 0:
            raise ValueError(f"{self.method} needs a layer and a scale > 0 (scale 0 is the 'none' baseline)")

    @property
    def key(self) -> str:
        return f"cfg{self.cfg:g}/{self.method}/{self.layer or '-'}/{self.scale:g}"

    @property
    def baseline_key(self) -> str:
        return Config(self.cfg, "none", None, 0.0).key


def config_grid(
    cfgs: Sequence[float], methods: Sequence[str], layers: Sequence[str], scales: Sequence[float]
) -> list[Config]:
    """Every configuration, each CFG's baseline first (the others are paired with it and measured against its
    images): per CFG, ``none``, then methods x layers x scales in the given orders. Duplicates are dropped."""
    if not cfgs:
        raise ValueError("give at least one CFG value (--cfg 1 2)")
    guided = [m for m in methods if m != "none"]
    if guided and (not layers or not scales):
        raise ValueError("guided methods need at least one layer and one scale")
    grid: list[Config] = []
    for cfg in dict.fromkeys(float(c) for c in cfgs):
        grid.append(Config(cfg, "none", None, 0.0))
        for method in dict.fromkeys(guided):
            for layer in dict.fromkeys(layers):
                for scale in dict.fromkeys(float(s) for s in scales):
                    grid.append(Config(cfg, method, layer, scale))
    return grid


def pending(grid: Sequence[Config], done: Iterable[str]) -> list[Config]:
    """The configurations of ``grid`` whose key is not in ``done``, in grid order."""
    finished = set(done)
    return [c for c in grid if c.key not in finished]


@dataclass(frozen=True)
class Item:
    """One generation: the ``index``-th caption of ``split`` with noise seed ``noise``."""

    split: str
    index: int
    caption: str
    seed: int
    noise: int


def make_items(prompts: int, seeds: int, base_seed: int = 0, splits: Sequence[str] = SPLITS) -> list[Item]:
    """``prompts`` seeded captions per split, ``seeds`` noise seeds each; a pure function of the arguments."""
    from diffattn_bench.scenes import caption, sample_scene

    if prompts < 1 or seeds < 1:
        raise ValueError(f"prompts and seeds must be >= 1, got {prompts} and {seeds}")
    items = []
    for s, split in enumerate(splits):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use {', '.join(SPLITS)}")
        for i in range(prompts):
            rng = np.random.default_rng((base_seed, s, i))
            text, _ = caption(sample_scene(rng, split), rng)
            for seed in range(seeds):
                noise = int(np.random.default_rng((base_seed, s, i, seed, 1)).integers(2**31 - 1))
                items.append(Item(split, i, text, seed, noise))
    return items


# ----------------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------------
Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (nan, nan for n = 0)."""
    if n == 0:
        return (math.nan, math.nan)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n], got {successes} of {n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class PairedDifference:
    """``method - base`` rate over paired items, its 95% interval (Newcombe 1998, method 10: Wilson intervals of
    both rates combined with the phi correlation of the pairs), the discordant counts and McNemar's exact p."""

    n: int
    difference: float
    low: float
    high: float
    gained: int  # method right, baseline wrong
    lost: int  # method wrong, baseline right
    p_mcnemar: float


def mcnemar_exact_p(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs under a fair coin."""
    m = gained + lost
    if m == 0:
        return 1.0
    k = min(gained, lost)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2.0**m
    return min(1.0, 2.0 * tail)


def paired_difference(method: Sequence[bool], base: Sequence[bool], z: float = Z95) -> PairedDifference:
    """The paired difference of two success vectors over the same items (see :class:`PairedDifference`)."""
    if len(method) != len(base):
        raise ValueError(f"paired vectors differ in length: {len(method)} vs {len(base)}")
    n = len(method)
    if n == 0:
        raise ValueError("no pairs")
    a = sum(1 for m, b in zip(method, base) if m and b)
    gained = sum(1 for m, b in zip(method, base) if m and not b)
    lost = sum(1 for m, b in zip(method, base) if b and not m)
    d = n - a - gained - lost
    p1, p2 = (a + gained) / n, (a + lost) / n
    l1, u1 = wilson(a + gained, n, z)
    l2, u2 = wilson(a + lost, n, z)
    denominator = (a + gained) * (lost + d) * (a + lost) * (gained + d)
    phi = (a * d - gained * lost) / math.sqrt(denominator) if denominator > 0 else 0.0
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    diff = p1 - p2
    return PairedDifference(
        n, diff, max(-1.0, diff - below), min(1.0, diff + above), gained, lost, mcnemar_exact_p(gained, lost)
    )


def paired_bootstrap(
    method: Sequence[bool], base: Sequence[bool], draws: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile 95% interval of the paired difference by resampling items (a check on Newcombe's interval)."""
    m, b = np.asarray(method, float), np.asarray(base, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(m), size=(draws, len(m)))
    diffs = (m[idx] - b[idx]).mean(axis=1)
    return float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------
def attention_blocks(unet: Any) -> list[str]:
    """The UNet's blocks that hold a self-attention layer guidance can perturb (``down_blocks.0``, ``mid_block``,
    ``up_blocks.3``, ...), in the order the features flow (down, mid, up), as layer patterns for
    ``diffattn.guidance``."""
    import diffattn
    from diffattn.adapters import adapter_for

    adapter = adapter_for(unet)
    blocks: list[str] = []
    for name, _ in diffattn.attention_modules(unet):
        rule = adapter.rule_for(name)
        if rule is None or rule.role != "self":
            continue
        parts = name.split(".")
        block = ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]
        if block not in blocks:
            blocks.append(block)
    if not blocks:
        raise ValueError(f"{type(unet).__name__} has no self-attention layer: guidance has nothing to perturb")
    stage = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}  # diffusers registers mid_block after up_blocks

    def flow(block: str) -> tuple[int, int]:
        parts = block.split(".")
        return (stage.get(parts[0], 3), int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0)

    return sorted(blocks, key=flow)


def _guidance_method(config: Config) -> Any:
    from diffattn.guidance import PAG, SEG, SoftPAG

    layers = (config.layer,)
    if config.method == "PAG":
        return PAG(scale=config.scale, layers=layers)
    if config.method == "SEG":
        return SEG(scale=config.scale, layers=layers)
    return SoftPAG(scale=config.scale, u=SOFT_U, layers=layers)


def weights_fingerprint(folder: Path) -> str:
    """SHA-256 (first 16 hex digits) of the UNet and text encoder weights: a resumed sweep must use the same model."""
    digest = hashlib.sha256()
    files = sorted((folder / "unet").glob("*.safetensors")) + sorted((folder / "text_encoder").glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no unet/text_encoder weights under {folder}; pass a diffusers pipeline folder")
    for file in files:
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def initial_latents(pipe: Any, items: Sequence[Item]) -> Any:
    """One latent noise tensor per item from its noise seed, the same for every configuration."""
    import torch

    channels = pipe.unet.config.in_channels
    side = pipe.unet.config.sample_size
    return torch.stack(
        [torch.randn((channels, side, side), generator=torch.Generator().manual_seed(item.noise)) for item in items]
    )


def generate(
    pipe: Any, config: Config, items: Sequence[Item], latents: Any, steps: int, batch: int, bar: Any = None
) -> np.ndarray:
    """uint8 images ``(len(items), H, W, 3)`` of ``config``, ``batch`` items per pipeline call."""
    import diffattn

    handle = None if config.method == "none" else diffattn.guidance.enable(pipe, _guidance_method(config))
    out = []
    try:
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            images = pipe(
                [item.caption for item in chunk],
                latents=latents[start : start + batch].clone(),
                num_inference_steps=steps,
                guidance_scale=config.cfg,
                output_type="np",
            ).images
            out.append((np.clip(np.asarray(images), 0, 1) * 255).round().astype(np.uint8))
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if handle is not None:
            handle.remove()
    return np.concatenate(out)


def score(images: np.ndarray, items: Sequence[Item]) -> list[dict[str, Any]]:
    """Per item: ``all`` (all checks) and the named checks per attribute (lists of flags)."""
    from diffattn_bench.scene_scoring import evaluate_scene

    records = []
    for image, item in zip(images, items, strict=True):
        result = evaluate_scene(image, item.caption)
        records.append({"all": bool(result.all_checks), "checks": result.checks()})
    return records


# ----------------------------------------------------------------------------------------------------------------
# The results file
# ----------------------------------------------------------------------------------------------------------------
class SweepStore:
    """``sweep.json``: the sweep's settings (``meta``) and per finished configuration its per-item records, written
    after every configuration (atomically), so a stopped sweep resumes where it stopped."""

    def __init__(self, path: Path, meta: Mapping[str, Any], *, resume: bool) -> None:
        self.path = path
        self.meta = dict(meta)
        self.results: dict[str, dict[str, Any]] = {}
        if path.is_file():
            if not resume:
                raise FileExistsError(f"{path} exists: pass --resume to continue it, or another --out")
            saved = json.loads(path.read_text())
            differs = {k: (saved["meta"].get(k), v) for k, v in self.meta.items() if saved["meta"].get(k) != v}
            if differs:
                shown = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differs.items())
                raise ValueError(
                    f"--resume: {path} was made with other settings ({shown}); use the same settings or another --out"
                )
            self.results = saved["results"]
            self.commands = saved.get("commands", [])
        else:
            self.commands = []

    @property
    def done(self) -> set[str]:
        return set(self.results)

    def add(
        self,
        config: Config,
        records: list[dict[str, Any]],
        seconds: float,
        cpu_seconds: float = math.nan,
        score_cpu_seconds: float = math.nan,
    ) -> None:
        self.results[config.key] = {
            "config": asdict(config),
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "score_cpu_seconds": score_cpu_seconds,
            "items": records,
        }
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {"meta": self.meta, "commands": self.commands, "results": self.results}
        body["summary"] = summarize(self)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(body, indent=1))
        tmp.replace(self.path)


def _split_summary(records: list[dict], base: list[dict] | None) -> dict[str, Any]:
    n = len(records)
    hits = sum(r["all"] for r in records)
    out: dict[str, Any] = {"n": n, "all_checks": hits / n, "all_checks_ci": wilson(hits, n)}
    for name in ATTRIBUTES_SHOWN:
        flags = [f for r in records for f in r["checks"].get(name, [])]
        k = sum(flags)
        out[name] = k / len(flags) if flags else math.nan
        out[f"{name}_ci"] = wilson(k, len(flags))
    out["change"] = float(np.mean([r["change"] for r in records]))
    if base is not None:
        out["paired"] = asdict(paired_difference([r["all"] for r in records], [r["all"] for r in base]))
    return out


def summarize(store: SweepStore) -> dict[str, dict[str, Any]]:
    """Per configuration and split: rates with Wilson intervals, mean pixel change, seconds per image and the
    paired difference of all-checks to its CFG's baseline."""
    items = store.meta["items"]
    summary = {}
    for key, result in store.results.items():
        config = Config(**result["config"])
        base = store.results.get(config.baseline_key) if config.method != "none" else None
        n = len(result["items"])
        per_split: dict[str, Any] = {
            "seconds_per_image": result["seconds"] / n,
            "cpu_seconds_per_image": result.get("cpu_seconds", math.nan) / n,
            "score_cpu_seconds_per_image": result.get("score_cpu_seconds", math.nan) / n,
        }
        for split in dict.fromkeys(item["split"] for item in items):
            idx = [i for i, item in enumerate(items) if item["split"] == split]
            records = [result["items"][i] for i in idx]
            base_records = [base["items"][i] for i in idx] if base is not None else None
            per_split[split] = _split_summary(records, base_records)
        summary[key] = per_split
    return summary


# ----------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}"


def _rate(s: Mapping[str, Any]) -> str:
    lo, hi = s["all_checks_ci"]
    return f"{_pct(s['all_checks'])} [{_pct(lo)}, {_pct(hi)}]"


def _diff(s: Mapping[str, Any]) -> str:
    p = s.get("paired")
    if p is None:
        return "—"
    mark = " **≥+10**" if p["low"] >= TARGET_GAIN else ""
    interval = f"[{100 * p['low']:+.0f}, {100 * p['high']:+.0f}]"
    return f"{100 * p['difference']:+.0f} {interval} ({p['gained']}/{p['lost']}){mark}"


def markdown_table(store: SweepStore, command: str) -> str:
    """The sweep as markdown: the command, the settings, one table per CFG (all-checks with Wilson intervals, the
    paired difference to no guidance with gained/lost pairs, pixel change), then the best layer per method."""
    summary = summarize(store)
    meta = store.meta
    splits = list(dict.fromkeys(item["split"] for item in meta["items"]))
    lines = [
        "# Guidance sweep (ShapesBench scenes)",
        "",
        "Commands (in order; later ones resumed the sweep):",
        "",
        *[f"- `{c}`" for c in (store.commands or [command])],
        "",
        f"Model {meta['model']} (weights {meta['fingerprint']}), {meta['steps']} steps, "
        f"{meta['prompts']} prompts x {meta['seeds']} seeds per split. All-checks % [Wilson 95%]; Δ = paired "
        "difference to no guidance at the same CFG in points [Newcombe 95%] (items gained/lost); change = mean "
        "|pixel change| to no guidance (0-255); s/img: wall and CPU seconds per image (generation only; CPU time of "
        "all this process's threads).",
    ]
    by_cfg: dict[float, list[str]] = {}
    for key in summary:
        by_cfg.setdefault(Config(**store.results[key]["config"]).cfg, []).append(key)
    for cfg, keys in by_cfg.items():
        lines += ["", f"## CFG {cfg:g}", ""]
        header = ["method", "layer", "scale"]
        for split in splits:
            header += [f"{split} all", f"{split} Δ"]
        header += ["count %", "change", "s/img", "CPU s/img", "score CPU s/img"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for key in keys:
            c, s = Config(**store.results[key]["config"]), summary[key]
            row = [c.method, c.layer or "—", f"{c.scale:g}"]
            for split in splits:
                row += [_rate(s[split]), _diff(s[split])]
            counts = [s[split]["count"] for split in splits]
            row += [
                "/".join(_pct(x) for x in counts),
                f"{np.mean([s[split]['change'] for split in splits]):.1f}",
                f"{s['seconds_per_image']:.2f}",
                f"{s['cpu_seconds_per_image']:.2f}",
                f"{s['score_cpu_seconds_per_image']:.2f}",
            ]
            lines.append("| " + " | ".join(row) + " |")
    best = best_layers(store, summary)
    if best:
        lines += ["", "## Best layer per method (highest lower bound of the train-split Δ, at the lowest CFG)", ""]
        for method, (key, low) in best.items():
            lines.append(f"- {method}: `{key}` (Δ lower bound {100 * low:+.0f} points)")
    return "\n".join(lines) + "\n"


def best_layers(store: SweepStore, summary: Mapping[str, Any], split: str = "train") -> dict[str, tuple[str, float]]:
    """Per guided method, the configuration at the lowest CFG whose paired all-checks difference on ``split`` has
    the highest lower bound (ties: the larger difference)."""
    if not summary:
        return {}
    lowest = min(Config(**r["config"]).cfg for r in store.results.values())
    best: dict[str, tuple[str, float, float]] = {}
    for key, s in summary.items():
        c = Config(**store.results[key]["config"])
        p = s.get(split, {}).get("paired")
        if c.cfg != lowest or p is None:
            continue
        rank = (p["low"], p["difference"])
        if c.method not in best or rank > best[c.method][1:]:
            best[c.method] = (key, *rank)
    return {m: (k, low) for m, (k, low, _) in best.items()}


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
QUICK = {"prompts": 2, "seeds": 1, "methods": ["PAG", "SEG"], "scales": [3.0], "max_layers": 2, "cfg": [1.0]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="scenes pipeline folder (default: the embedded one)")
    parser.add_argument("--prompts", type=int, default=24, help="captions per split")
    parser.add_argument("--seeds", type=int, default=2, help="noise seeds per caption")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0], help="classifier-free guidance values")
    parser.add_argument("--methods", nargs="+", default=["PAG", "SEG", "SoftPAG"], choices=METHODS[1:])
    parser.add_argument("--layers", nargs="+", default=None, help="attention blocks (default: every one the UNet has)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="items per pipeline call")
    parser.add_argument("--seed", type=int, default=0, help="seed of the captions and noise")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("outputs/sweep_guidance"))
    parser.add_argument("--table", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument("--resume", action="store_true", help="continue OUT/sweep.json (skip finished configs)")
    parser.add_argument(
        "--minutes", type=float, default=None, help="start no new configuration after this long (continue: --resume)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2 prompts x 1 seed per split, PAG and SEG, 2 layers, scale 3"
    )
    return parser


def _baseline_images(
    pipe: Any, store: SweepStore, config: Config, items: list[Item], latents: Any, args: argparse.Namespace
) -> np.ndarray:
    """The baseline images of ``config``'s CFG: from OUT/baseline_cfg*.npz, else generated (and saved)."""
    path = args.out / f"baseline_cfg{config.cfg:g}.npz"
    if path.is_file():
        saved = np.load(path)
        if saved["fingerprint"].item() == store.meta["fingerprint"] and len(saved["images"]) == len(items):
            return saved["images"]
    base = Config(config.cfg, "none", None, 0.0)
    bar = tqdm(total=len(items), desc=f"{base.key} (baseline images)", leave=False)
    images = generate(pipe, base, items, latents, args.steps, args.batch, bar)
    bar.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=images, fingerprint=np.asarray(store.meta["fingerprint"]))
    return images


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        for name in ("prompts", "seeds", "methods", "scales", "cfg"):
            if getattr(args, name) == build_parser().get_default(name):
                setattr(args, name, QUICK[name])
    import torch

    from diffattn_bench.embedded import SCENES_MODEL_DIR, load_scenes_pipeline

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    folder = Path(args.model or SCENES_MODEL_DIR)
    pipe = load_scenes_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    blocks = attention_blocks(pipe.unet)
    layers = args.layers or (blocks[: QUICK["max_layers"]] if args.quick else blocks)
    unknown = [layer for layer in layers if layer not in blocks]
    if unknown:
        raise SystemExit(f"--layers {' '.join(unknown)}: not an attention block of this UNet; use {', '.join(blocks)}")
    items = make_items(args.prompts, args.seeds, args.seed, args.splits)
    meta = {
        "model": str(folder),
        "fingerprint": weights_fingerprint(folder),
        "steps": args.steps,
        "batch": args.batch,
        "seed": args.seed,
        "prompts": args.prompts,
        "seeds": args.seeds,
        "soft_u": SOFT_U,
        "items": [asdict(item) for item in items],
    }
    store = SweepStore(args.out / "sweep.json", meta, resume=args.resume)
    command = shlex.join(["python", "scripts/sweep_guidance.py", *(sys.argv[1:] if argv is None else argv)])
    store.commands.append(command)
    grid = config_grid(args.cfg, ["none", *args.methods], layers, args.scales)
    todo = pending(grid, store.done)
    print(f"{len(grid)} configurations x {len(items)} images; {len(grid) - len(todo)} already done", flush=True)
    latents = initial_latents(pipe, items)
    baselines: dict[float, np.ndarray] = {}
    bar = tqdm(total=len(todo) * len(items), desc="sweep", unit="img")
    began = time.perf_counter()
    for config in todo:
        if args.minutes is not None and time.perf_counter() - began > 60 * args.minutes:
            print(f"--minutes {args.minutes:g} reached: stopping; continue with --resume", flush=True)
            break
        bar.set_postfix_str(config.key)
        start, cpu = time.perf_counter(), time.process_time()
        images = generate(pipe, config, items, latents, args.steps, args.batch, bar)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        if config.method == "none":
            baselines[config.cfg] = images
            path = args.out / f"baseline_cfg{config.cfg:g}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(path, images=images, fingerprint=np.asarray(meta["fingerprint"]))
        elif config.cfg not in baselines:
            baselines[config.cfg] = _baseline_images(pipe, store, config, items, latents, args)
        reference = baselines[config.cfg]
        scoring = time.process_time()
        records = score(images, items)
        scoring = time.process_time() - scoring
        for record, image, base in zip(records, images, reference):
            record["change"] = float(np.abs(image.astype(np.int16) - base.astype(np.int16)).mean())
        store.add(config, records, seconds, cpu, scoring)
    bar.close()
    store.save()
    table = markdown_table(store, command)
    if args.table is not None:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(table)
        print(f"wrote {args.table}")
    print(table)
    print(f"wrote {store.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
