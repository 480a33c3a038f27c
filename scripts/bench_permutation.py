"""Semantic-aware permutation (Sparse VideoGen 2) on the CPU: one attention call of DynamicSparseAttention at a top-k
budget with and without ``permute=SemanticPermutation(...)``, against dense SDPA, in one process on the same inputs.

Times (the fastest of ``--repeats`` rounds; the methods take turns in every round, so a busy machine slows all alike):
dense SDPA; the plain method (video tiles, ``tile="auto"``); the permuted method at a generation's first call
(k-means from farthest-point seeds), at a later refresh (k-means warm-started from the cached centroids) and between
refreshes (tokens assigned to the cached centroids only). The permuted rows split their time into clustering, gathers
and scatter, block selection (pooling, scoring, the mask) and the kernel. Errors: relative L2 distance to dense
attention (float64 reference) of each method's output.

Inputs (``--source``): ``clustered`` (default) draws keys and queries around ``--groups`` centres per head, each token's
centre at random, so the attention mass is clustered but scattered over the grid (the case the permutation is for; it
favours it by construction). ``model`` takes q, k, v of one self-attention call of the embedded video model
(shapes-video, 4 heads x 32) at ``--model-step`` of a generation at 16 frames x 64 x 64 px (4,096 tokens; the other
sizes are ignored).

    python scripts/bench_permutation.py                   # 4,096 tokens, 12 heads x 64, topk 0.25
    python scripts/bench_permutation.py --tokens 16384    # 16 x 32 x 32 tokens
    python scripts/bench_permutation.py --source model
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import diffattn
from diffattn import TokenLayout
from diffattn.methods.dynamic_sparse import DynamicSparseAttention
from diffattn.methods.permutation import SemanticPermutation
from diffattn.testing import standalone_context
from diffattn_kernels import cpu_block_sparse

FRAMES = 16
MODEL_DIR = Path(__file__).resolve().parent.parent / "pipelines" / "diffattn_bench" / "assets" / "shapes-video"


def grid_for(tokens: int) -> tuple[int, int, int]:
    """``(16, s, s)`` with ``16 s² = tokens``."""
    side = math.isqrt(tokens // FRAMES)
    if FRAMES * side * side != tokens:
        raise SystemExit(f"--tokens {tokens}: give 16 x s x s tokens, e.g. 4096 (16x16x16) or 16384 (16x32x32)")
    return (FRAMES, side, side)


def clustered_inputs(
    grid: tuple[int, ...], heads: int, dim: int, groups: int, sharpness: float, seed: int
) -> tuple[torch.Tensor, ...]:
    """q, k, v ``(1, H, S, D)`` float64: keys and queries around ``groups`` unit centres per head (plus noise of norm
    ~0.5), each token's centre drawn at random, scaled so that a query and a key of one centre score ``sharpness``
    (``q·k / sqrt(D)``) and of two centres ~0: a query attends mostly the keys of its centre. Values random."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(grid)
    centres = F.normalize(torch.randn(heads, groups, dim, generator=g, dtype=torch.float64), dim=-1)
    radius = math.sqrt(sharpness) * dim**0.25

    def around() -> torch.Tensor:
        which = torch.randint(groups, (heads, n), generator=g)
        picked = centres.gather(1, which.unsqueeze(-1).expand(heads, n, dim))
        noise = 0.5 * torch.randn(heads, n, dim, generator=g, dtype=torch.float64) / dim**0.5
        return (radius * (picked + noise)).unsqueeze(0)

    return around(), around(), torch.randn(1, heads, n, dim, generator=g, dtype=torch.float64)


@dataclass(frozen=True)
class _Capture(diffattn.AttentionMethod):
    """Dense attention that keeps q, k, v of the calls at ``step``."""

    step: int
    seen: list = field(default_factory=list, compare=False)
    roles: frozenset = frozenset({"self"})

    def __call__(self, q, k, v, ctx):
        if ctx.step == self.step:
            self.seen.append((q.detach().clone(), k.detach().clone(), v.detach().clone(), ctx.q_layout.grid))
        return ctx.dense(q, k, v)


def model_inputs(step: int, layer: int) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...]]:
    """q, k, v of the conditional pass of self-attention ``layer`` of the embedded video model at ``step`` (of 10)."""
    from diffattn_bench.shapes_video import ShapesVideoPipeline

    pipe = ShapesVideoPipeline.from_pretrained(str(MODEL_DIR))
    pipe.set_progress_bar_config(disable=True)
    capture = _Capture(step)
    pattern = rf"blocks\.{layer}\.attn1"
    with torch.no_grad(), diffattn.apply(pipe, capture, layers=[pattern]):
        pipe(
            "a red circle on the left moving right",
            num_frames=16,
            height=64,
            width=64,
            num_inference_steps=10,
            generator=torch.Generator().manual_seed(0),
        )
    if not capture.seen:
        raise SystemExit(f"no self-attention call matched {pattern} at step {step}")
    q, k, v, grid = capture.seen[-1]
    return (q[-1:], k[-1:], v[-1:]), grid


def timed_call(method, q, k, v, layout: TokenLayout, step: int) -> tuple[float, dict, torch.Tensor]:
    ctx, metrics = standalone_context(layout, step=step, num_steps=50)
    start = time.perf_counter()
    out = method(q, k, v, ctx)
    return time.perf_counter() - start, metrics, out


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.double() - reference).norm() / reference.norm())


