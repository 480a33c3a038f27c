"""How far bf16 attention moves the embedded video model from float32 (issue #30): every self-attention call computed
on q, k, v cast to bfloat16 (SDPA, full density), the rest of the model in float32, against the stock float32 run.

    python scripts/bf16_attention.py --size 16x64x64 --prompts 2 --steps 10

Prints the CPU, the PSNR of the bf16 clips against the float32 ones (pooled over the clips) and both times (the
same prompts and seeds, one process; run it on an idle machine for the times to mean anything).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

import diffattn
from diffattn.context import AttentionContext
from diffattn.tuning.tune import pooled_psnr
from diffattn_bench import embedded
from diffattn_bench.compare import ClipSize
from diffattn_bench.scoring import shapes_prompts
from diffattn_kernels import cpu_block_sparse


@dataclass(frozen=True)
class Bf16Dense(diffattn.AttentionMethod):
    """The stock attention core on q, k, v cast to bfloat16, cast back to the call's dtype."""

    roles: frozenset[str] = field(default=frozenset({"self"}))

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        return ctx.dense(q.bfloat16(), k.bfloat16(), v.bfloat16()).to(q.dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="16x64x64", help="FRAMESxHEIGHTxWIDTH (16x64x64)")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = ClipSize(*(int(x) for x in args.size.lower().split("x")))
    pipe = embedded.load_video_pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts = shapes_prompts("video", args.prompts)  # diffattn compare's report prompts

    def generate() -> list:
        return [
            pipe(
                p,
                num_frames=size.frames,
                height=size.height,
                width=size.width,
                num_inference_steps=args.steps,
                generator=torch.Generator().manual_seed(i),
                output_type="np",
            ).frames[0]
            for i, p in enumerate(prompts)
        ]

    def timed() -> tuple[list, float]:
        generate()  # warm-up
        start = time.perf_counter()
        clips = generate()
        return clips, time.perf_counter() - start

    reference, dense_s = timed()
    with diffattn.apply(pipe, Bf16Dense()):
        clips, bf16_s = timed()
    print(
        f"{cpu_block_sparse.cpu_model()}, {torch.get_num_threads()} threads; {size.label}, {len(prompts)} prompts x "
        f"{args.steps} steps: bf16 attention {pooled_psnr(clips, reference):.1f} dB against float32; "
        f"float32 {dense_s:.1f} s, bf16 attention {bf16_s:.1f} s ({dense_s / bf16_s:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
