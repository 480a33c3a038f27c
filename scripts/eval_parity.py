"""The authors' rule against diffattn's earlier rule, for the four methods of issue #19, on ShapesBench.

    python scripts/eval_parity.py --prompts 20            # all four comparisons, 20 prompts each
    python scripts/eval_parity.py todo seg --prompts 12   # a subset

Each comparison generates the same prompts from the same seeds (the prompt set and seeds of
``scripts/eval_shapes.py``) with dense attention, with the method's faithful mode (the authors' rule, the default)
and with ``faithful=False`` / ``mode="avg"`` (diffattn's earlier rule), scores every output from pixels only and
reports how far each variant moved from dense (PSNR). Settings where the two rules differ on the embedded models:

- ``radial``: RadialAttention(decay=0.2) on the video model at its native 32 x 32 px (8 frames x 64 tokens;
  128-token blocks): the authors' diagonal split empties neighbouring frames when S_f < 128.
- ``radial56``: the same at 56 x 56 px (8 frames x 196 tokens): frames straddle 128-token blocks and S_f >= 128, so
  only the authors' block shrink differs (it drops the tail tiles: 120 kept blocks against 130).
- ``seg``: SEG(scale=3, sigma=2) on the image model (its default layer, the mid block).
- ``todo``: TokenDownsampling(factor=2) on the image model's 16 x 16 level: nearest-exact against average pooling.
- ``hidiffusion``: ShiftedWindowAttention on the image model's HiDiffusion layers at 40 x 40 px (a 20 x 20 top level,
  windows of 10 tokens: shifts 0/2/4/6 against 0/2/5/7).

Writes ``outputs/parity/scores.json`` (and prints it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

COMPARISONS = ("radial", "radial56", "seg", "todo", "hidiffusion")


def _variants(name: str):
    """(kind, image size, {variant: (how, method, layers)}) of one comparison; how = "apply" | "guidance"."""
    import diffattn
    from diffattn.guidance import SEG

    if name in ("radial", "radial56"):
        return (
            "video",
            56 if name == "radial56" else 32,
            {
                "faithful": ("apply", diffattn.RadialAttention(decay=0.2), None),
                "diffattn": ("apply", diffattn.RadialAttention(decay=0.2, faithful=False), None),
            },
        )
    if name == "seg":
        return (
            "image",
            32,
            {
                "faithful": ("guidance", SEG(scale=3.0, sigma=2.0), None),
                "diffattn": ("guidance", SEG(scale=3.0, sigma=2.0, faithful=False), None),
            },
        )
    if name == "todo":
        return (
            "image",
            32,
            {
                "faithful": ("apply", diffattn.TokenDownsampling(factor=2), None),
                "diffattn": ("apply", diffattn.TokenDownsampling(factor=2, mode="avg"), None),
            },
        )
    if name == "hidiffusion":
        layers = diffattn.HIDIFFUSION_LAYERS["sd15"]
        return (
            "image",
            40,
            {
                "faithful": ("apply", diffattn.ShiftedWindowAttention(), layers),
                "diffattn": ("apply", diffattn.ShiftedWindowAttention(faithful=False), layers),
            },
        )
    raise ValueError(f"unknown comparison {name!r}; choose from {COMPARISONS}")


def _generate(pipe, kind: str, prompts: list[str], size: int | None, steps: int, guidance: float) -> list[np.ndarray]:
    generator = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    if kind == "image":
        images = pipe(
            prompts,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            height=size,
            width=size,
            output_type="np",
        ).images
        return list((np.asarray(images).clip(0, 1) * 255).round().astype(np.uint8))
    clips = pipe(
        prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generator, height=size, width=size
    ).frames
    return list((np.asarray(clips).clip(0, 1) * 255).round().astype(np.uint8))


def _scores(kind: str, outputs: list[np.ndarray], prompts: list[str], dense: list[np.ndarray] | None) -> dict:
    from diffattn_bench.scoring import evaluate_image, evaluate_video, psnr, summarize

    if kind == "image":
        summary = summarize(evaluate_image(o, p) for o, p in zip(outputs, prompts))
        out = {k: float(v) for k, v in vars(summary).items() if isinstance(v, (int, float))}
    else:
        results = [evaluate_video(o, p) for o, p in zip(outputs, prompts)]
        errors = np.array([r.trajectory_error for r in results], dtype=float)
        out = {
            "mean_trajectory_error": float(np.nanmean(errors)),
            "positions_correct": float(np.mean([p for r in results for p in r.positions_correct])),
            "mean_flicker": float(np.nanmean([r.flicker for r in results])),
        }
    if dense is not None:
        out["psnr_vs_dense"] = float(np.mean([min(psnr(o, d, 255.0), 100.0) for o, d in zip(outputs, dense)]))
    return out


def run(name: str, count: int, steps: int, guidance: float) -> dict:
    from eval_shapes import prompt_set

    import diffattn
    from diffattn import guidance as attention_guidance
    from diffattn_bench import embedded

    kind, size, variants = _variants(name)
    pipe = embedded.load_image_pipeline(None) if kind == "image" else embedded.load_video_pipeline(None)
    pipe.set_progress_bar_config(disable=True)
    prompts = prompt_set(kind, count)
    start = time.perf_counter()
    dense = _generate(pipe, kind, prompts, size, steps, guidance)
    result = {
        "kind": kind,
        "prompts": count,
        "steps": steps,
        "size": size,
        "dense": _scores(kind, dense, prompts, None),
    }
    for variant, (how, method, layers) in variants.items():
        if how == "apply":
            with diffattn.apply(pipe, method, layers=layers):
                outputs = _generate(pipe, kind, prompts, size, steps, guidance)
        else:
            with attention_guidance.enable(pipe, method):
                outputs = _generate(pipe, kind, prompts, size, steps, guidance)
        result[variant] = _scores(kind, outputs, prompts, dense)
        result[variant]["method"] = repr(method)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("comparisons", nargs="*", help=f"any of {COMPARISONS} (default: all)")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, default=Path("outputs/parity"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "scores.json"
    scores = json.loads(path.read_text()) if path.exists() else {}
    for name in args.comparisons or COMPARISONS:
        scores[name] = run(name, args.prompts, args.steps, args.guidance)
        path.write_text(json.dumps(scores, indent=2) + "\n")
        print(name, json.dumps(scores[name], indent=2), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
