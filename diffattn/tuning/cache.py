""":func:`calibrate_cache`: the threshold of one of diffusers' step caches (FirstBlockCache, SeaCache, MagCache's
threshold, ...) that keeps a PSNR target against dense attention on calibration prompts, with what it saves: the share
of the dense run's attention calls the cached run still makes (a cached block runs none).

diffusers' caches take a threshold a user picks by hand; how far a model's outputs drift at a given threshold depends
on the model, its step count and its size. This measures it, as MagCache's own calibration measures its ratios."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DiffattnError
from .checks import check_prompts, check_psnr_target, check_refine, single_denoiser

__all__ = ["CacheTrial", "CacheCalibration", "calibrate_cache", "describe_cache", "enabled_cache"]

_JSON = "cache.json"


@dataclass(frozen=True)
class CacheTrial:
    """One threshold tried: the calibration outputs' PSNR against dense, and the share of dense's attention calls
    made."""

    threshold: float
    psnr: float
    computed: float


@dataclass(frozen=True)
class CacheCalibration:
    """What :func:`calibrate_cache` found: ``threshold``, the largest tried whose outputs stay within ``psnr_target`` of
    dense on the calibration prompts (``psnr``), making ``computed`` of dense's attention calls; ``cache`` describes
    the config (:func:`describe_cache`); ``trials`` every threshold tried, in the order tried."""

    cache: str
    threshold: float
    psnr: float
    computed: float
    psnr_target: float
    trials: tuple[CacheTrial, ...]
    calibration: tuple[str, ...] = ()
    num_inference_steps: int | None = None

    def save(self, folder: str | Path) -> Path:
        """Write ``cache.json`` into ``folder`` (made if missing); returns its path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = dataclasses.asdict(self)
        (folder / _JSON).write_text(json.dumps(meta, indent=1))
        return folder / _JSON

    @classmethod
    def load(cls, folder: str | Path) -> CacheCalibration:
        """The calibration :meth:`save` wrote into ``folder``."""
        path = Path(folder) / _JSON
        if not path.is_file():
            raise FileNotFoundError(f"{folder} holds no cache calibration ({_JSON}); make one with calibrate_cache")
        meta = json.loads(path.read_text())
        trials = tuple(CacheTrial(**t) for t in meta.pop("trials"))
        return cls(**{**meta, "trials": trials, "calibration": tuple(meta.get("calibration", ()))})

    @staticmethod
    def exists(folder: str | Path) -> bool:
        return (Path(folder) / _JSON).is_file()


def describe_cache(config: Any) -> str:
    """A config's class and its plain settings (numbers, text, flags), without its callbacks: what a profile or a
    calibration records of the cache it was made under."""
    if not dataclasses.is_dataclass(config):
        return type(config).__name__
    plain = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if isinstance(getattr(config, f.name), (int, float, str, bool))
    }
    return f"{type(config).__name__}({', '.join(f'{k}={v!r}' for k, v in plain.items())})"


class enabled_cache:
    """``with enabled_cache(model, config):`` diffusers' ``model.enable_cache(config)`` for the block, then
    ``disable_cache()``; ``config=None`` does nothing. A model without diffusers' cache support is refused."""

    def __init__(self, model: Any, config: Any) -> None:
        if config is not None and not hasattr(model, "enable_cache"):
            raise DiffattnError(
                f"{type(model).__name__} has no enable_cache (diffusers' CacheMixin): its pipeline cannot run "
                "diffusers' step caches; tune without a cache"
            )
        self.model, self.config = model, config

    def __enter__(self) -> None:
        if self.config is not None:
            self.model.enable_cache(self.config)

    def __exit__(self, *exc: Any) -> None:
        if self.config is not None:
            self.model.disable_cache()


def _thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(t) for t in thresholds)
    if not values or list(values) != sorted(set(values)) or not all(math.isfinite(t) and t >= 0 for t in values):
        raise ValueError(f"calibrate_cache: thresholds are increasing, non-negative numbers, got {tuple(thresholds)}")
    return values


