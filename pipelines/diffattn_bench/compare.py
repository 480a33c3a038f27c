"""``diffattn compare``: diffattn's methods and the tools a diffusers user would pick instead, in one process, on
the embedded models, with speed and quality from the same run.

Video (the embedded Wan-architecture model): at the size where dense attention is right (``quality`` size), every
run generates the same ShapesBench prompts with the same seeds; the table has the end-to-end time and speedup over
stock dense attention, the time in attention cores, the Amdahl bound the model allows for that attention speedup
and the reach, ShapesBench's trajectory error, positions and object-frames of the prompted colour and shape, and
PSNR / SSIM against dense. A run passes when its trajectory error, positions and objects meet ShapesBench's bar and
its object-frames of the right shape are at most ``SHAPE_FRAMES_TOLERANCE`` below stock dense attention's on the
same prompts and seeds; dense's own rate is reported against the model's bar ``PASS_SHAPE_FRAMES``
(:func:`shape_note`). The length-extension part runs dense and each sparse method, with and without
:class:`~diffattn.EntropyScaling`, at 4x the frames.
Image (the embedded SD1.5-format model at 4x its native token count): ToDo against tomesd, speed and ShapesBench.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import diffattn
from diffattn_bench.scoring import (
    evaluate_image,
    evaluate_video,
    psnr,
    ssim,
    summarize,
    summarize_videos,
)
from diffattn_kernels import cpu_block_sparse

from .method_names import METHOD_NAMES
from .peers import (
    UNSUPPORTED_CACHE_HOOKS,
    NattenTile,
    Peer,
    cache_peers,
    calibrated_cache_peer,
    combined,
    method_peer,
    tomesd_peer,
)

__all__ = [
    "ClipSize",
    "CompareRow",
    "Timed",
    "default_methods",
    "video_peers",
    "extension_runs",
    "run_video",
    "run_image",
    "format_markdown",
    "passes",
    "failures",
    "save_outputs",
    "shape_note",
]

PASS_TRAJECTORY_ERROR = 0.04  # ShapesBench's bar (model card): below it an object follows most of its path
PASS_POSITIONS = 0.9
#: Object-frames (objects x frames) with the prompted colour and shape that dense attention must reach on the embedded
#: video model (#28); a model below it cannot show what a method costs in shapes, and the compare says so.
PASS_SHAPE_FRAMES = 0.85
#: How far a run's object-frames of the right shape may fall below stock dense attention's (same prompts and seeds) and
#: still pass: about one object in one frame of the default 2 prompts x 16 frames (~48 object-frames is 0.02 each).
SHAPE_FRAMES_TOLERANCE = 0.05
DENSE_REFERENCE = "dense (stock)"


@dataclass(frozen=True)
class Timed(diffattn.AttentionMethod):
    """Runs ``inner`` and records the wall time of every attention core it computes."""

    inner: diffattn.AttentionMethod
    seconds: list = field(default_factory=list, compare=False)

    @property
    def roles(self) -> frozenset[str]:  # type: ignore[override]
        return self.inner.roles

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def requires_step(self) -> bool:  # type: ignore[override]
        return self.inner.requires_step

    @property
    def requires_roles(self) -> bool:  # type: ignore[override]
        return self.inner.requires_roles

    def validate(self, ctx) -> None:
        self.inner.validate(ctx)

    def __call__(self, q, k, v, ctx):
        start = time.perf_counter()
        out = self.inner(q, k, v, ctx)
        self.seconds.append(time.perf_counter() - start)
        return out


@dataclass(frozen=True)
class ClipSize:
    frames: int
    height: int
    width: int

    def grid(self, patch: Sequence[int]) -> tuple[int, int, int]:
        sides = (self.frames, self.height, self.width)
        if any(n % p for n, p in zip(sides, patch)):
            raise ValueError(
                f"a {self.label} clip does not split into the model's {'x'.join(map(str, patch))} "
                "patches; use frames, height and width that are multiples of them"
            )
        return (self.frames // patch[0], self.height // patch[1], self.width // patch[2])

    def tokens(self, patch: Sequence[int]) -> int:
        return math.prod(self.grid(patch))

    @property
    def label(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


QUALITY_SIZE = ClipSize(16, 64, 64)  # where dense attention passes ShapesBench: the compare's default (4,096 tokens)


def default_methods(grid: tuple[int, ...]) -> dict[str, diffattn.AttentionMethod]:
    """diffattn's methods on a ``(frames, h, w)`` token grid, set for the embedded video model at 16 x 64 x 64 px.

    Tiles are up to 4 frames x 8 x 8 tokens (256 tokens, the CPU loop's block); sliding tile keeps two tiles in time
    and one band of rows (density 0.25 there). This model attends across the whole frame, so local windows cost it
    quality: ``scripts/sweep_compare_methods.py`` at 4,096 tokens (2 prompts x 10 steps) put top-k 0.125 at trajectory
    error 0.067 with 64-token tiles and 0.049 with 256-token tiles, top-k 0.25 at 0.0375 (passes), PSA's bands (0.08,
    0.12, 0.2, 0.35) at 0.027 (passes; the paper's sparser bands: 0.052), ToDo 2x at 0.041 and 3x at 0.061; sliding tile
    passes (0.028) only from density 0.75. Re-ttention's density counts its calibration steps (dense + sparse), so it
    pays off only over more steps.
    """
    from diffattn.methods.downsampling import TokenDownsampling
    from diffattn.methods.dynamic_sparse import DynamicSparseAttention
    from diffattn.methods.pyramid import PyramidSparseAttention
    from diffattn.methods.rettention import Rettention

    tile = tuple(min(t, n) for t, n in zip((4, 8, 8), grid))
    methods = (  # in the order of METHOD_NAMES
        diffattn.SlidingTileAttention(tile=tile, window=(2, 1, 4)),  # sliding tile
        diffattn.RadialAttention(decay=0.2),  # radial
        diffattn.SlidingWindowAttention(window=tuple(min(w, n) for w, n in zip((5, 9, 9), grid))),  # sliding window
        DynamicSparseAttention(topk=0.25, tile=tile),  # dynamic top-k
        PyramidSparseAttention(bands=(0.08, 0.12, 0.2, 0.35), tile=tile),  # pyramid (PSA)
        Rettention(base=DynamicSparseAttention(topk=0.125, tile=tile), calibrate_every=5),  # re-ttention
        TokenDownsampling(factor=2),  # ToDo 2x: keys and values on a 2x coarser grid per frame: 1/4
    )
    return dict(zip(METHOD_NAMES, methods, strict=True))


def profile_peer(folder: Path) -> Peer:
    """The row of a tuned profile (``diffattn.tune``, e.g. ``scripts/tune_video.py``) saved in ``folder``."""
    profile = diffattn.TunedProfile.load(folder)
    settings = (
        f"{profile.family} tuned per layer x {profile.step_ranges} step ranges x head to relative L1 "
        f"{profile.error_target:g} on {len(profile.calibration)} calibration prompts; mean top-k "
        f"{profile.mean_budget():.3f}; computed in {profile.compute_dtype or 'the model dtype'} ({folder})"
    )
    return method_peer(f"tuned top-k ({Path(folder).name})", profile.method(), settings=settings)


#: The cache hooks a tuned profile is stacked under (issue #30): each row is the hook with the profile's attention.
STACKED_CACHES = ("MagCache", "FirstBlockCache 0.1", "PyramidAttentionBroadcast", "FasterCache", "SeaCache")


def profile_peers(folder: Path, mag_ratios: Sequence[float] | None, steps: int) -> list[Peer]:
    """A tuned profile's row, then the profile under each of :data:`STACKED_CACHES` (MagCache only with ratios); a
    profile tuned under a calibrated cache (``scripts/tune_video.py --cache``: ``cache.json`` beside it) adds that
    cache alone and the two together, the row the profile was tuned for."""
    tuned = profile_peer(folder)
    caches = {p.label: p for p in cache_peers(mag_ratios, steps)}
    rows = [tuned] + [
        combined(f"{name} + {tuned.label}", caches[name], tuned) for name in STACKED_CACHES if name in caches
    ]
    if diffattn.CacheCalibration.exists(folder):
        calibrated = calibrated_cache_peer(diffattn.CacheCalibration.load(folder))
        rows += [calibrated, combined(f"{calibrated.label} + {tuned.label}", calibrated, tuned)]
    return rows


def video_peers(
    grid: tuple[int, ...], mag_ratios: Sequence[float] | None, steps: int, *, natten: bool = True
) -> list[Peer]:
    """Every run of the video comparison after stock dense: diffattn's dense and sparse methods, NATTEN (``natten``:
    its CPU path materialises the scores, ~18x slower than dense at 4,096 tokens in the --full run) and compiled
    FlexAttention with the sliding-tile pattern, diffusers' cache hooks and two combinations."""
    methods = default_methods(grid)
    tile_method = methods["sliding tile"]
    peers = [method_peer("dense (diffattn)", diffattn.Dense())]
    peers += [method_peer(name, method) for name, method in methods.items()]
    if natten:
        peers.append(
            method_peer(
                "sliding tile: NATTEN",
                NattenTile(tile=tile_method.tile, window=tile_method.window),
                kind="NATTEN",
                settings=f"na3d flex-fna, kernel = window x tile {tile_method.tile}",
            )
        )
    flex = diffattn.SlidingTileAttention(tile=tile_method.tile, window=tile_method.window, backend="flex-compiled")
    peers.append(
        method_peer(
            "sliding tile: compiled FlexAttention",
            flex,
            kind="FlexAttention",
            warmup=True,
            settings="diffattn's block mask, torch.compile'd flex_attention (compiled before timing)",
        )
    )
    caches = cache_peers(mag_ratios, steps)
    peers += caches
    by_label = {p.label: p for p in caches}
    tile_peer = method_peer("sliding tile", tile_method)
    peers.append(combined("FirstBlockCache 0.2 + sliding tile", by_label["FirstBlockCache 0.2"], tile_peer))
    peers.append(combined("TaylorSeer + sliding tile", by_label["TaylorSeer"], tile_peer))
    return peers


