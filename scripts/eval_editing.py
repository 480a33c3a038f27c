"""ShapesEdit: seeded editing cases on the embedded image model, scored from pixels with the ShapesBench evaluator,
each method beside its plain baseline in one run.

    python scripts/eval_editing.py                       # 60 cases per task, writes outputs/eval_editing/
    python scripts/eval_editing.py --cases 10 --tasks colour

Tasks (a case = one seeded single-object scene prompt):
- colour: "a red circle on the left" -> "a blue circle on the left" with PromptToPrompt; baseline: the target
  prompt regenerated from the same noise. Success: the target colour and the source's shape, centroid within 2 px of
  the source object's, PSNR >= 35 dB outside the union of both objects' boxes dilated by 2 px.
- shape: circle -> square (any shape change) with PromptToPrompt; success: target shape, same colour, centroid
  within 2 px, the same outside PSNR.
- consistency: "... on the left" -> "... on the right" with MutualSelfAttention (MasaCtrl); baseline: the target
  prompt without it. Success: the object at the new place, colour within 10 levels and area within 15% of the
  source object's.
- removal: a rendered two-object scene, the mask over one object (its box + 1 px), removed with
  diffattn.editing.erase (Attentive Eraser); baseline: the same masked latent blending without attention
  redirection (guidance 0). Success: no object found in the mask, the other object still found in its place, the
  mask region's mean within 12 levels of the background.
- inversion: a rendered scene, DDIM-inverted and regenerated: PSNR against the scene.
- layout: two objects in two random boxes (side 0.25-0.35 of the image, apart, in different cells of the 3x3
  position grid, each box off its cell's named place: the nominal centre the prompt alone draws at); the prompt holds
  each object's colour, shape and the position word of its box's cell (the grammar has no finer words), e.g. "a red
  circle at the top left and a blue square on the right"; the subjects are the colour + shape words. Method:
  diffattn.editing.layout (bounded attention); baseline: the prompt alone from the same noise. Success: both objects
  found with the right colour and shape, each centroid inside its box, no colour leakage.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import diffattn
from diffattn.editing import edit, erase, invert, layout
from diffattn_bench.embedded import load_image_pipeline
from diffattn_bench.grammar import COLOURS, POSITION_CENTRES, POSITIONS, SHAPES, Scene, ShapeSpec, caption, position_of
from diffattn_bench.render import render_scene
from diffattn_bench.scoring import evaluate_image, psnr, segment

STEPS, GUIDANCE, SIZE = 20, 4.0, 32
EXAMPLES = 4  # cases per task in the picture


@dataclass(frozen=True)
class Case:
    source: str
    target: str
    spec: ShapeSpec
    edited: ShapeSpec


def _cases(task: str, count: int, seed: int) -> list[Case]:
    rng = np.random.default_rng(seed)
    colours = [c for c in COLOURS]
    cases = []
    while len(cases) < count:
        spec = ShapeSpec(str(rng.choice(SHAPES)), str(rng.choice(colours)), str(rng.choice(POSITIONS)))
        if task == "colour":
            edited = ShapeSpec(spec.shape, str(rng.choice([c for c in colours if c != spec.colour])), spec.position)
        elif task == "shape":
            edited = ShapeSpec(str(rng.choice([s for s in SHAPES if s != spec.shape])), spec.colour, spec.position)
        else:
            edited = ShapeSpec(spec.shape, spec.colour, str(rng.choice([p for p in POSITIONS if p != spec.position])))
        cases.append(Case(caption(Scene((spec,))), caption(Scene((edited,))), spec, edited))
    return cases


def _uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def _main_object(image: np.ndarray, prompt: str):
    result = evaluate_image(image, prompt)
    return result.objects[0].component if result.objects else None


def _outside_psnr(a: np.ndarray, b: np.ndarray, boxes: list[tuple[int, int, int, int]], pad: int = 2) -> float:
    keep = np.ones(a.shape[:2], bool)
    for x0, y0, x1, y1 in boxes:
        keep[max(0, y0 - pad) : y1 + pad, max(0, x0 - pad) : x1 + pad] = False
    if not keep.any():
        return math.inf
    return psnr(a[keep], b[keep])


def _replace_success(case: Case, source: np.ndarray, target: np.ndarray, task: str) -> bool:
    src = _main_object(source, case.source)
    tgt = _main_object(target, case.target)
    if src is None or tgt is None:
        return False
    h, w = source.shape[:2]
    moved = math.hypot((src.centroid[0] - tgt.centroid[0]) * w, (src.centroid[1] - tgt.centroid[1]) * h)
    same = tgt.shape == (src.shape if task == "colour" else case.edited.shape)
    return same and moved <= 2.0 and _outside_psnr(source, target, [src.bbox, tgt.bbox]) >= 35.0


def _consistency_failures(case: Case, source: np.ndarray, target: np.ndarray) -> list[str]:
    """The consistency checks this case fails (empty: success): missing, place, colour, area."""
    src = _main_object(source, case.source)
    result = evaluate_image(target, case.target)
    tgt = result.objects[0].component if result.objects else None
    if src is None or tgt is None:
        return ["missing"]
    failed = [] if result.objects[0].position_correct else ["place"]
    if np.abs(source[src.mask].mean(0) - target[tgt.mask].mean(0)).max() > 10:
        failed.append("colour")
    if abs(tgt.area - src.area) > 0.15 * src.area:
        failed.append("area")
    return failed


def _interval(successes: list[bool]) -> tuple[float, float]:
    """Rate and the half-width of its 95% (normal approximation) interval."""
    n = len(successes)
    p = sum(successes) / n
    return p, 1.96 * math.sqrt(max(p * (1 - p), 1e-12) / n)


def _summary(task: str, method: str, rows: dict, seconds: dict) -> dict:
    """Success rates with 95% intervals and time per edit, method beside baseline."""
    method_rate, method_ci = _interval(rows["method"])
    base_rate, base_ci = _interval(rows["baseline"])
    n = len(rows["method"])
    return {
        "task": task,
        "cases": n,
        "method": method,
        "success": method_rate,
        "ci95": method_ci,
        "baseline_success": base_rate,
        "baseline_ci95": base_ci,
        "seconds_per_edit": seconds["method"] / n,
        "baseline_seconds_per_edit": seconds["baseline"] / n,
    }


def _removal(pipe, count: int, seed: int, seconds: dict) -> dict:
    rng = np.random.default_rng(seed)
    rows = {"method": [], "baseline": []}
    progress = tqdm(total=count, desc="removal")
    i = -1
    while len(rows["method"]) < count:
        i += 1
        a, b = rng.choice(POSITIONS, 2, replace=False)
        colours = rng.choice(list(COLOURS), 2, replace=False)
        scene = Scene(
            (
                ShapeSpec(str(rng.choice(SHAPES)), str(colours[0]), str(a)),
                ShapeSpec(str(rng.choice(SHAPES)), str(colours[1]), str(b)),
            )
        )
        try:
            image, _ = render_scene(scene, SIZE, rng=seed + i, jitter=False)
        except ValueError:  # objects too close to render apart: draw another case
            continue
        seg = segment(image)
        gone = next((c for c in seg.components if c.colour == scene.objects[0].colour), None)
        if gone is None:
            continue
        x0, y0, x1, y1 = gone.bbox
        mask = np.zeros(image.shape[:2], bool)
        mask[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1] = True
        background = np.asarray(seg.background)
        for label, guidance in (("method", 9.0), ("baseline", 0.0)):
            start = time.perf_counter()
            out = _uint8(erase(pipe, image, mask, num_inference_steps=STEPS, guidance=guidance, seed=seed + i))
            seconds[label] += time.perf_counter() - start
            found = segment(out).components
            inside = any(c.mask[mask].any() for c in found)
            kept = any(c.colour == scene.objects[1].colour and c.position == scene.objects[1].position for c in found)
            flat = np.abs(out[mask].astype(float).mean(0) - background).max() <= 12
            rows[label].append(bool(not inside and kept and flat))
        progress.update(1)
    progress.close()
    return _summary("removal", "AttentiveEraser", rows, seconds)


def _layout_cases(count: int, seed: int) -> list[tuple[str, list[tuple[str, tuple[float, ...]]]]]:
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < count:
        sides = rng.uniform(0.25, 0.35, 2)
        centres = [rng.uniform(s / 2, 1 - s / 2, 2) for s in sides]
        boxes = [(c[0] - s / 2, c[1] - s / 2, c[0] + s / 2, c[1] + s / 2) for c, s in zip(centres, sides)]
        apart = (
            boxes[0][2] + 0.05 <= boxes[1][0]
            or boxes[1][2] + 0.05 <= boxes[0][0]
            or boxes[0][3] + 0.05 <= boxes[1][1]
            or boxes[1][3] + 0.05 <= boxes[0][1]
        )
        cells = [position_of(float(c[0]), float(c[1])) for c in centres]
        named = [POSITION_CENTRES[c] for c in cells]  # where the prompt alone puts an object
        off = all(not (b[0] <= x <= b[2] and b[1] <= y <= b[3]) for b, (x, y) in zip(boxes, named))
        if not apart or not off or cells[0] == cells[1]:
            continue
        colours = rng.choice(list(COLOURS), 2, replace=False)
        shapes = rng.choice(SHAPES, 2)
        specs = [ShapeSpec(str(shapes[j]), str(colours[j]), cells[j]) for j in range(2)]
        subjects = [
            (f"{spec.colour} {spec.shape}", tuple(round(float(v), 4) for v in box)) for spec, box in zip(specs, boxes)
        ]
        cases.append((caption(Scene(tuple(specs))), subjects))
    return cases


def _layout_success(image: np.ndarray, prompt: str, subjects) -> bool:
    result = evaluate_image(image, prompt)
    if result.leaked_pairs or len(result.objects) != len(subjects):
        return False
    for obj, (_, (x0, y0, x1, y1)) in zip(result.objects, subjects):
        c = obj.component
        if c is None or not obj.shape_correct or not (x0 <= c.centroid[0] <= x1 and y0 <= c.centroid[1] <= y1):
            return False
    return True


def _layout(pipe, count: int, seed: int, seconds: dict, examples: list | None, **options) -> dict:
    rows = {"method": [], "baseline": []}
    for i, (prompt, subjects) in enumerate(tqdm(_layout_cases(count, seed), desc="layout")):
        shown = []
        for label, bounded in (("method", True), ("baseline", False)):
            start = time.perf_counter()
            image = _uint8(
                layout(
                    pipe,
                    prompt,
                    subjects,
                    seed=seed + i,
                    bounded=bounded,
                    num_inference_steps=STEPS,
                    guidance_scale=GUIDANCE,
                    **(options if bounded else {}),
                )
            )
            seconds[label] += time.perf_counter() - start
            rows[label].append(_layout_success(image, prompt, subjects))
            shown.append(_with_boxes(image, subjects))
        if examples is not None and i < EXAMPLES:
            examples.append(
                (
                    "layout",
                    Case(prompt, " / ".join(f"{w} in box {i + 1}" for i, (w, _) in enumerate(subjects)), None, None),
                    [_with_boxes(np.zeros_like(image) + 16, subjects), *shown],
                )
            )
    return _summary("layout", "BoundedAttention", rows, seconds)


def _with_boxes(image: np.ndarray, subjects) -> np.ndarray:
    """The image with each box's outline drawn in grey (for the picture only, never scored)."""
    out = image.copy()
    h, w = out.shape[:2]
    for _, (x0, y0, x1, y1) in subjects:
        r0, r1 = int(round(y0 * h)), min(int(round(y1 * h)), h - 1)
        c0, c1 = int(round(x0 * w)), min(int(round(x1 * w)), w - 1)
        out[r0, c0 : c1 + 1] = out[r1, c0 : c1 + 1] = 200
        out[r0 : r1 + 1, c0] = out[r0 : r1 + 1, c1] = 200
    return out


