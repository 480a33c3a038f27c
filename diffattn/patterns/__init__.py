"""Attention patterns: which keys each visual query may see, as index arithmetic and block relations."""

from .base import Pattern, PositionMaskMod, block_ranges, blocks_of, check_grid
from .compose import Intersection, PerHead, Union
from .radial import Radial, radial_density
from .shifted_window import ShiftedWindow, hidiffusion_shift
from .sliding_window import SlidingWindow, inward_window
from .tile import SlidingTile

__all__ = [
    "Pattern",
    "PositionMaskMod",
    "check_grid",
    "blocks_of",
    "block_ranges",
    "SlidingWindow",
    "inward_window",
    "ShiftedWindow",
    "hidiffusion_shift",
    "Radial",
    "radial_density",
    "SlidingTile",
    "Union",
    "Intersection",
    "PerHead",
]