def select_runs(peers: Sequence[Peer], only: Sequence[str]) -> list[Peer]:
    """The runs whose label contains one of ``only`` (all when it is empty), with diffattn's dense always kept (the
    attention-time reference of the Amdahl bound). A text no label contains is refused, listing the labels."""
    if not only:
        return list(peers)
    unknown = [text for text in only if not any(text in p.label for p in peers)]
    if unknown:
        raise ValueError(
            f"--only {', '.join(repr(t) for t in unknown)} matches no run; runs: {', '.join(p.label for p in peers)}"
        )
    return [p for p in peers if isinstance(p.method, diffattn.Dense) or any(text in p.label for text in only)]


def extension_runs(grid: tuple[int, ...], train_tokens: int) -> list[Peer]:
    """Length extension: dense and each static / dynamic sparse method, alone and with EntropyScaling."""
    methods = {k: v for k, v in default_methods(grid).items() if k != "re-ttention"}
    runs = [
        method_peer("dense (diffattn)", diffattn.Dense()),
        method_peer("dense + entropy scaling", diffattn.EntropyScaling(train_tokens=train_tokens)),
    ]
    for name, method in methods.items():
        runs.append(method_peer(name, method))
        runs.append(
            method_peer(f"{name} + entropy scaling", diffattn.EntropyScaling(train_tokens=train_tokens, base=method))
        )
    return runs


