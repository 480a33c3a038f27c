"""Attention methods: each is a frozen dataclass called as ``method(q, k, v, ctx)``."""

from .base import AttentionMethod
from .bounded import BoundedAttention
from .dense import Dense
from .downsampling import TokenDownsampling
from .dynamic_sparse import DynamicSparseAttention
from .eraser import AttentiveEraser
from .local_blend import LocalBlend
from .masked import Masked
from .mutual import MutualSelfAttention
from .permutation import SemanticPermutation
from .prompt_to_prompt import PromptToPrompt
from .pyramid import PyramidSparseAttention
from .rettention import Rettention
from .scaling import EntropyScaling
from .sparse import (
    HIDIFFUSION_LAYERS,
    RadialAttention,
    ShiftedWindowAttention,
    SlidingTileAttention,
    SlidingWindowAttention,
    SparseAttention,
)

__all__ = [
    "AttentionMethod",
    "Dense",
    "Masked",
    "SparseAttention",
    "SlidingTileAttention",
    "SlidingWindowAttention",
    "ShiftedWindowAttention",
    "RadialAttention",
    "HIDIFFUSION_LAYERS",
    "DynamicSparseAttention",
    "SemanticPermutation",
    "PyramidSparseAttention",
    "Rettention",
    "TokenDownsampling",
    "MutualSelfAttention",
    "PromptToPrompt",
    "AttentiveEraser",
    "BoundedAttention",
    "LocalBlend",
    "EntropyScaling",
]