def calibrate_cache(
    pipe: Any,
    make_config: Callable[[float], Any],
    prompts: Sequence[str],
    *,
    psnr_target: float,
    num_inference_steps: int,
    thresholds: Sequence[float],
    seed: int = 0,
    progress: bool = True,
    refine: int = 2,
    **call_kwargs: Any,
) -> CacheCalibration:
    """The largest threshold whose cache (``make_config(threshold)``, enabled with diffusers' ``enable_cache`` on the
    pipeline's denoiser) regenerates ``prompts`` (seeds ``seed + i``, ``num_inference_steps``, ``call_kwargs`` such as
    ``height=``, ``num_frames=``) within ``psnr_target`` dB of dense attention.

    A binary search over ``thresholds`` (a cache skips more as its threshold grows, so its PSNR falls): one dense run
    of the prompts, about log2(len(thresholds)) cached runs, then ``refine`` bisections between the chosen threshold
    and the smallest one that missed (a cache's response can jump between two neighbours of the grid). Each run counts
    the attention calls made (a skipped block makes none), so ``computed`` says what the chosen threshold saves without
    timing noise. Raises when even the smallest threshold misses the target, saying what to change."""
    from tqdm.auto import tqdm

    from ..api import apply
    from ..methods.dense import Dense
    from .tune import _output, calibration_call, pooled_psnr

    values = _thresholds(thresholds)
    check_psnr_target("calibrate_cache", psnr_target)
    check_refine("calibrate_cache", refine)
    check_prompts("calibrate_cache", prompts)
    model = single_denoiser("calibrate_cache", pipe)
    call = calibration_call(pipe, list(prompts), num_inference_steps, seed, {**call_kwargs, "output_type": "np"})

    def run(config: Any) -> tuple[list[np.ndarray], int]:
        with enabled_cache(model, config):
            handle = apply(pipe, Dense())
            try:
                outputs = [_output(call(i)) for i in range(len(prompts))]
                calls = sum(handle.acted_calls().values())
            finally:
                handle.remove()
        return outputs, calls

    steps = 1 + math.ceil(math.log2(len(values) + 1)) + refine
    bar = tqdm(total=steps, desc="calibrating the cache: dense, then thresholds", disable=not progress)
    dense, dense_calls = run(None)
    bar.update(1)
    if dense_calls == 0:
        raise DiffattnError("calibrate_cache saw no attention call of the denoiser: nothing to count")
    trials: list[CacheTrial] = []

    def trial_at(threshold: float) -> CacheTrial:
        outputs, calls = run(make_config(threshold))
        trials.append(CacheTrial(threshold, pooled_psnr(outputs, dense), calls / dense_calls))
        bar.update(1)
        return trials[-1]

    low, high, best, missed = 0, len(values) - 1, None, None
    while low <= high:
        middle = (low + high) // 2
        trial = trial_at(values[middle])
        if trial.psnr >= psnr_target:
            best, low = trial, middle + 1
        else:
            high, missed = middle - 1, values[middle]
    for _ in range(refine if best is not None and missed is not None else 0):
        trial = trial_at((best.threshold + missed) / 2)
        if trial.psnr >= psnr_target:
            best = trial
        else:
            missed = trial.threshold
    bar.close()
    if best is None:
        raise DiffattnError(
            f"no threshold kept {psnr_target:g} dB against dense on the calibration prompts (the smallest, "
            f"{values[0]:g}, gave {trials[-1].psnr:.1f} dB): lower psnr_target or try smaller thresholds"
        )
    return CacheCalibration(
        cache=describe_cache(make_config(best.threshold)),
        threshold=best.threshold,
        psnr=best.psnr,
        computed=best.computed,
        psnr_target=float(psnr_target),
        trials=tuple(trials),
        calibration=tuple(prompts),
        num_inference_steps=num_inference_steps,
    )