@dataclass
class CompareRow:
    method: str
    kind: str
    size: str
    tokens: int
    seconds: float
    settings: str = ""
    attention_seconds: float = math.nan
    density: float = math.nan
    selection_seconds: float = 0.0
    speedup: float = 1.0
    attention_speedup: float = math.nan
    amdahl_bound: float = math.nan
    psnr: float = math.inf
    ssim: float = 1.0
    scores: dict = field(default_factory=dict)
    error: str = ""

    @property
    def reach(self) -> float:
        return self.speedup / self.amdahl_bound if math.isfinite(self.amdahl_bound) else math.nan


def _clip_uint8(clip: np.ndarray) -> np.ndarray:
    return (np.asarray(clip).clip(0, 1) * 255).round().astype(np.uint8)


def _run(
    pipe: Any, peer: Peer, generate: Callable[[], list[np.ndarray]], warm: Callable[[], Any] | None = None
) -> tuple[list[np.ndarray], float, Timed | None, dict, dict]:
    timed = Timed(peer.method) if peer.method is not None else None
    undo = peer.setup(pipe) if peer.setup is not None else None
    handle = None
    try:
        if peer.warmup and warm is not None:
            with diffattn.apply(pipe, peer.method, steps=None) if peer.method is not None else contextlib.nullcontext():
                warm()
        handle = diffattn.apply(pipe, timed, steps=None) if timed is not None else None
        start = time.perf_counter()
        outputs = generate()
        elapsed = time.perf_counter() - start
        metrics = {} if handle is None else handle.metrics()
        acted = {} if handle is None else handle.acted_calls()
    finally:
        if handle is not None:
            handle.remove()
        if undo is not None:
            undo()
    return outputs, elapsed, timed, metrics, acted