def run_task(pipe, task: str, count: int, seed: int, examples: list | None = None, **options) -> dict:
    """Score ``count`` cases; the first few (source, method target, baseline target) go to ``examples``."""
    rows = {"method": [], "baseline": []}
    seconds = {"method": 0.0, "baseline": 0.0}
    if task == "inversion":
        scores = []
        for i, case in enumerate(tqdm(_cases("colour", count, seed), desc=task)):
            image, _ = render_scene(Scene((case.spec,)), SIZE, rng=seed + i, jitter=False)
            start = time.perf_counter()
            latents = invert(pipe, image, case.source, STEPS)
            replay = edit(
                pipe, case.source, case.source, None, latents=latents, num_inference_steps=STEPS, guidance_scale=1.0
            )
            seconds["method"] += time.perf_counter() - start
            scores.append(psnr(_uint8(replay.source), image))
        return {
            "task": task,
            "cases": count,
            "psnr_mean": float(np.mean(scores)),
            "psnr_min": float(np.min(scores)),
            "seconds_per_case": seconds["method"] / count,
        }
    if task == "removal":
        return _removal(pipe, count, seed, seconds)
    if task == "layout":
        return _layout(pipe, count, seed, seconds, examples, **options)
    method = (
        diffattn.MutualSelfAttention(start_step=4)
        if task == "consistency"
        else diffattn.PromptToPrompt(cross_replace=0.8, self_replace=0.4)
    )
    blend = options.get("local_blend")
    failures: dict[str, dict[str, int]] = {"method": {}, "baseline": {}}
    for i, case in enumerate(tqdm(_cases(task, count, seed), desc=task)):
        shown = []
        if task == "consistency" and options.get("masactrl"):  # e.g. {"mask_words": true, "start_step": 2}
            settings = dict(options["masactrl"])
            if settings.pop("mask_words", False):
                settings["mask_words"] = (case.spec.shape,)
            method = diffattn.MutualSelfAttention(**{"start_step": 4, **settings})
        if blend is not None and task in ("colour", "shape"):  # the object's words in both prompts
            method = diffattn.PromptToPrompt(
                cross_replace=0.8,
                self_replace=0.4,
                local_blend=diffattn.LocalBlend(words=(case.spec.shape, case.edited.shape), **blend),
            )
        for label, m in (("method", method), ("baseline", None)):
            start = time.perf_counter()
            out = edit(
                pipe, case.source, case.target, m, seed=seed + i, num_inference_steps=STEPS, guidance_scale=GUIDANCE
            )
            seconds[label] += time.perf_counter() - start
            source, target = _uint8(out.source), _uint8(out.target)
            if task == "consistency":
                failed = _consistency_failures(case, source, target)
                for reason in failed:
                    failures[label][reason] = failures[label].get(reason, 0) + 1
                ok = not failed
            else:
                ok = _replace_success(case, source, target, task)
            rows[label].append(ok)
            shown += [source, target] if label == "method" else [target]
        if examples is not None and i < EXAMPLES:
            examples.append((task, case, shown))
    name = (
        method.name
        + (" + LocalBlend" if blend is not None and task in ("colour", "shape") else "")
        + (" (automatic masks)" if getattr(method, "mask_words", ()) else "")
    )
    summary = _summary(task, name, rows, seconds)
    if task == "consistency":  # which check failed, per run (a case can fail several)
        summary["failures"], summary["baseline_failures"] = failures["method"], failures["baseline"]
    return summary


