""":func:`tune`: choose a sparse method's budget per layer, step range and head for one model, against dense
attention on calibration prompts, within an error target a user reads: the relative L1 error of each attention
output (``0.05``: outputs within 5% of dense, summed over a head's tokens and channels)."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DiffattnError
from .cache import describe_cache, enabled_cache
from .checks import check_prompts, check_psnr_target, check_refine, single_denoiser
from .cost import CostProbe, ProfileCostProbe, drop_unpaid_ranges, relative_costs
from .probe import SensitivityProbe
from .profile import LayerBudget, TunedProfile

__all__ = ["tune", "TUNABLE_FAMILIES", "DEFAULT_CANDIDATES", "THRESHOLDS", "pooled_psnr", "calibration_call"]

#: Method families :func:`tune` can tune: ``"dynamic-topk"`` is :class:`~diffattn.DynamicSparseAttention`'s top-k
#: fraction per head.
TUNABLE_FAMILIES = ("dynamic-topk",)
#: The top-k fractions tried per head (1.0, dense, is always the fallback).
DEFAULT_CANDIDATES = (0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7)
_STATE_JSON = "tune_state.json"
_STATE_TENSORS = "tune_state.safetensors"


def _check_targets(error_target: float | None, psnr_target: float | None) -> None:
    if (error_target is None) == (psnr_target is None):
        raise ValueError(
            "tune: give one target, error_target=<relative L1 error of attention outputs per head, e.g. 0.1> or "
            "psnr_target=<dB of the generated output against dense on the calibration prompts, e.g. 25>"
        )
    if error_target is not None and (
        isinstance(error_target, bool) or not isinstance(error_target, (int, float)) or not 0 < error_target < 1
    ):
        raise ValueError(
            f"tune: error_target is the relative L1 error of attention outputs allowed per head, in (0, 1), "
            f"e.g. 0.05; got {error_target!r}"
        )
    if psnr_target is not None:
        check_psnr_target("tune", psnr_target)


def _check(family: str, prompts: Sequence[str], candidates: Sequence[float], ranges: int) -> None:
    if family not in TUNABLE_FAMILIES:
        raise ValueError(f"tune: family {family!r} is not tunable yet; use one of {', '.join(TUNABLE_FAMILIES)}")
    check_prompts("tune", prompts)
    if not candidates or list(candidates) != sorted(set(candidates)) or not all(0 < c < 1 for c in candidates):
        raise ValueError(f"tune: candidates are increasing top-k fractions in (0, 1), got {tuple(candidates)}")
    if isinstance(ranges, bool) or not isinstance(ranges, int) or ranges < 1:
        raise ValueError(f"tune: step_ranges is a positive number of parts of the schedule, got {ranges!r}")


def _fingerprint(**settings: Any) -> str:
    return json.dumps(settings, sort_keys=True, default=repr)


def _load_state(folder: Path, fingerprint: str, probe: SensitivityProbe, outputs: list[np.ndarray]) -> int:
    """Restore the sums of an interrupted run into ``probe`` (and its dense outputs into ``outputs``); the number of
    prompts it had finished (0: none; another run's state is refused rather than mixed in)."""
    meta_path = folder / _STATE_JSON
    if not meta_path.is_file():
        return 0
    from safetensors.torch import load_file

    meta = json.loads(meta_path.read_text())
    if meta["fingerprint"] != fingerprint:
        raise DiffattnError(
            f"{folder} holds the state of a tuning run with other settings; pass another checkpoint folder or "
            f"delete {meta_path.name} and {_STATE_TENSORS} to start anew"
        )
    tensors = load_file(str(folder / _STATE_TENSORS))
    for i, (layer, index, count) in enumerate(meta["keys"]):
        probe.sums[(layer, index)] = tensors[f"sums.{i}"]
        probe.counts[(layer, index)] = count
    probe.grids.update({layer: tuple(grid) for layer, grid in meta["grids"].items()})
    outputs.extend(tensors[f"dense.{i}"].numpy() for i in range(int(meta["done"])) if f"dense.{i}" in tensors)
    return int(meta["done"])


def _save_state(
    folder: Path, fingerprint: str, probe: SensitivityProbe, done: int, outputs: Sequence[np.ndarray]
) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(probe.sums)
    tensors = {f"sums.{i}": probe.sums[key].contiguous() for i, key in enumerate(keys)}
    tensors.update({f"dense.{i}": torch.from_numpy(np.ascontiguousarray(out)) for i, out in enumerate(outputs)})
    save_file(tensors, str(folder / _STATE_TENSORS))
    meta = {
        "fingerprint": fingerprint,
        "done": done,
        "keys": [[layer, index, probe.counts[(layer, index)]] for layer, index in keys],
        "grids": {layer: list(grid) for layer, grid in probe.grids.items()},
    }
    tmp = folder / (_STATE_JSON + ".tmp")
    tmp.write_text(json.dumps(meta))
    tmp.replace(folder / _STATE_JSON)  # the JSON names the tensors' run: written last, atomically


def _pick(errors: Sequence[float], candidates: Sequence[float], target: float, costs: Sequence[float] | None) -> int:
    """The index of the chosen candidate for one head (``len(candidates)``: dense). Without ``costs``: the smallest
    candidate within ``target``. With them (each candidate's time as a fraction of dense's): the one that minimises
    ``cost + error / target`` (dense: ``1 + 0``), so a candidate is taken only where it saves time, and its error
    stays within ``target`` times the share of time it saves."""
    if costs is None:
        return next((i for i in range(len(candidates)) if errors[i] <= target), len(candidates))
    best, value = len(candidates), 1.0
    for i, (cost, error) in enumerate(zip(costs, errors)):
        if cost + error / target < value:
            best, value = i, cost + error / target
    return best


def _choose(
    probe: SensitivityProbe,
    candidates: Sequence[float],
    ranges: int,
    target: float,
    costs: dict[str, Sequence[float]] | None = None,
) -> list[LayerBudget]:
    """Per layer, range and head the candidate :func:`_pick` chooses (1.0, dense, when none is), from the mean errors
    the probe measured and, if given, each layer's candidate costs relative to dense."""
    layers = []
    for name in probe.grids:  # the order the layers were first called in
        budgets, errors = [], []
        for index in range(ranges):
            if (name, index) not in probe.sums:
                raise DiffattnError(
                    f"tune saw no call of {name} in step range {index} of {ranges}: use fewer step_ranges or more "
                    "num_inference_steps"
                )
            mean = probe.sums[(name, index)] / probe.counts[(name, index)]  # (candidates, heads)
            row_b, row_e = [], []
            for head in range(mean.shape[1]):
                i = _pick(mean[:, head].tolist(), candidates, target, None if costs is None else costs[name])
                row_b.append(float(candidates[i]) if i < len(candidates) else 1.0)
                row_e.append(float(mean[i, head]) if i < len(candidates) else 0.0)
            budgets.append(tuple(row_b))
            errors.append(tuple(row_e))
        layers.append(LayerBudget(name, probe.grids[name], tuple(budgets), tuple(errors)))
    return layers


#: The per-head error thresholds ``psnr_target`` searches (each gives a profile; the largest that keeps the
#: calibration outputs within the PSNR target wins).
THRESHOLDS = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


def _output(result: Any) -> np.ndarray:
    """The pipeline call's generated images or frames (``output_type="np"``) as one float array."""
    for name in ("frames", "images"):
        value = getattr(result, name, None)
        if value is not None:
            return np.asarray(value, dtype=np.float32)
    raise DiffattnError(
        f"tune reads the generated output from .frames or .images of the pipeline's result; "
        f"{type(result).__name__} has neither: tune with error_target= instead of psnr_target="
    )


def pooled_psnr(outputs: Sequence[np.ndarray], references: Sequence[np.ndarray]) -> float:
    """PSNR (dB, outputs in [0, 1]) of the mean squared error pooled over every output against its reference."""
    squared = sum(float(((np.clip(o, 0, 1) - np.clip(r, 0, 1)) ** 2).sum()) for o, r in zip(outputs, references))
    count = sum(o.size for o in outputs)
    mse = squared / count
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def native_bf16_on_cpu() -> bool | None:
    """Whether this CPU runs bf16 matrix products natively (AVX512-BF16 or AMX, as oneDNN sees it); None when torch
    cannot tell."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def _warn_emulated_bf16(compute_dtype: torch.dtype | None, model: torch.nn.Module) -> None:
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if compute_dtype == torch.bfloat16 and on_cpu and native_bf16_on_cpu() is False:
        warnings.warn(
            "tune: compute_dtype=torch.bfloat16 on a CPU without native bf16 math (no AVX512-BF16 or AMX): bf16 "
            "attention is emulated there and slower than float32 (dense SDPA 167 against 146-149 ms at 4,096 tokens "
            "on a 2-core AMD EPYC with AVX2), so the profile's speed would be measured against a slower dense; leave "
            "compute_dtype out to tune in float32",
            stacklevel=3,
        )


def calibration_call(
    pipe: Any, prompts: Sequence[str], num_inference_steps: int, seed: int, call_kwargs: dict[str, Any]
) -> Any:
    """``call(i)``: the pipeline on calibration prompt ``i`` with seed ``seed + i`` (the same call in every run that
    is compared with another)."""

    def call(i: int) -> Any:
        return pipe(
            prompts[i],
            num_inference_steps=num_inference_steps,
            generator=torch.Generator().manual_seed(seed + i),
            **call_kwargs,
        )

    return call


def _measure_costs(
    pipe: Any,
    apply: Any,
    generate: Any,
    probe: SensitivityProbe,
    timer: CostProbe,
    layers: Any,
    progress: bool,
) -> dict[str, tuple[float, ...]]:
    """Each tuned layer's candidate times relative to dense, from one dense run of the first prompt."""
    from tqdm.auto import tqdm

    bar = tqdm(total=1, desc="tuning: timing candidates", disable=not progress)
    with apply(pipe, timer, layers=layers):
        generate(0)
    bar.update(1)
    bar.close()
    missing = [name for name in probe.grids if name not in timer.seconds]
    if missing:
        raise DiffattnError(
            f"tune timed no call of {', '.join(missing)} on the first prompt: the layers it measured must run on "
            "every prompt; tune with weigh_costs=False to choose budgets without their time"
        )
    return {name: relative_costs(timer.seconds[name]) for name in probe.grids}


def tune(
    pipe: Any,
    family: str,
    prompts: Sequence[str],
    *,
    num_inference_steps: int,
    error_target: float | None = None,
    psnr_target: float | None = None,
    candidates: Sequence[float] = DEFAULT_CANDIDATES,
    step_ranges: int = 2,
    block_size: int = 128,
    tile: Any = "auto",
    layers: Any = None,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    weigh_costs: bool = True,
    refine: int = 2,
    compute_dtype: torch.dtype | None = None,
    cache: Any = None,
    **call_kwargs: Any,
) -> TunedProfile:
    """Tune ``family`` for ``pipe``'s denoiser against dense attention.

    Runs the pipeline on each calibration prompt (seed ``seed + i``, ``num_inference_steps``, ``call_kwargs`` such
    as ``height=``, ``width=``, ``num_frames=``, ``guidance_scale=``) with dense attention, and at every attention
    call measures each head's relative L1 error at every candidate budget. Then, per layer, step range
    (``step_ranges`` equal parts of the schedule) and head, it keeps the smallest candidate whose mean error is
    within a threshold, or dense (1.0) when none is. The threshold is
    - ``error_target`` itself (relative L1 error of each head's attention output, e.g. ``0.1``), or
    - with ``psnr_target`` (dB, e.g. ``25``), the largest of :data:`THRESHOLDS` whose profile regenerates the
      calibration prompts within that PSNR of the dense outputs (a search, a few pipeline runs per step), then
      ``refine`` geometric bisections between it and the smallest threshold that failed. There,
      with ``weigh_costs`` (default), one more dense run of the first prompt times dense attention and every
      candidate on each layer's first call (:class:`~diffattn.tuning.cost.CostProbe`), and each head takes the
      candidate that minimises ``time / dense time + error / threshold`` instead: a budget is kept only where it
      saves time (the selection and the sparse loop cost more than the stock core near a full budget), and its
      error stays within the threshold times the share of time it saves. Those costs time every head at one budget;
      a layer whose heads end up split between budgets costs more (two calls, gathers by head), so a last run of the
      first prompt times the chosen profile's own call per layer and step range against the stock core
      (:class:`~diffattn.tuning.cost.ProfileCostProbe`) and makes dense every range that saves nothing.
    ``compute_dtype=torch.bfloat16`` measures, times and runs every head (dense heads through the stock core) on q, k,
    v cast to bf16 (see :class:`~diffattn.DynamicSparseAttention`); errors stay measured against dense attention in
    the call's dtype, and the profile records the dtype.
    ``cache`` (with ``psnr_target``): a diffusers step-cache config (``FirstBlockCacheConfig(threshold=...)``, a
    threshold from :func:`~diffattn.tuning.cache.calibrate_cache`) enabled on the denoiser during the PSNR search, so
    the profile spends what the cache leaves of the target: apply both, the cache with ``enable_cache``. The
    measurements run without it (they compare each call's attention with dense on the same inputs).
    Progress shows per prompt and per search step; with ``checkpoint`` (a folder) the measurements are saved after
    each prompt and an interrupted run resumes there when called again with the same settings. Returns a
    :class:`TunedProfile`; ``diffattn.apply(pipe, profile)`` applies it, ``profile.save(folder)`` keeps it. Tune at
    the size you generate at: a profile is refused on another token grid.
    """
    from tqdm.auto import tqdm

    from .. import __version__
    from ..api import apply  # the api module imports this package (apply takes a profile)

    prompts = list(prompts) if not isinstance(prompts, str) else prompts
    candidates = tuple(float(c) for c in candidates)
    _check_targets(error_target, psnr_target)
    _check(family, prompts, candidates, step_ranges)
    check_refine("tune", refine)
    if cache is not None and psnr_target is None:
        raise ValueError(
            "tune: cache= is used by the PSNR search; give psnr_target=<dB of the cached, sparse outputs against "
            "dense> with it"
        )
    if psnr_target is not None:
        if call_kwargs.get("output_type", "np") != "np":
            raise ValueError("tune: psnr_target compares generated outputs; leave output_type out (it uses 'np')")
        call_kwargs = {**call_kwargs, "output_type": "np"}
    models = [single_denoiser("tune", pipe)]
    cached = enabled_cache(models[0], cache)  # refuses a model without diffusers' caches before any run
    _warn_emulated_bf16(compute_dtype, models[0])
    probe = SensitivityProbe(
        candidates, step_ranges=step_ranges, block_size=block_size, tile=tile, compute_dtype=compute_dtype
    )
    fingerprint = _fingerprint(
        family=family,
        prompts=prompts,
        candidates=candidates,
        step_ranges=step_ranges,
        block_size=block_size,
        tile=tile,
        layers=layers,
        seed=seed,
        steps=num_inference_steps,
        call=call_kwargs,
        model=type(models[0]).__name__,
        **({} if compute_dtype is None else {"compute_dtype": str(compute_dtype)}),  # earlier checkpoints stay valid
    )

    generate = calibration_call(pipe, prompts, num_inference_steps, seed, call_kwargs)

    folder = Path(checkpoint) if checkpoint is not None else None
    dense: list[np.ndarray] = []
    done = _load_state(folder, fingerprint, probe, dense) if folder is not None else 0
    handle = apply(pipe, probe, layers=layers)
    try:
        bar = tqdm(total=len(prompts), initial=done, desc="tuning: dense + candidates", disable=not progress)
        for i in range(done, len(prompts)):
            result = generate(i)
            if psnr_target is not None:
                dense.append(_output(result))
            if folder is not None:
                _save_state(folder, fingerprint, probe, i + 1, dense)
            bar.update(1)
        bar.close()
    finally:
        handle.remove()
    if not probe.sums:
        raise DiffattnError(
            "tune saw no attention call it could measure: the pipeline's layers have no self or joint attention "
            "over a token grid that DynamicSparseAttention acts on"
        )

    costs = None
    if psnr_target is not None and weigh_costs:
        timer = CostProbe(candidates, block_size=block_size, tile=tile, compute_dtype=compute_dtype)
        costs = _measure_costs(pipe, apply, generate, probe, timer, layers, progress)

    def profile_at(threshold: float, psnr: float | None = None) -> TunedProfile:
        chosen = _choose(probe, candidates, step_ranges, threshold, costs)
        if costs is not None:
            chosen = [dataclasses.replace(layer, costs=tuple(costs[layer.name])) for layer in chosen]
        return TunedProfile(
            model_class=type(models[0]).__name__,
            family=family,
            block_size=block_size,
            tile=tuple(tile) if isinstance(tile, list) else tile,
            step_ranges=step_ranges,
            error_target=float(threshold),
            layers=tuple(chosen),
            calibration=tuple(prompts),
            num_inference_steps=num_inference_steps,
            diffattn_version=__version__,
            psnr_target=None if psnr_target is None else float(psnr_target),
            calibration_psnr=psnr,
            candidates=candidates,
            compute_dtype=None if compute_dtype is None else str(compute_dtype).removeprefix("torch."),
            cache=None if cache is None else describe_cache(cache),
        )

    if psnr_target is None:
        return profile_at(error_target)

    def psnr_of(profile: TunedProfile) -> float:
        with cached, apply(pipe, profile):
            outputs = [_output(generate(i)) for i in range(len(prompts))]
        return pooled_psnr(outputs, dense)

    # binary search over THRESHOLDS for the largest whose profile keeps the PSNR target (errors grow with it), then
    # `refine` geometric bisections between it and the smallest one that failed
    low, high, best, failed = 0, len(THRESHOLDS) - 1, None, None
    steps = math.ceil(math.log2(len(THRESHOLDS))) + 1 + refine
    search = tqdm(total=steps, desc="tuning: PSNR search", disable=not progress)
    while low <= high:
        middle = (low + high) // 2
        profile = profile_at(THRESHOLDS[middle])
        psnr = psnr_of(profile)
        search.update(1)
        if psnr >= psnr_target:
            best, low = profile_at(THRESHOLDS[middle], psnr), middle + 1
        else:
            high, failed = middle - 1, THRESHOLDS[middle]
    if best is None:
        search.close()
        cached_note = ("", "") if cache is None else (", with the cache", ", or a smaller cache threshold")
        raise DiffattnError(
            f"no profile reached {psnr_target:g} dB against dense on the calibration prompts (at a per-head error "
            f"of {THRESHOLDS[0]:g}: {psnr:.1f} dB{cached_note[0]}): lower psnr_target, or add larger "
            f"candidates{cached_note[1]}"
        )
    for _ in range(refine if failed is not None else 0):
        threshold = math.sqrt(best.error_target * failed)
        profile = profile_at(threshold)
        search.update(1)
        if profile.layers == best.layers:
            best = dataclasses.replace(best, error_target=threshold)  # the same budgets: the same outputs
            continue
        psnr = psnr_of(profile)
        if psnr >= psnr_target:
            best = profile_at(threshold, psnr)
        else:
            failed = threshold
    search.close()
    return _drop_unpaid(best, costs is not None, pipe, apply, generate, psnr_of, psnr_target, progress)


def _drop_unpaid(
    best: TunedProfile, weighed: bool, pipe: Any, apply: Any, generate: Any, psnr_of: Any, target: float, progress: bool
) -> TunedProfile:
    """With costs weighed: time each tuned layer's call of ``best`` against the stock core in every step range (one
    run of the first prompt, :class:`ProfileCostProbe`) and make dense the ranges that save nothing; the result is
    kept if it still reaches ``target`` (measured again: it usually gains, a dense range adds no error)."""
    if not weighed or all(b >= 1.0 for layer in best.layers for row in layer.budgets for b in row):
        return best
    from tqdm.auto import tqdm

    bar = tqdm(total=2, desc="tuning: timing the profile's layers", disable=not progress)
    timer = ProfileCostProbe(best)
    with apply(pipe, timer, layers=best.layer_patterns()):
        generate(0)
    bar.update(1)
    lean, dropped = drop_unpaid_ranges(best, timer.seconds)
    if not dropped:
        bar.close()
        return best
    psnr = psnr_of(lean)
    bar.update(1)
    bar.close()
    return dataclasses.replace(lean, calibration_psnr=psnr) if psnr >= target else best