def _measure(
    pipe: Any,
    runs: Sequence[Peer],
    generate: Callable[[], list[np.ndarray]],
    warm: Callable[[], Any],
    score: Callable[[list[np.ndarray]], dict],
    size: str,
    tokens: int,
    desc: str,
) -> tuple[list[CompareRow], dict[str, list[np.ndarray]]]:
    """Run every peer in turn: time, attention time, density, selection time and ``score`` of its outputs. A peer that
    fails on this model is reported as a failed row, not hidden, and the rest still run."""
    rows: list[CompareRow] = []
    outputs: dict[str, list[np.ndarray]] = {}
    for peer in tqdm(runs, desc=desc, unit="run"):
        try:
            out, elapsed, timed, metrics, acted = _run(pipe, peer, generate, warm)
        except Exception as exc:
            rows.append(
                CompareRow(
                    peer.label,
                    peer.kind,
                    size,
                    tokens,
                    math.nan,
                    peer.settings,
                    error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}",
                )
            )
            continue
        densities = [m["density"] for m in metrics.values() if "density" in m]
        outputs[peer.label] = out
        rows.append(
            CompareRow(
                peer.label,
                peer.kind,
                size,
                tokens,
                elapsed,
                peer.settings,
                attention_seconds=sum(timed.seconds) if timed is not None else math.nan,
                density=sum(densities) / len(densities)
                if densities
                else (1.0 if peer.method is not None else math.nan),
                selection_seconds=sum(
                    m.get("selection_seconds", 0.0) * acted.get(layer, 0) for layer, m in metrics.items()
                ),
                scores=score(out),
            )
        )
    return rows, outputs


def run_video(
    pipe: Any,
    size: ClipSize,
    peers: Sequence[Peer],
    *,
    prompts: Sequence[str],
    steps: int,
    seed: int = 0,
    guidance: float = 4.0,
    desc: str = "video",
) -> tuple[list[CompareRow], dict[str, np.ndarray]]:
    """Stock dense attention, then every peer, generating ``prompts`` (seeds ``seed + i``) at ``size``. Returns the
    rows (quality scored with ShapesBench, PSNR / SSIM against stock dense) and the first prompt's clip per run."""
    patch = pipe.transformer.config.patch_size
    tokens = size.tokens(patch)

    def generate(count_steps: int = steps, only: int | None = None) -> list[np.ndarray]:
        chosen = prompts if only is None else prompts[:only]
        return [
            np.asarray(
                pipe(
                    p,
                    num_frames=size.frames,
                    height=size.height,
                    width=size.width,
                    num_inference_steps=count_steps,
                    guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(seed + i),
                    output_type="np",
                ).frames[0]
            )
            for i, p in enumerate(chosen)
        ]

    # one untimed step first: the first generation would otherwise pay one-time costs (GEMM kernel creation,
    # allocator growth, loading the compiled attention loop) inside the stock dense time every ratio divides
    cpu_block_sparse.extension()
    generate(1, only=1)
    runs = [Peer(DENSE_REFERENCE, "stock", "diffusers' own attention processor"), *peers]
    rows, clips = _measure(
        pipe,
        runs,
        generate,
        lambda: generate(1, only=1),
        lambda out: summarize_videos([evaluate_video(_clip_uint8(c), p) for c, p in zip(out, prompts)]),
        size.label,
        tokens,
        f"{desc}: {size.label} ({tokens} tokens), {len(prompts)} prompts",
    )
    timing = next((p.label for p in peers if isinstance(p.method, diffattn.Dense)), None)
    _finish(rows, clips, reference=DENSE_REFERENCE, timing_reference=timing)
    shapes_against_dense(rows)
    return rows, {label: c[0] for label, c in clips.items()}


