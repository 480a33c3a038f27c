"""ToDo (token downsampling) on a UNet above its native resolution: time of one denoiser forward (batch 2, as with
classifier-free guidance) with stock attention and with ToDo at factors 2 and 4, and how far ToDo's prediction is
from the stock one. Same process, same inputs; the methods take turns for ``--repeats`` rounds; the speedup is from
the fastest round of each (the least disturbed by other work on the machine), the median is shown too.

    python scripts/bench_todo.py                      # tiny SD1.5-layout UNet at 4x its native token count
    python scripts/bench_todo.py --config sd15 --scale 2   # SD1.5's own UNet config (random weights), 2x tokens
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

import diffattn
from diffattn.methods.downsampling import TokenDownsampling
from diffattn.testing import tiny_inputs, tiny_model


def sd15_unet() -> torch.nn.Module:
    """SD1.5's UNet2DConditionModel config with random weights (native latent 64 x 64)."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DConditionModel(
            sample_size=64,
            cross_attention_dim=768,
            attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280),
        ).eval()


def interleaved_times(model, inputs, methods: dict, repeats: int) -> dict[str, list[float]]:
    """Forward times per method, the methods taking turns in every round (a busy machine slows all alike)."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for round_ in range(repeats + 1):  # round 0 warms up
        for name, method in methods.items():
            handle = diffattn.apply(model, method) if method is not None else None
            try:
                start = time.perf_counter()
                model(**inputs)
                elapsed = time.perf_counter() - start
            finally:
                if handle is not None:
                    handle.remove()
            if round_:
                times[name].append(elapsed)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--scale", type=float, default=4.0, help="token count relative to the native resolution")
    parser.add_argument("--factors", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_todo.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = tiny_model("unet_sd15") if args.config == "tiny" else sd15_unet()
    native = model.config.sample_size
    side = round(native * math.sqrt(args.scale))
    inputs = tiny_inputs("unet_sd15", (side, side), batch=2)
    if args.config == "sd15":
        inputs["encoder_hidden_states"] = torch.randn(2, 77, model.config.cross_attention_dim)
    methods = {"dense (stock)": None, **{f"ToDo {f}x": TokenDownsampling(factor=f) for f in args.factors}}
    rows = []
    with torch.no_grad():
        stock = model(**inputs)[0]
        times = interleaved_times(model, inputs, methods, args.repeats)
        dense_s = min(times["dense (stock)"])
        rows.append(
            {"method": "dense (stock)", "seconds": dense_s, "median_s": statistics.median(times["dense (stock)"])}
        )
        for name, method in methods.items():
            if method is None:
                continue
            with diffattn.apply(model, method) as handle:
                out = model(**inputs)[0]
                metrics = handle.metrics()
            diff = out - stock
            seconds = min(times[name])
            rows.append(
                {
                    "method": name,
                    "seconds": seconds,
                    "median_s": statistics.median(times[name]),
                    "speedup": dense_s / seconds,
                    "max_abs_diff": float(diff.abs().max()),
                    "rel_l2_diff": float(diff.norm() / stock.norm()),
                    "key_density_top_level": min(m["density"] for m in metrics.values()),
                }
            )
    title = (
        f"{args.config} UNet, latent {side}x{side} = {side * side} tokens at the top level "
        f"({args.scale:g}x native {native}x{native}), batch 2, {torch.get_num_threads()} threads"
    )
    print(title)
    print(
        f"{'method':14s} {'min s':>9s} {'median s':>9s} {'speedup':>8s} {'max |diff|':>10s} {'rel L2':>8s} "
        f"{'key density':>11s}"
    )
    for r in rows:
        print(
            f"{r['method']:14s} {r['seconds']:9.3f} {r['median_s']:9.3f} {r.get('speedup', 1.0):8.2f} "
            f"{r.get('max_abs_diff', 0.0):10.4f} "
            f"{r.get('rel_l2_diff', 0.0):8.4f} {r.get('key_density_top_level', 1.0):11.3f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"title": title, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