def save_grid(examples: list, path: Path, zoom: int = 4) -> None:
    """Rows: task and case; columns: source, method's target, baseline's target (pixels enlarged, no smoothing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(examples), 3, figsize=(7.5, 1.9 * len(examples)), squeeze=False)
    for row, (task, case, images) in enumerate(examples):
        for col, (image, title) in enumerate(zip(images, ("source", "edited (method)", "baseline"))):
            ax = axes[row][col]
            ax.imshow(np.kron(image, np.ones((zoom, zoom, 1), np.uint8)), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
        axes[row][0].set_ylabel(
            f"{task}\n{case.source}\n-> {case.target}", fontsize=6, rotation=0, ha="right", va="center"
        )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _options(task: str, args: argparse.Namespace) -> dict:
    if task == "layout":
        return json.loads(args.layout_options)
    if task == "consistency" and args.masactrl is not None:
        return {"masactrl": json.loads(args.masactrl)}
    if task in ("colour", "shape") and args.local_blend is not None:
        return {"local_blend": json.loads(args.local_blend)}
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument(
        "--tasks", nargs="+", default=["colour", "shape", "consistency", "layout", "removal", "inversion"]
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/eval_editing"))
    parser.add_argument("--grid", type=Path, default=None, help="also save a picture of source / edited pairs")
    parser.add_argument("--layout-options", default="{}", help="JSON keyword arguments for diffattn.editing.layout")
    parser.add_argument(
        "--masactrl",
        default=None,
        help='consistency task: MutualSelfAttention options as JSON; "mask_words": true uses the '
        "shape word for automatic masks (e.g. '{\"mask_words\": true}')",
    )
    parser.add_argument(
        "--local-blend",
        default=None,
        help="colour/shape tasks: PromptToPrompt with LocalBlend over the object words, with these "
        "JSON options (e.g. '{\"threshold\": 0.3}')",
    )
    args = parser.parse_args()
    pipe = load_image_pipeline()
    pipe.set_progress_bar_config(disable=True)
    examples: list = []
    results = [run_task(pipe, task, args.cases, args.seed, examples, **_options(task, args)) for task in args.tasks]
    if args.grid is not None:
        save_grid(examples, args.grid)
        print(f"wrote {args.grid}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval_editing.json").write_text(json.dumps(results, indent=2))
    for r in results:
        if r["task"] == "inversion":
            print(
                f"inversion: PSNR {r['psnr_mean']:.1f} dB mean, {r['psnr_min']:.1f} min over {r['cases']} scenes, "
                f"{r['seconds_per_case']:.2f} s per invert + replay"
            )
        else:
            print(
                f"{r['task']:12s} {r['method']:20s} {100 * r['success']:5.1f}% ± {100 * r['ci95']:.1f}  "
                f"baseline {100 * r['baseline_success']:5.1f}% ± {100 * r['baseline_ci95']:.1f}  "
                f"{r['seconds_per_edit']:.2f} s vs {r['baseline_seconds_per_edit']:.2f} s per edit"
                + (f"  failed checks {r['failures']} vs {r['baseline_failures']}" if "failures" in r else "")
            )
    print(f"wrote {args.out / 'eval_editing.json'}")


if __name__ == "__main__":
    main()
