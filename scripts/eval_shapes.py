"""ShapesBench on the embedded models: generate from a fixed, seeded prompt set and score from pixels only.

    python scripts/eval_shapes.py image --model pipelines/diffattn_bench/assets/shapes-image --prompts 120
    python scripts/eval_shapes.py video --model pipelines/diffattn_bench/assets/shapes-video --prompts 40
    python scripts/eval_shapes.py scenes --prompts 100      # the second image model: 100 train-split + 100 held-out

Writes scores (JSON) and a grid of samples (PNG) to --out; --method applies a diffattn method first, so a method's
quality can be compared with dense on the same seeds (PSNR/SSIM against --against, a folder of dense outputs).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def grid_image(images: list[np.ndarray], captions: list[str], columns: int, scale: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(images) + columns - 1) // columns
    aspect = images[0].shape[1] / images[0].shape[0]  # video strips are wide: size the cells to the images
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.9 * aspect, rows * (1.9 + 0.35)), squeeze=False)
    for ax in np.atleast_1d(axes).flat:
        ax.axis("off")
    for ax, image, text in zip(np.atleast_1d(axes).flat, images, captions):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(text.replace(" and ", "\nand ").replace(", ", ",\n"), fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100 * scale // 2)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["image", "video", "scenes"])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--frames", type=int, default=8, help="video: frames per clip")
    parser.add_argument("--height", type=int, default=32, help="video: frame height in pixels")
    parser.add_argument("--width", type=int, default=32, help="video: frame width in pixels")
    parser.add_argument(
        "--entropy-scaling",
        type=int,
        default=None,
        metavar="TRAIN_TOKENS",
        help="video: run with EntropyScaling(train_tokens=TRAIN_TOKENS)",
    )
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--samples", type=int, default=24, help="samples shown in the PNG grid")
    parser.add_argument("--pag", type=float, default=None, help="perturbed-attention guidance scale (image model)")
    parser.add_argument(
        "--seg", type=float, default=None, help="smoothed energy guidance scale (image model, sigma=inf)"
    )
    parser.add_argument(
        "--guidance-layers",
        nargs="+",
        default=None,
        help="layers PAG / SEG perturb (regexes; default: the family's default, mid_block for UNets)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffattn_bench import embedded
    from diffattn_bench.scoring import evaluate_image, evaluate_video, shapes_prompts, summarize, summarize_videos

    if args.kind == "image":
        pipe = embedded.load_image_pipeline(args.model)
        count, guidance = args.prompts or 120, args.guidance or 4.0
    elif args.kind == "scenes":
        pipe = embedded.load_scenes_pipeline(args.model)
        count, guidance = args.prompts or 100, args.guidance or 4.0
    else:
        pipe = embedded.load_video_pipeline(args.model)
        count, guidance = args.prompts or 40, args.guidance or 4.0
    pipe.set_progress_bar_config(disable=True)
    if args.pag is not None or args.seg is not None:
        from diffattn import guidance as attention_guidance

        method = (
            attention_guidance.PAG(scale=args.pag, layers=args.guidance_layers)
            if args.pag is not None
            else attention_guidance.SEG(scale=args.seg, layers=args.guidance_layers)
        )
        attention_guidance.enable(pipe, method)
    if args.entropy_scaling is not None:
        import diffattn

        diffattn.apply(pipe, diffattn.EntropyScaling(train_tokens=args.entropy_scaling))
    out = args.out or Path(f"outputs/eval-{args.kind}")
    out.mkdir(parents=True, exist_ok=True)
    if args.kind == "scenes":
        from diffattn_bench.scene_scoring import evaluate_scene, scenes_prompts, summarize_scenes

        splits = ["train"] * count + ["held_out"] * count  # new images of trained combinations, then unseen ones
        prompts = scenes_prompts(count, "train") + scenes_prompts(count, "held_out")
        count = len(prompts)
    else:
        prompts = shapes_prompts(args.kind, count)
    outputs = []
    bar = tqdm(total=count, desc=f"generating {count} {args.kind}s", unit=args.kind)
    for start in range(0, count, args.batch):
        chunk = prompts[start : start + args.batch]
        generator = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
        if args.kind in ("image", "scenes"):
            side = 32 if args.kind == "image" else 64
            result = pipe(
                chunk,
                num_inference_steps=args.steps,
                guidance_scale=guidance,
                generator=generator,
                height=side,
                width=side,
                output_type="np",
            ).images
            bar.update(len(chunk))
        else:
            clips = []
            for p, g in zip(chunk, generator):  # one clip at a time: the bar moves per clip
                clips.append(
                    pipe(
                        p,
                        num_inference_steps=args.steps,
                        guidance_scale=guidance,
                        generator=g,
                        num_frames=args.frames,
                        height=args.height,
                        width=args.width,
                    ).frames
                )
                bar.update(1)
            result = np.concatenate(clips)
        outputs.extend((np.asarray(result).clip(0, 1) * 255).round().astype(np.uint8))
    bar.close()
    if args.kind == "scenes":
        results = [evaluate_scene(image, prompt) for image, prompt in zip(outputs, prompts)]
        scores = {
            split: summarize_scenes([r for r, s in zip(results, splits) if s == split])
            for split in ("train", "held_out")
        }
        shown = outputs[: args.samples]
    elif args.kind == "image":
        results = [evaluate_image(image, prompt) for image, prompt in zip(outputs, prompts)]
        summary = summarize(results)
        scores = {k: float(v) for k, v in vars(summary).items() if isinstance(v, (int, float))}
        shown = outputs[: args.samples]
    else:
        results = [evaluate_video(clip, prompt) for clip, prompt in zip(outputs, prompts)]
        scores = summarize_videos(results)
        shown = [np.concatenate(list(clip[::2]), axis=1) for clip in outputs[: min(args.samples, 12)]]
    scores.update(prompts=count, steps=args.steps, guidance=guidance, pag=args.pag, seg=args.seg)
    if args.kind == "video":
        scores.update(frames=args.frames, height=args.height, width=args.width, entropy_scaling=args.entropy_scaling)
    (out / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    for i, image in enumerate(outputs[:200]):
        frames = image if image.ndim == 3 else np.concatenate(list(image), axis=1)
        Image.fromarray(frames).save(out / f"{i:03d}.png")
    (out / "prompts.json").write_text(json.dumps({f"{i:03d}.png": p for i, p in enumerate(prompts[:200])}, indent=1))
    grid_image(shown, prompts[: len(shown)], 2 if args.kind == "video" else 6, 2, out / "samples.png")
    print(json.dumps(scores, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