def shapes_against_dense(rows: Sequence[CompareRow], reference: str = DENSE_REFERENCE) -> None:
    """Add ``shape_frames_vs_dense`` (the run's object-frames of the right shape minus ``reference``'s, same prompts and
    seeds) to every scored row's scores: what :func:`passes` holds against ``SHAPE_FRAMES_TOLERANCE``."""
    by_label = {r.method: r for r in rows}
    if reference not in by_label or by_label[reference].error:
        raise ValueError(
            f"the shape bar is relative to {reference!r}, which has no scores in these rows; run it first "
            "(run_video does) or pass the label of the dense run as reference"
        )
    dense = by_label[reference].scores["shape_frames"]
    for row in rows:
        if not row.error:
            row.scores["shape_frames_vs_dense"] = row.scores["shape_frames"] - dense


def _finish(
    rows: list[CompareRow], outputs: dict[str, list[np.ndarray]], *, reference: str, timing_reference: str | None
) -> None:
    """Speedups against ``reference``, the Amdahl bound from ``timing_reference``'s attention share, PSNR / SSIM."""
    by_label = {r.method: r for r in rows}
    stock = by_label[reference]
    timing = by_label.get(timing_reference) if timing_reference else None
    share = (
        min(timing.attention_seconds / timing.seconds, 1.0)
        if timing is not None and math.isfinite(timing.attention_seconds)
        else math.nan
    )
    for row in rows:
        if row.error:
            continue
        row.speedup = stock.seconds / row.seconds
        if math.isfinite(row.attention_seconds) and math.isfinite(share) and row.kind != "combination":
            row.attention_speedup = timing.attention_seconds / row.attention_seconds
            row.amdahl_bound = 1.0 / ((1 - share) + share / row.attention_speedup)
        ref, out = outputs[reference], outputs[row.method]
        # one PSNR from the MSE pooled over every clip: a mean of per-clip PSNRs is infinite as soon as one clip is
        # identical to dense's, whatever the others do
        row.psnr = psnr(
            np.stack([np.asarray(a, np.float64) for a in out]),
            np.stack([np.asarray(b, np.float64) for b in ref]),
            data_range=1.0,
        )
        row.ssim = float(
            np.mean(
                [
                    np.mean([ssim(fa, fb, data_range=1.0) for fa, fb in zip(a, b)])
                    if a.ndim == 4
                    else ssim(a, b, data_range=1.0)
                    for a, b in zip(out, ref)
                ]
            )
        )


def run_image(
    pipe: Any,
    *,
    scale: float,
    prompts: Sequence[str],
    steps: int,
    seed: int = 0,
    guidance: float = 4.0,
) -> tuple[list[CompareRow], dict[str, np.ndarray]]:
    """ToDo against tomesd on the SD-format image model at ``scale`` x its native token count (same prompts, seeds)."""
    from diffattn.methods.downsampling import TokenDownsampling

    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    side = int(round(native * math.sqrt(scale) / 8)) * 8
    tokens = (side // pipe.vae_scale_factor) ** 2

    def generate() -> list[np.ndarray]:
        images = pipe(
            list(prompts),
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=side,
            width=side,
            generator=[torch.Generator().manual_seed(seed + i) for i in range(len(prompts))],
            output_type="np",
        ).images
        return list(np.asarray(images))

    pipe(prompts[0], num_inference_steps=1, height=side, width=side, output_type="np")  # warm-up, untimed
    runs = [
        Peer("dense (stock)", "stock", "diffusers' own attention processor"),
        method_peer("ToDo 2x", TokenDownsampling(factor=2)),
        method_peer("ToDo 4x", TokenDownsampling(factor=4)),
        tomesd_peer(0.5),
        tomesd_peer(0.75),
        method_peer("entropy scaling", diffattn.EntropyScaling(token_ratio=scale)),
        method_peer(
            "ToDo 2x + entropy scaling", diffattn.EntropyScaling(token_ratio=scale, base=TokenDownsampling(factor=2))
        ),
    ]
    rows, outputs = _measure(
        pipe,
        runs,
        generate,
        generate,
        lambda out: {
            k: float(v)
            for k, v in asdict(summarize([evaluate_image(_clip_uint8(im), p) for im, p in zip(out, prompts)])).items()
        },
        f"{side}x{side}",
        tokens,
        f"image: {side}x{side} px ({tokens} latent tokens), {len(prompts)} prompts",
    )
    _finish(rows, outputs, reference="dense (stock)", timing_reference=None)
    return rows, {label: im[0] for label, im in outputs.items()}


# --------------------------------------------------------------------------------------------------------------------
# report


def _f(x: float, fmt: str, missing: str = "–") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) and math.isfinite(x) else missing


