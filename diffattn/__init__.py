"""diffattn: attention methods for diffusers models, delivered as hooks on their attention modules.

handle = diffattn.apply(pipe, diffattn.Dense(), layers=["transformer_blocks.1"], steps=0.25)
...
handle.remove()
"""

from . import editing, guidance
from .adapters import FamilyAdapter, RoleRule, register_adapter, supported_models
from .api import Handle, apply, attention_modules, remove
from .context import AttentionContext
from .errors import (
    ContextParallelError,
    DiffattnError,
    InterceptionError,
    LayerSelectionError,
    LayoutError,
    MethodConfigError,
    NonFiniteInputError,
    StepSelectionError,
    UnsupportedModelError,
)
from .inspection import inspect
from .layout import TokenLayout
from .methods import (
    HIDIFFUSION_LAYERS,
    AttentionMethod,
    AttentiveEraser,
    BoundedAttention,
    Dense,
    DynamicSparseAttention,
    EntropyScaling,
    LocalBlend,
    Masked,
    MutualSelfAttention,
    PromptToPrompt,
    PyramidSparseAttention,
    RadialAttention,
    Rettention,
    SemanticPermutation,
    ShiftedWindowAttention,
    SlidingTileAttention,
    SlidingWindowAttention,
    SparseAttention,
    TokenDownsampling,
)
from .methods.pag import PAG, SoftPAG
from .methods.seg import SEG
from .processors import DiffattnProcessor, processors
from .runtime import denoising_step
from .schedule import StepSchedule
from .tuning import TunedProfile, tune

__version__ = "0.1.0"

__all__ = [
    "apply",
    "tune",
    "TunedProfile",
    "remove",
    "Handle",
    "attention_modules",
    "processors",
    "inspect",
    "DiffattnProcessor",
    "AttentionMethod",
    "AttentionContext",
    "Dense",
    "Masked",
    "PAG",
    "SoftPAG",
    "SEG",
    "guidance",
    "editing",
    "MutualSelfAttention",
    "PromptToPrompt",
    "AttentiveEraser",
    "BoundedAttention",
    "LocalBlend",
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
    "EntropyScaling",
    "TokenLayout",
    "StepSchedule",
    "denoising_step",
    "FamilyAdapter",
    "RoleRule",
    "register_adapter",
    "supported_models",
    "DiffattnError",
    "ContextParallelError",
    "InterceptionError",
    "LayerSelectionError",
    "LayoutError",
    "MethodConfigError",
    "NonFiniteInputError",
    "StepSelectionError",
    "UnsupportedModelError",
]
