"""What a diffusers user would pick instead of diffattn, set up on a pipeline the same way, for ``diffattn compare``.

- diffusers' own cache hooks (``transformer.enable_cache``): FirstBlockCache, PyramidAttentionBroadcast,
  FasterCache, MagCache (calibrated on the model first, as its documentation says), TaylorSeer and SeaCache, each at
  its documented settings or the ones that fit this model (the reasons are in :func:`cache_peers`);
- NATTEN's neighborhood attention with the sliding-tile pattern (:class:`NattenTile`);
- compiled FlexAttention with diffattn's own block mask (a method's ``backend="flex-compiled"``);
- combinations: a cache hook with a sparse method.

A peer is an attention method applied with ``diffattn.apply`` (``method``, so its attention time can be measured),
a set-up function that returns the callable taking it off again (``setup``), or both (a combination); a run leaves
the pipeline as it found it.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import diffattn
from diffattn.context import AttentionContext

__all__ = [
    "Peer",
    "NattenTile",
    "cache_peers",
    "method_peer",
    "combined",
    "calibrate_mag_cache",
    "UNSUPPORTED_CACHE_HOOKS",
    "natten_tile",
    "tomesd_peer",
    "CALIBRATABLE_CACHES",
    "calibratable_cache",
    "calibrated_cache_peer",
]

Undo = Callable[[], None]

# diffusers hooks that are not step caches for this comparison, and why they are not in the table.
UNSUPPORTED_CACHE_HOOKS = {
    "TextKVCache": "caches the text keys/values of cross-attention across steps; a memory/latency aid for "
    "models whose text K/V projections are large, not a way to skip attention or blocks",
    "LayerSkip": "a guidance tool (skips layers in a perturbed branch, as STG/SLG do), not an accelerator",
}


@dataclass(frozen=True)
class Peer:
    """One row of the comparison: an attention ``method`` (applied with ``diffattn.apply``), a ``setup(pipe)`` that
    returns the callable undoing it, or both; neither is stock dense attention."""

    label: str
    kind: str  # "stock", "diffattn", "diffusers cache", "NATTEN", "FlexAttention", "combination"
    settings: str = ""
    method: diffattn.AttentionMethod | None = None
    setup: Callable[[Any], Undo] | None = None
    warmup: bool = False  # one untimed generation first (a compiled kernel's compile time is not its speed)


def method_peer(
    label: str, method: diffattn.AttentionMethod, kind: str = "diffattn", settings: str = "", warmup: bool = False
) -> Peer:
    return Peer(label, kind, settings or _describe(method), method=method, warmup=warmup)


def _describe(method: diffattn.AttentionMethod) -> str:
    text = repr(method)
    return re.sub(r",? ?roles=frozenset\(\{[^}]*\}\)", "", text)


def combined(label: str, cache: Peer, sparse: Peer) -> Peer:
    """A cache hook (``setup``) with an attention method: both at once."""
    if cache.setup is None or sparse.method is None or cache.method is not None or sparse.setup is not None:
        raise ValueError("combined() takes a set-up peer (a cache hook) and a method peer")
    return Peer(label, "combination", f"{cache.label} + {sparse.label}", method=sparse.method, setup=cache.setup)


def _cache_peer(label: str, make_config: Callable[[Any], Any], settings: str) -> Peer:
    def setup(pipe: Any) -> Undo:
        pipe.transformer.enable_cache(make_config(pipe))
        return pipe.transformer.disable_cache

    return Peer(label, "diffusers cache", settings, setup=setup)


def calibrate_mag_cache(pipe: Any, generate: Callable[[], Any], steps: int) -> list[float]:
    """MagCache's magnitude ratios for this model and step count, from one calibration run (``calibrate=True``, as
    its documentation asks). diffusers prints the ratios of each cache context (cond, then uncond); the conditional
    ones are returned."""
    from diffusers.hooks import MagCacheConfig

    printed = io.StringIO()
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    try:
        with contextlib.redirect_stdout(printed):
            generate()
    finally:
        pipe.transformer.disable_cache()
    found = re.findall(r"\[([0-9eE+\-.,\s]+)\]", printed.getvalue())
    if not found:
        raise RuntimeError("MagCache calibration printed no ratios; diffusers' MagCache output format has changed")
    return [float(x) for x in found[0].split(",")]


def _raw_frames(module: torch.nn.Module, args: tuple, kwargs: dict) -> list[Tensor]:
    """SeaCache's adapter for a Wan-style transformer: the noisy frames (C, T, H, W) of each clip in the call, without
    extra condition channels (the embedded model's coordinate channels)."""
    x = args[0] if args else kwargs["hidden_states"]
    channels = module.config.out_channels
    return [clip[:channels] for clip in x]


def cache_peers(ratios: Sequence[float] | None, steps: int) -> list[Peer]:
    """diffusers' cache hooks at their documented defaults or, where a default cannot apply here, the setting used:

    - FirstBlockCache at thresholds 0.1 and 0.2 (0.1 barely acts at 4,096 tokens here: PSNR 34–39 dB against dense,
      SSIM 0.99+; the default 0.05 skips less still);
    - PyramidAttentionBroadcast: spatial attention recomputed every 2nd step within its default timestep range
      (100, 800);
    - FasterCache: its spatial-attention reuse (every 2nd step, timesteps (-1, 681), weight 0.3, as in diffusers'
      documentation example); the CFG-branch reuse is off because the pipeline runs cond and uncond as separate
      calls, as WanPipeline does;
    - MagCache: the documented defaults (threshold 0.06, at most 3 skips, first 20% kept) with ratios calibrated on
      this model (``ratios``; no peer without them);
    - TaylorSeer: its defaults (first-order, refresh every 5 steps after 3 warm-up steps; factors kept in float32
      instead of bfloat16) but with the transformer blocks as cache targets: its default patterns ('^blocks.*attn'
      under re.fullmatch) match no module of Wan (``blocks.0.attn1``), so by default it silently does nothing on Wan;
    - SeaCache: defaults, with an adapter giving it the noisy frames (without one it runs 'fail-open', i.e. never
      caches, on models diffusers has no adapter for).
    """
    from diffusers.hooks import (
        FasterCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    first_block, sea = calibratable_cache("FirstBlockCache"), calibratable_cache("SeaCache")
    peers = [
        _cache_peer("FirstBlockCache 0.1", lambda pipe: first_block(0.1), "threshold=0.1"),
        _cache_peer("FirstBlockCache 0.2", lambda pipe: first_block(0.2), "threshold=0.2"),
        _cache_peer(
            "PyramidAttentionBroadcast",
            lambda pipe: PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=2,
                spatial_attention_timestep_skip_range=(100, 800),
                current_timestep_callback=lambda: pipe.current_timestep,
            ),
            "spatial skip 2, timesteps (100, 800)",
        ),
        _cache_peer(
            "FasterCache",
            lambda pipe: FasterCacheConfig(
                spatial_attention_block_skip_range=2,
                spatial_attention_timestep_skip_range=(-1, 681),
                current_timestep_callback=lambda: pipe.current_timestep,
                attention_weight_callback=lambda _: 0.3,
                is_guidance_distilled=True,
            ),
            "spatial skip 2, timesteps (-1, 681), weight 0.3, no CFG reuse",
        ),
        _cache_peer(
            "TaylorSeer",
            lambda pipe: TaylorSeerCacheConfig(
                cache_interval=5,
                disable_cache_before_step=3,
                max_order=1,
                cache_identifiers=[r"blocks\.\d+"],
                taylor_factors_dtype=torch.float32,
            ),
            "interval 5, warm-up 3, order 1, blocks cached",
        ),
        _cache_peer(
            "SeaCache",
            lambda pipe: sea(0.25),
            "defaults (threshold 0.25), frames adapter",
        ),
    ]
    if ratios is not None:
        peers.insert(
            4,
            _cache_peer(
                "MagCache",
                lambda pipe: MagCacheConfig(mag_ratios=list(ratios), num_inference_steps=steps),
                "defaults, ratios calibrated here",
            ),
        )
    return peers


#: The caches ``scripts/tune_video.py --cache`` calibrates (``diffattn.calibrate_cache``): name -> the thresholds
#: searched (increasing; the defaults are 0.05 for FirstBlockCache and 0.25 for SeaCache).
CALIBRATABLE_CACHES: dict[str, tuple[float, ...]] = {
    "FirstBlockCache": (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8),
    "SeaCache": (0.1, 0.25, 0.4, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0),
}


def calibratable_cache(name: str) -> Callable[[float], Any]:
    """``threshold -> config`` of one of :data:`CALIBRATABLE_CACHES` (its other settings as in :func:`cache_peers`),
    by name or by its config's class name (``SeaCacheConfig``, as a calibration records it)."""
    from diffusers.hooks import FirstBlockCacheConfig
    from diffusers.hooks.sea_cache import SeaCacheConfig

    makers = {
        "FirstBlockCache": lambda t: FirstBlockCacheConfig(threshold=t),
        "SeaCache": lambda t: SeaCacheConfig(threshold=t, raw_vision_callback=_raw_frames),
    }
    key = name.removesuffix("Config")
    if key not in makers:
        raise ValueError(f"no calibratable cache {name!r}; choose one of {', '.join(CALIBRATABLE_CACHES)}")
    return makers[key]


def calibrated_cache_peer(calibration: Any) -> Peer:
    """A cache at the threshold ``diffattn.calibrate_cache`` chose (a :class:`~diffattn.CacheCalibration`)."""
    name = calibration.cache.split("(")[0].removesuffix("Config")
    make = calibratable_cache(name)
    return _cache_peer(
        f"{name} {calibration.threshold:g} (calibrated)",
        lambda pipe: make(calibration.threshold),
        f"threshold {calibration.threshold:g}: the largest that kept {calibration.psnr_target:g} dB "
        f"({calibration.psnr:.1f} dB, {calibration.computed:.0%} of dense's attention calls) on "
        f"{len(calibration.calibration)} calibration prompts",
    )


def natten_tile(
    q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, ...], tile: tuple[int, ...], window: tuple[int, ...]
) -> Tensor:
    """NATTEN's ``na3d`` with the sliding-tile pattern (kernel = window x tile, stride = tile) on (B, H, S, D)
    tensors whose S tokens are the ``grid`` in raster order. CPU: NATTEN's ``flex-fna`` backend."""
    import natten

    b, h, _, d = q.shape

    def heads_last(x: Tensor) -> Tensor:
        return x.permute(0, 2, 1, 3).reshape(b, *grid, h, d)

    kernel = tuple(min(w * t, n) for w, t, n in zip(window, tile, grid))
    out = natten.na3d(heads_last(q), heads_last(k), heads_last(v), kernel_size=kernel, stride=tile, backend="flex-fna")
    return out.reshape(b, -1, h, d).permute(0, 2, 1, 3)