def failures(row: CompareRow) -> list[str]:
    """Why ``row`` misses ShapesBench's video bar, one short phrase per criterion it misses (empty: it passes): the
    run failed; trajectory error not below 0.04; positions below 90%; an object not found in every clip; object-frames
    of the prompted colour and shape more than ``SHAPE_FRAMES_TOLERANCE`` below stock dense's
    (``shape_frames_vs_dense``, set by :func:`shapes_against_dense`; a row without it misses)."""
    if row.error:
        return ["the run failed"]
    s = row.scores
    missed = []
    error = s.get("mean_trajectory_error", math.nan)
    if not (math.isfinite(error) and error < PASS_TRAJECTORY_ERROR):
        missed.append(f"trajectory error {_f(error, '.3f', 'missing')} (bar: < {PASS_TRAJECTORY_ERROR:g})")
    positions = s.get("positions_correct", math.nan)
    if not positions >= PASS_POSITIONS:
        missed.append(f"positions {_f(positions, '.0%', 'missing')} (bar: >= {PASS_POSITIONS:.0%})")
    found = s.get("clips_with_objects_found", math.nan)
    if not found == 1.0:
        missed.append(f"objects found in {_f(found, '.0%', 'no')} of clips (bar: all)")
    shapes = s.get("shape_frames_vs_dense", -math.inf)
    if not shapes >= -SHAPE_FRAMES_TOLERANCE - 1e-9:
        missed.append(
            f"shapes {_f(100 * shapes, '+.0f', 'not compared')} points against stock dense "
            f"(bar: >= {-100 * SHAPE_FRAMES_TOLERANCE:+.0f})"
        )
    return missed


def passes(row: CompareRow) -> bool:
    """ShapesBench's video bar: trajectory error below 0.04, positions >= 90%, every object found, and object-frames
    of the prompted colour and shape at most ``SHAPE_FRAMES_TOLERANCE`` below stock dense's (``shape_frames_vs_dense``,
    set by :func:`shapes_against_dense`; a row without it fails); :func:`failures` says which a row misses."""
    return not failures(row)


def shape_note(rows: Sequence[CompareRow], reference: str = DENSE_REFERENCE) -> str:
    """Stock dense attention's own object-frames of the prompted colour and shape, against the model's bar."""
    dense = next((r for r in rows if r.method == reference and not r.error), None)
    rate = math.nan if dense is None else dense.scores.get("shape_frames", math.nan)
    if not math.isfinite(rate):
        return f"{reference}: no shape score (the run failed or was not scored)"
    verdict = "meets" if rate >= PASS_SHAPE_FRAMES else "misses"
    return (
        f"{reference}: {rate:.0%} of object-frames with the prompted colour and shape; {verdict} the model's bar "
        f"{PASS_SHAPE_FRAMES:.0%} (other runs pass the shape check within {SHAPE_FRAMES_TOLERANCE:.0%} of it)"
    )


