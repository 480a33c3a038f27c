"""The demo's Layout examples on an embedded image model: in how many runs bounded attention draws every subject in its
colour with its centre inside its box (read from the pixels with the model's own scorer), at a given step count.

    python scripts/eval_demo_layout.py --model shapes-image --steps 8 --seeds 5
    python scripts/eval_demo_layout.py --model shapes-scenes --steps 20 --seeds 5

Each example of the model's Layout tab (``diffattn_demo.models.IMAGE_MODELS[...].prompts.layout_examples``) runs with
seeds 0 .. seeds - 1 at the demo's CFG; a subject's colour is the prompt's word just before its subject word.
"""

from __future__ import annotations

import argparse

import numpy as np
from tqdm import tqdm

from diffattn.editing import layout
from diffattn_bench.scoring import in_boxes
from diffattn_demo.images import to_uint8
from diffattn_demo.inputs import parse_subjects
from diffattn_demo.models import CFG, IMAGE_MODELS, Models


def objects(model: str, image: np.ndarray) -> list[tuple[str, tuple[float, float]]]:
    """(colour, centre as fractions of the image) of every object the model's scorer reads."""
    if model == "shapes-image":
        from diffattn_bench.scoring import segment

        return [(c.colour, c.centroid) for c in segment(image).components]
    from diffattn_bench.scene_scoring import read_scene

    return [(o.colour, o.centre) for o in read_scene(image).objects]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(IMAGE_MODELS), default="shapes-image")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args(argv)
    models = Models(embedded_image=args.model)
    good = total = 0
    examples = IMAGE_MODELS[args.model].prompts.layout_examples
    with models.image() as pipe:
        for prompt, text in examples:
            subjects = parse_subjects(text)
            colours = [prompt.split(f" {word}")[0].split()[-1] for word, _ in subjects]
            wanted = [(colour, box) for colour, (_, box) in zip(colours, subjects)]
            for seed in tqdm(range(args.seeds), desc=prompt, leave=False):
                image = layout(pipe, prompt, subjects, seed=seed, num_inference_steps=args.steps, guidance_scale=CFG)
                found = objects(args.model, to_uint8(image))
                ok = in_boxes(found, wanted)
                good, total = good + ok, total + 1
                print(f"{prompt!r} seed {seed}: {'placed' if ok else 'NOT placed'}; read {found}")
    print(f"{args.model}, {args.steps} steps: every subject in its colour inside its box in {good} of {total} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