def run(args: argparse.Namespace, tokens: int) -> dict:
    if args.source == "model":
        (q, k, v), grid = model_inputs(args.model_step, args.model_layer)
        q, k, v = (x.to(torch.float64) for x in (q, k, v))
    else:
        grid = grid_for(tokens)
        q, k, v = clustered_inputs(grid, args.heads, args.dim, args.groups, args.sharpness, args.seed)
    layout = TokenLayout(grid)
    reference = F.scaled_dot_product_attention(q, k, v)  # float64
    dtype = getattr(torch, args.dtype)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    option = SemanticPermutation(args.clusters_q, args.clusters_k, args.iterations, args.refresh_every)
    plain = DynamicSparseAttention(topk=args.topk, block_size=args.block_size)
    permuted = DynamicSparseAttention(topk=args.topk, block_size=args.block_size, permute=option)

    def dense() -> tuple[float, dict, torch.Tensor]:
        start = time.perf_counter()
        out = F.scaled_dot_product_attention(q, k, v)
        return time.perf_counter() - start, {}, out

    def first_call() -> tuple[float, dict, torch.Tensor]:
        permuted.reset()  # a new generation: k-means from seeds
        return timed_call(permuted, q, k, v, layout, 0)

    cases = {
        "dense": dense,
        "plain": lambda: timed_call(plain, q, k, v, layout, 0),
        "permuted, first call": first_call,
        "permuted, between refreshes": lambda: timed_call(permuted, q, k, v, layout, 1),
        "permuted, warm refresh": lambda: timed_call(permuted, q, k, v, layout, args.refresh_every),
    }
    best: dict[str, tuple[float, dict]] = {}
    errors: dict[str, float] = {}
    for round_ in range(args.repeats + 1):  # round 0 warms up (and builds the CPU loop)
        for name, case in cases.items():
            seconds, metrics, out = case()
            if round_ == 0:
                errors[name] = relative_error(out, reference)
            elif name not in best or seconds < best[name][0]:
                best[name] = (seconds, metrics)
    dense_s = best["dense"][0]
    rows = []
    for name, (seconds, metrics) in best.items():
        row = {
            "case": name,
            "seconds": seconds,
            "speedup": dense_s / seconds,
            "rel_l2": errors[name],
            "density": metrics.get("density", 1.0),
        }
        if "clustering_seconds" in metrics:
            row |= {
                "clustering_s": metrics["clustering_seconds"],
                "gather_scatter_s": metrics["permute_seconds"],
                "kernel_s": metrics["kernel_seconds"],
            }
            row["selection_s"] = seconds - row["clustering_s"] - row["gather_scatter_s"] - row["kernel_s"]
        elif "selection_seconds" in metrics:
            row |= {"selection_s": metrics["selection_seconds"], "attention_s": metrics["attention_seconds"]}
        rows.append(row)
    clusters = option.clusters(layout.num_visual, args.block_size)
    return {
        "tokens": layout.num_visual,
        "grid": grid,
        "heads": q.shape[1],
        "dim": q.shape[-1],
        "source": args.source,
        "clusters_q_k": clusters,
        "rows": rows,
    }


def print_table(result: dict) -> None:
    print(
        f"\n{result['tokens']} tokens {result['grid']}, {result['heads']} heads x {result['dim']}, "
        f"inputs: {result['source']}, clusters (q, k) = {result['clusters_q_k']}"
    )
    head = f"{'case':30} {'time s':>8} {'x dense':>8} {'rel L2':>8} {'density':>8}  parts (s)"
    print(head)
    print("-" * len(head))
    for row in result["rows"]:
        if "clustering_s" in row:
            parts = (
                f"clustering {row['clustering_s']:.3f}, gather/scatter {row['gather_scatter_s']:.3f}, "
                f"selection {row['selection_s']:.3f}, kernel {row['kernel_s']:.3f}"
            )
        elif "selection_s" in row:
            parts = f"selection {row['selection_s']:.3f}, attention {row['attention_s']:.3f}"
        else:
            parts = ""
        print(
            f"{row['case']:30} {row['seconds']:8.3f} {row['speedup']:8.2f} {row['rel_l2']:8.4f} "
            f"{row['density']:8.3f}  {parts}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096], help="16 x s x s tokens each (clustered)")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--topk", type=float, default=0.25)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--clusters-q", type=int, default=None, help="default: one per block")
    parser.add_argument("--clusters-k", type=int, default=None, help="default: one per block")
    parser.add_argument("--iterations", type=int, default=SemanticPermutation.iterations)
    parser.add_argument("--refresh-every", type=int, default=SemanticPermutation.refresh_every)
    parser.add_argument("--groups", type=int, default=64, help="centres per head of the clustered inputs")
    parser.add_argument("--sharpness", type=float, default=5.0, help="clustered inputs: q·k/sqrt(D) within a centre")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--source", choices=["clustered", "model"], default="clustered")
    parser.add_argument("--model-step", type=int, default=5, help="--source model: the step (of 10) to capture")
    parser.add_argument("--model-layer", type=int, default=2, help="--source model: the transformer block")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_block_sparse.cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = []
    for tokens in args.tokens if args.source == "clustered" else [4096]:
        result = run(args, tokens)
        print_table(result)
        results.append(result)
    print(f"\nCPU loop: {cpu_block_sparse.status()}")
    if args.json is not None:
        args.json.write_text(json.dumps({"cpu": cpu_block_sparse.cpu_model(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