def format_markdown(rows: Sequence[CompareRow], kind: str = "video") -> str:
    """The comparison as a Markdown table (the README's tables are this output)."""
    if kind == "image":
        lines = [
            "| method | kind | time s | speedup | shapes right | colour+position (1 obj / 2 obj) | count right | "
            "overall | PSNR dB vs dense | settings |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r.error:
                lines.append(f"| {r.method} | {r.kind} | failed: {r.error} | | | | | | | {r.settings} |")
                continue
            s = r.scores
            lines.append(
                f"| {r.method} | {r.kind} | {r.seconds:.2f} | {r.speedup:.2f}x | "
                f"{_f(s.get('shape_accuracy'), '.0%')} | {_f(s.get('colour_position_single'), '.0%')} / "
                f"{_f(s.get('colour_position_two'), '.0%')} | {_f(s.get('count_accuracy'), '.0%')} | "
                f"{_f(s.get('overall_accuracy'), '.0%')} | "
                f"{_f(r.psnr, '.1f', 'identical')} | {r.settings} |"
            )
        return "\n".join(lines)
    lines = [
        "| method | kind | density | time s | speedup | attention x | Amdahl bound | reach | trajectory error | "
        "positions | objects found | shapes (vs dense) | PSNR dB | SSIM |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.method} | {r.kind} | failed: {r.error} | | | | | | | | | | | |")
            continue
        s = r.scores
        err = _f(s.get("mean_trajectory_error"), ".4f")
        lines.append(
            f"| {r.method} | {r.kind} | {_f(r.density, '.2f')} | {r.seconds:.1f} | {r.speedup:.2f}x | "
            f"{_f(r.attention_speedup, '.1f')} | {_f(r.amdahl_bound, '.2f')} | {_f(r.reach, '.0%')} | "
            f"{'**' + err + '**' if passes(r) else err} | {_f(s.get('positions_correct'), '.0%')} | "
            f"{_f(s.get('clips_with_objects_found'), '.0%')} | {_f(s.get('shape_frames'), '.0%')} "
            f"({_f(100 * s.get('shape_frames_vs_dense', math.nan), '+.0f')}) | "
            f"{_f(r.psnr, '.1f', '= dense')} | {_f(r.ssim, '.3f')} |"
        )
    return "\n".join(lines)


def unsupported_note() -> str:
    return "; ".join(f"{name}: {why}" for name, why in UNSUPPORTED_CACHE_HOOKS.items())


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (speedup, error) no other point beats: at least as fast and at most as wrong, and better
    on one of the two."""
    return [
        i for i, (x, e) in enumerate(points) if not any(x2 >= x and e2 <= e and (x2 > x or e2 < e) for x2, e2 in points)
    ]


def load_rows(path: Path) -> dict[str, list[CompareRow]]:
    """The rows of every section of a saved ``compare.json`` (to redraw its plots or tables without rerunning)."""
    names = {f.name for f in fields(CompareRow)}
    sections = json.loads(Path(path).read_text())["sections"]
    return {
        name: [CompareRow(**{k: v for k, v in row.items() if k in names}) for row in rows]
        for name, rows in sections.items()
    }


def plot_pareto(sections: dict[str, Sequence[CompareRow]], path: Path) -> None:
    """One panel per video section: speedup against ShapesBench trajectory error, the Pareto front named and
    joined, the pass bar drawn; tuned profiles (alone and under each cache) as squares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sections), 1, figsize=(9, 5 * len(sections)), squeeze=False)
    colours = {
        "stock": "black",
        "diffattn": "tab:blue",
        "diffusers cache": "tab:orange",
        "NATTEN": "tab:purple",
        "FlexAttention": "tab:brown",
        "combination": "tab:green",
    }
    for ax, (name, section) in zip(axes[:, 0], sections.items()):
        rows = [r for r in section if not r.error and math.isfinite(r.scores.get("mean_trajectory_error", math.nan))]
        points = [(r.speedup, r.scores["mean_trajectory_error"]) for r in rows]
        front = set(pareto_front(points))
        for i, (r, (x, err)) in enumerate(zip(rows, points)):
            ax.scatter(
                x,
                err,
                color=colours.get(r.kind, "grey"),
                s=30 if i in front else 14,
                marker="^" if "entropy" in r.method else "s" if "tuned" in r.method else "o",
                alpha=1.0 if i in front else 0.5,
            )
        # only the front is named (the runs no other run beats on both axes); the rest crowd near dense and
        # are in the table
        ordered = sorted(front, key=lambda i: points[i][0])
        ax.plot([points[i][0] for i in ordered], [points[i][1] for i in ordered], color="grey", lw=0.6, ls=":")
        offsets = [((12, 10), "left"), ((12, -16), "left"), ((-12, 10), "right"), ((-12, -16), "right")]
        for n, i in enumerate(ordered):  # neighbours on the front take turns around their point, a line to it
            (dx, dy), align = offsets[n % len(offsets)]
            ax.annotate(
                rows[i].method,
                points[i],
                fontsize=7,
                textcoords="offset points",
                xytext=(dx, dy),
                ha=align,
                va="center",
                arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "grey"},
            )
        ax.set_yscale("log")  # the passing runs crowd near dense: a log axis spreads them
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2f"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2f"))
        ax.axhline(PASS_TRAJECTORY_ERROR, color="grey", ls="--", lw=0.8)
        ax.text(ax.get_xlim()[0], PASS_TRAJECTORY_ERROR, " pass bar 0.04", fontsize=7, va="bottom")
        ax.set_xlabel("speedup over stock dense (end to end); named: the Pareto front")
        ax.set_ylabel("ShapesBench trajectory error (lower is better)")
        ax.set_title(name, fontsize=9)
        for kind, colour in colours.items():
            if any(r.kind == kind for r in rows):
                ax.scatter([], [], color=colour, label=kind)
        if any("entropy" in r.method for r in rows):
            ax.scatter([], [], color="grey", marker="^", label="with entropy scaling")
        if any("tuned" in r.method for r in rows):
            ax.scatter([], [], color="grey", marker="s", label="tuned profile (alone or under a cache)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_outputs(
    sections: dict[str, tuple[list[CompareRow], dict[str, np.ndarray]]], out: Path, title: str, meta: dict
) -> list[Path]:
    """compare.json (every row and the run's settings), compare.png (speedup bars with quality marks and the frame
    strip of the quality size), pareto.png (speedup against ShapesBench trajectory error, every section)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "meta": meta,
        "sections": {
            name: [asdict(r) | {"reach": r.reach, "passes": passes(r)} for r in rows]
            for name, (rows, _) in sections.items()
        },
    }
    (out / "compare.json").write_text(json.dumps(payload, indent=1, default=float))
    paths = [out / "compare.json"]
    video_sections = [name for name in sections if name.startswith("video")]
    if video_sections:
        rows, clips = sections[video_sections[0]]
        shown = [r for r in rows if not r.error and r.method != "dense (stock)"]
        fig, axes = plt.subplots(1, 2, figsize=(15, 0.42 * len(rows) + 2.5), gridspec_kw={"width_ratios": [3, 2]})
        y = np.arange(len(shown))
        axes[0].barh(
            y + 0.2,
            [r.speedup for r in shown],
            0.4,
            label="end-to-end speedup (measured)",
            color=["tab:green" if passes(r) else "tab:red" for r in shown],
        )
        axes[0].barh(
            y - 0.2,
            [r.amdahl_bound if math.isfinite(r.amdahl_bound) else 0 for r in shown],
            0.4,
            alpha=0.4,
            color="tab:blue",
            label="Amdahl bound (measured attention speedup)",
        )
        for i, r in enumerate(shown):
            err = r.scores.get("mean_trajectory_error", math.nan)
            axes[0].text(
                max(r.speedup, 0) + 0.03,
                i + 0.2,
                f"traj {_f(err, '.3f')}, pos {_f(r.scores.get('positions_correct'), '.0%')}, "
                f"shapes {_f(r.scores.get('shape_frames'), '.0%')}",
                va="center",
                fontsize=7,
            )
        axes[0].axvline(1.0, color="grey", lw=0.8)
        axes[0].set_yticks(y, [f"{r.method} [{r.kind}]" for r in shown], fontsize=7)
        axes[0].invert_yaxis()
        axes[0].set_xlabel("x faster than stock dense attention (green: passes ShapesBench, red: fails)")
        axes[0].set_title(title, fontsize=8)
        axes[0].legend(fontsize=7, loc="lower right")
        labels = [r.method for r in rows if r.method in clips]
        strips = [
            np.concatenate([clips[lb][0], clips[lb][len(clips[lb]) // 2], clips[lb][-1]], axis=1) for lb in labels
        ]
        axes[1].imshow(np.concatenate(strips, axis=0).clip(0, 1), interpolation="nearest")
        h = clips[labels[0]].shape[1]
        axes[1].set_yticks([(i + 0.5) * h for i in range(len(labels))], labels, fontsize=7)
        axes[1].set_xticks([])
        axes[1].set_title("first prompt: first / middle / last frame", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "compare.png", dpi=100)
        plt.close(fig)
        paths.append(out / "compare.png")
        plot_pareto({name: sections[name][0] for name in video_sections}, out / "pareto.png")
        paths.append(out / "pareto.png")
    return paths
