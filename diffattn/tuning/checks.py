"""The argument checks :func:`~diffattn.tune` and :func:`~diffattn.calibrate_cache` share: each raises with the name
of the function called (``who``) and what to pass instead."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import DiffattnError

__all__ = ["check_psnr_target", "check_prompts", "check_refine", "single_denoiser"]


def check_psnr_target(who: str, psnr_target: Any) -> None:
    if isinstance(psnr_target, bool) or not isinstance(psnr_target, (int, float)) or not 0 < psnr_target < 100:
        raise ValueError(f"{who}: psnr_target is in dB, in (0, 100), e.g. 25; got {psnr_target!r}")


def check_prompts(who: str, prompts: Sequence[str]) -> None:
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{who}: prompts is a list of calibration prompts, e.g. ['a red circle moving left']")


def check_refine(who: str, refine: Any) -> None:
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(f"{who}: refine is a number of extra search steps (0 or more), got {refine!r}")


def single_denoiser(who: str, pipe: Any) -> torch.nn.Module:
    """The pipeline's one denoiser; a pipeline with several (one per stage) is refused."""
    from ..api import _denoisers

    models, _ = _denoisers(pipe)
    if len(models) != 1:
        raise DiffattnError(
            f"{who} handles pipelines with one denoiser; this one has {len(models)} "
            f"({', '.join(type(m).__name__ for m in models)}): run it on each denoiser's pipeline stage separately"
        )
    return models[0]