@dataclass(frozen=True)
class NattenTile(diffattn.AttentionMethod):
    """Sliding-tile attention computed by NATTEN (a peer, not a diffattn method): self-attention of a video DiT
    whose sequence is the visual grid alone (Wan). ``tile`` and ``window`` as in ``SlidingTileAttention``."""

    tile: tuple[int, int, int]
    window: tuple[int, int, int]
    roles: frozenset[str] = field(default=frozenset({"self"}))

    def validate(self, ctx: AttentionContext) -> None:
        layout = ctx.q_layout
        if layout.text_len or len(layout.grid) != 3 or any(n % t for n, t in zip(layout.grid, self.tile)):
            raise diffattn.MethodConfigError(
                f"NattenTile at {ctx.layer}: needs a 3-D visual grid divisible by the tile {self.tile} and no text "
                f"tokens in self-attention, got {layout}"
            )

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        grid = ctx.q_layout.grid
        ctx.report(density=math.prod(min(w * t, n) / n for w, t, n in zip(self.window, self.tile, grid)))
        return natten_tile(q, k, v, grid, self.tile, self.window).to(q.dtype)


def tomesd_peer(ratio: float) -> Peer:
    """tomesd (token merging for Stable Diffusion UNets) at ``ratio`` of the tokens merged; its defaults otherwise
    (self-attention of the highest-resolution blocks only, 2 x 2 strides)."""

    def setup(pipe: Any) -> Undo:
        import tomesd

        tomesd.apply_patch(pipe, ratio=ratio)
        return lambda: tomesd.remove_patch(pipe)

    return Peer(f"tomesd {ratio:g}", "tomesd", f"ratio={ratio:g}, defaults otherwise", setup=setup)
