"""Real-image inversion on an embedded image model: how well the source side of an edit reproduces an inverted image,
for three inversions, on images the model knows and on images unlike its training data, and how often
prompt-to-prompt's edit of an inverted image succeeds.

    python scripts/eval_inversion.py --model image --cases 20         # writes outputs/eval_inversion/image.{md,json}
    python scripts/eval_inversion.py --model scenes --cases 20 --model-path /tmp/scenes-snapshot
    python scripts/eval_inversion.py --model image --cases 20 --domain-only   # the out-of-domain threshold only

A case is one seeded image and a colour edit of its (first) object, "a red circle ..." -> "a blue circle ...":
- in-domain: a rendered scene of the model's world (image: one object, ``render_scene``; scenes: ``sample_scene``
  with one object), its caption as the source prompt;
- out-of-domain, alternately: "photo" (a smooth random colour field with film grain, no object) and "pattern" (the
  in-domain scene's object on fine diagonal stripes of two off-palette colours), with the in-domain case's prompts.

Inversions (each at ``--steps`` steps; the edit runs prompt-to-prompt at guidance ``--guidance``):
- DDIM: ``invert`` (no guidance), the edit starts from the inverted noise;
- DDIM + intermediates: ``invert(..., return_intermediates=True)``, the inversion's latent replaces the source
  branch's at every step (MasaCtrl's ``ref_intermediate_latents``): the source side is the encoded image exactly;
- null-text: ``null_text_invert`` (Adam, lr 1e-2, up to ``--null-text-iterations`` per step).

Scores: PSNR of the source side against the input image (dB; the VAE's round trip bounds it); edit success of the
target side on in-domain cases (image: the target colour with the source's shape, centroid within 2 px, PSNR
>= 35 dB outside both objects, as ``eval_editing.py``'s colour task; scenes: the target colour's object found with
the right shape, no extra object, background PSNR >= 30 dB outside both objects); the domain check's PSNR (the
inverted noise regenerated without guidance, ``diffattn.editing.check_reconstruction``) per domain, from which the
threshold of ``--domain-only`` is read (the midpoint between the lowest in-domain and the highest out-of-domain
value, reported with both).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

import diffattn
from diffattn.editing import check_reconstruction, edit, invert, null_text_invert
from diffattn.editing.inversion import psnr

METHODS = ("DDIM", "DDIM + intermediates", "null-text")
DOMAINS = ("in-domain", "out-of-domain")


@dataclass(frozen=True)
class Case:
    image: np.ndarray  # uint8 H x W x 3
    source: str
    target: str
    domain: str
    kind: str  # scene / photo / pattern
    truth: Any  # what the success check needs (the in-domain case's spec or scene)


# ----------------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------------
def _photo(size: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random colour field (a few low-frequency waves per channel) with film grain: photo-like, no object."""
    y, x = np.mgrid[0:size, 0:size] / size
    field = np.zeros((size, size, 3))
    for c in range(3):
        for _ in range(4):
            fx, fy, phase = rng.uniform(0.3, 2.5), rng.uniform(0.3, 2.5), rng.uniform(0, 2 * math.pi)
            field[..., c] += rng.uniform(0.3, 1.0) * np.sin(2 * math.pi * (fx * x + fy * y) + phase)
    field = (field - field.min()) / (np.ptp(field) + 1e-9)
    image = 40 + 175 * field + rng.normal(0, 8, field.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def _pattern(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image``'s objects on fine diagonal stripes of two off-palette colours (browns / greys / teal)."""
    size = image.shape[0]
    background = np.median(image.reshape(-1, 3), axis=0)
    objects = np.abs(image.astype(float) - background).max(-1) > 60
    period = int(rng.integers(3, 6))
    y, x = np.mgrid[0:size, 0:size]
    a, b = rng.choice(np.array([[150, 100, 60], [90, 120, 110], [170, 160, 140], [70, 60, 90]]), 2, replace=False)
    stripes = np.where(((x + y) // period % 2 == 0)[..., None], a, b)
    return np.where(objects[..., None], image, stripes).astype(np.uint8)


def _image_case(i: int, seed: int) -> Case:
    from diffattn_bench.grammar import COLOURS, POSITIONS, SHAPES, Scene, ShapeSpec, caption
    from diffattn_bench.render import render_scene

    rng = np.random.default_rng([seed, i])
    spec = ShapeSpec(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), str(rng.choice(POSITIONS)))
    edited = ShapeSpec(spec.shape, str(rng.choice([c for c in COLOURS if c != spec.colour])), spec.position)
    image, _ = render_scene(Scene((spec,)), 32, rng=seed + i, jitter=False)
    return Case(image, caption(Scene((spec,))), caption(Scene((edited,))), "in-domain", "scene", spec)


def _scenes_case(i: int, seed: int) -> Case:
    from diffattn_bench import scenes

    rng = np.random.default_rng([seed, i])
    scene = scenes.sample_scene(rng, objects=1)
    text, _ = scenes.caption(scene, rng)
    colour = scene.objects[0].colour
    new = str(rng.choice([c for c in scenes.COLOURS if c != colour]))
    target = text.replace(f"{colour} ", f"{new} ", 1)
    return Case(scenes.render(scene), text, target, "in-domain", "scene", (scene, new))


def make_cases(model: str, count: int, seed: int) -> list[Case]:
    """``count`` in-domain cases and ``count`` out-of-domain ones (photo and pattern alternately)."""
    made = _image_case if model == "image" else _scenes_case
    inside = [made(i, seed) for i in range(count)]
    outside = []
    for i, case in enumerate(inside):
        rng = np.random.default_rng([seed, i, 1])
        kind = "photo" if i % 2 == 0 else "pattern"
        image = _photo(case.image.shape[0], rng) if kind == "photo" else _pattern(case.image, rng)
        outside.append(Case(image, case.source, case.target, "out-of-domain", kind, case.truth))
    return inside + outside


# ----------------------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------------------
def _uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def _image_success(case: Case, source: np.ndarray, target: np.ndarray) -> bool:
    from diffattn_bench.scoring import evaluate_image

    src, tgt = evaluate_image(source, case.source), evaluate_image(target, case.target)
    if not src.objects or not tgt.objects or src.objects[0].component is None or tgt.objects[0].component is None:
        return False
    a, b = src.objects[0].component, tgt.objects[0].component
    h, w = source.shape[:2]
    moved = math.hypot((a.centroid[0] - b.centroid[0]) * w, (a.centroid[1] - b.centroid[1]) * h)
    keep = np.ones((h, w), bool)
    for x0, y0, x1, y1 in (a.bbox, b.bbox):
        keep[max(0, y0 - 2) : y1 + 2, max(0, x0 - 2) : x1 + 2] = False
    outside = psnr(source[keep] / 255.0, target[keep] / 255.0) if keep.any() else math.inf
    return b.shape == a.shape and moved <= 2.0 and outside >= 35.0


def _scenes_success(case: Case, source: np.ndarray, target: np.ndarray) -> bool:
    from diffattn_bench.scene_scoring import evaluate_scene, object_mask

    result = evaluate_scene(target, case.target)
    found = result.objects[0]
    if not (found.colour_present and found.shape_correct and result.count_correct):
        return False
    scene, new = case.truth
    old = scene.objects[0]
    moved = object_mask(source, old.colour, old.shape) | object_mask(target, new, old.shape)
    keep = ~moved
    return bool(keep.any()) and psnr(source[keep] / 255.0, target[keep] / 255.0) >= 30.0


# ----------------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------------
def run_case(pipe: Any, case: Case, model: str, args: argparse.Namespace) -> dict[str, Any]:
    """The case's scores and CPU seconds per inversion method (wall time misleads on a shared machine), and its
    domain-check PSNR."""
    truth = case.image.astype(np.float32) / 255.0
    row: dict[str, Any] = {"domain": case.domain, "kind": case.kind, "source": case.source, "target": case.target}
    start = time.process_time()
    inv = invert(pipe, case.image, case.source, args.steps, return_intermediates=True)
    row["seconds_invert"] = time.process_time() - start
    check = check_reconstruction(pipe, case.image, case.source, inv, args.steps, threshold=0.0)
    row["domain_psnr"] = check.psnr
    if args.domain_only:
        return row
    method = diffattn.PromptToPrompt(cross_replace=0.8, self_replace=0.4)
    success = _image_success if model == "image" else _scenes_success
    for name in METHODS:
        start = time.process_time()
        if name == "DDIM":
            used = inv.without_trajectory()
        elif name == "DDIM + intermediates":
            used = inv
        else:
            config = diffattn.editing.NullTextConfig(inner_steps=args.null_text_iterations)
            used = null_text_invert(
                pipe, case.image, case.source, args.steps, guidance_scale=args.guidance, config=config, progress=False
            )
        prepared = time.process_time() - start
        out = edit(pipe, case.source, case.target, method, inversion=used, guidance_scale=args.guidance)
        row[f"seconds {name}"] = time.process_time() - start + (row["seconds_invert"] if name != "null-text" else 0)
        row[f"seconds_prepare {name}"] = prepared
        row[f"psnr {name}"] = psnr(out.source, truth)
        if case.domain == "in-domain":
            row[f"success {name}"] = success(case, _uint8(out.source), _uint8(out.target))
    return row


def _mean(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    return f"{np.mean(finite):.1f}" if finite else "n/a"


def table(rows: list[dict[str, Any]], domain_only: bool) -> str:
    """The markdown tables: source-side PSNR per method and domain, edit success, the domain check."""
    lines = []
    by = {d: [r for r in rows if r["domain"] == d] for d in DOMAINS}
    if not domain_only:
        lines += [
            "| inversion | source PSNR in-domain (dB) | source PSNR out-of-domain (dB) | P2P edit success in-domain | "
            "CPU s / case |",
            "|---|---|---|---|---|",
        ]
        for name in METHODS:
            wins = [r[f"success {name}"] for r in by["in-domain"]]
            rate = f"{100 * np.mean(wins):.0f}% ({sum(wins)}/{len(wins)})" if wins else "n/a"
            seconds = np.mean([r[f"seconds {name}"] for r in rows])
            lines.append(
                f"| {name} | {_mean([r[f'psnr {name}'] for r in by['in-domain']])} | "
                f"{_mean([r[f'psnr {name}'] for r in by['out-of-domain']])} | {rate} | {seconds:.1f} |"
            )
        lines.append("")
    inside = [r["domain_psnr"] for r in by["in-domain"]]
    outside = [r["domain_psnr"] for r in by["out-of-domain"]]
    lines += ["| domain check (replay without guidance) | min (dB) | mean (dB) | max (dB) |", "|---|---|---|---|"]
    for name, values in (("in-domain", inside), ("out-of-domain", outside)):
        lines.append(f"| {name} | {min(values):.1f} | {np.mean(values):.1f} | {max(values):.1f} |")
    threshold = (min(inside) + max(outside)) / 2
    separated = "separated" if min(inside) > max(outside) else "NOT separated (overlap)"
    lines.append(
        f"\nthreshold (midpoint of the lowest in-domain and highest out-of-domain): {threshold:.1f} dB, {separated}"
    )
    return "\n".join(lines)


def _load(model: str, path: Path | None) -> Any:
    from diffattn_bench import embedded

    pipe = embedded.load_image_pipeline(path) if model == "image" else embedded.load_scenes_pipeline(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("image", "scenes"), default="image")
    parser.add_argument("--model-path", type=Path, default=None, help="a pipeline folder (default: the embedded one)")
    parser.add_argument("--cases", type=int, default=20, help="cases per domain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--null-text-iterations", type=int, default=10)
    parser.add_argument("--domain-only", action="store_true", help="only the domain check's PSNR (the threshold)")
    parser.add_argument("--out", type=Path, default=Path("outputs/eval_inversion"))
    args = parser.parse_args(argv)
    if args.cases < 1:
        parser.error("--cases must be >= 1")
    pipe = _load(args.model, args.model_path)
    rows = []
    for case in tqdm(make_cases(args.model, args.cases, args.seed), desc="cases"):
        start, cpu = time.perf_counter(), time.process_time()
        rows.append(run_case(pipe, case, args.model, args))
        rows[-1]["seconds_case"] = time.perf_counter() - start
        rows[-1]["cpu_seconds_case"] = time.process_time() - cpu  # wall time misleads on a shared machine
        print(
            f"{case.domain:13s} {case.kind:7s} {rows[-1]['seconds_case']:6.1f} s wall, "
            f"{rows[-1]['cpu_seconds_case']:6.1f} s CPU  {case.source!r}",
            file=sys.stderr,
        )
    text = f"{args.model} model, {args.cases} cases per domain, {args.steps} steps, guidance {args.guidance}\n\n"
    text += table(rows, args.domain_only)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "-domain" if args.domain_only else ""
    (args.out / f"{args.model}{suffix}.md").write_text(text + "\n")
    (args.out / f"{args.model}{suffix}.json").write_text(json.dumps(rows, indent=2, default=float))
    print(text)


if __name__ == "__main__":
    main()
