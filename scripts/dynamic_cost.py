"""What one ``DynamicSparseAttention`` call costs against dense SDPA on the same inputs, per top-k fraction: the
candidate costs ``diffattn.tune`` weighs, without a model.

    python scripts/dynamic_cost.py        # the embedded video model's shape: 2 x 4 heads x 32, 16x16x16 tokens
    python scripts/dynamic_cost.py --grid 16x32x32 --heads 12 --dim 64

Times are the fastest of ``--repeats`` rounds in which dense and every fraction take turns (a busy machine slows all
alike). Each row also gives the method's own split of its fastest call (``selection_seconds``: gathers into tile order,
scoring, the mask; ``attention_seconds``: the value gather, the kernel, the scatter back). Runs without
gradients, as a pipeline does.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from diffattn import TokenLayout
from diffattn.methods.dynamic_sparse import DynamicSparseAttention
from diffattn.testing import standalone_context
from diffattn_kernels import cpu_block_sparse


def _grid(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a grid is FxHxW in tokens, e.g. 16x16x16; got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=_grid, default=(16, 16, 16), help="token grid (16x16x16 = 4,096 tokens)")
    parser.add_argument("--batch", type=int, default=2, help="batch entries (2: a CFG batch)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--topk", type=float, nargs="+", default=[0.05, 0.1, 0.3, 0.5])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    tokens = 1
    for n in args.grid:
        tokens *= n
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(args.batch, args.heads, tokens, args.dim, generator=g).to(dtype) for _ in range(3))
    ctx, reports = standalone_context(TokenLayout(args.grid), step=0, num_steps=10)
    methods = {f"top-k {f:g}": DynamicSparseAttention(topk=f) for f in args.topk}
    calls = {"dense SDPA": lambda: F.scaled_dot_product_attention(q, k, v)}
    calls.update({name: (lambda m=m: m(q, k, v, ctx)) for name, m in methods.items()})
    best = dict.fromkeys(calls, float("inf"))
    split: dict[str, dict] = {}
    with torch.no_grad():
        for fn in calls.values():
            fn()  # warm-up: kernel build and first allocations, untimed
        for _ in range(args.repeats):
            for name, fn in calls.items():
                start = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - start
                if elapsed < best[name]:
                    best[name] = elapsed
                    if name in methods:
                        split[name] = dict(reports)  # the split of the fastest call
    print(f"{cpu_block_sparse.cpu_model()}, {torch.get_num_threads()} threads; CPU loop: {cpu_block_sparse.status()}")
    print(f"q, k, v {tuple(q.shape)} {args.dtype}, grid {args.grid}; fastest of {args.repeats} rounds")
    dense = best["dense SDPA"]
    print(f"{'call':>12} {'ms':>8} {'/ dense':>8} {'selection ms':>13} {'attention ms':>13} {'density':>8}")
    print(f"{'dense SDPA':>12} {dense * 1e3:8.2f} {1.0:8.2f}")
    for name in methods:
        r = split[name]
        print(
            f"{name:>12} {best[name] * 1e3:8.2f} {best[name] / dense:8.2f} {r['selection_seconds'] * 1e3:13.2f} "
            f"{r['attention_seconds'] * 1e3:13.2f} {r['density']:8.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
