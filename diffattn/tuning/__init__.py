"""Tuning a sparse method to a model against dense attention: :func:`tune` measures each layer's, step range's and
head's error at candidate budgets on calibration prompts and returns a :class:`TunedProfile`, the least budget per
layer, range and head within an error target; ``diffattn.apply(pipe, profile)`` applies it, and ``profile.save`` /
:meth:`TunedProfile.load` keep it (safetensors + JSON). :func:`calibrate_cache` finds the threshold of one of diffusers'
step caches that keeps a PSNR target, to tune a profile under (``tune(..., cache=...)``)."""

from .cache import CacheCalibration, calibrate_cache
from .probe import SensitivityProbe
from .profile import ProfiledSparseAttention, TunedProfile
from .tune import TUNABLE_FAMILIES, tune

__all__ = [
    "tune",
    "TunedProfile",
    "ProfiledSparseAttention",
    "SensitivityProbe",
    "TUNABLE_FAMILIES",
    "calibrate_cache",
    "CacheCalibration",
]
