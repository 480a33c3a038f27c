"""Attention methods: each is a frozen dataclass called as ``method(q, k, v, ctx)``."""

from .base import AttentionMethod
from .dense import Dense
from .masked import Masked
from .sparse import SlidingTileAttention, SparseAttention

__all__ = ["AttentionMethod", "Dense", "Masked", "SparseAttention", "SlidingTileAttention"]
