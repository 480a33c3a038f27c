"""Krea 2 (``Krea2Transformer2DModel``): one stream of ``[text | image]`` tokens through every block, text first:
``transformer_krea2.py:514`` ``torch.cat([encoder_hidden_states, hidden_states], dim=1)``. The grid is read from the
image rows of ``position_ids`` (the last ``hidden_states.shape[1]`` rows, ``(t, h, w)`` each). The text-fusion
blocks (``text_fusion.*``: text only, the layer-wise ones over a ``B * tokens`` batch) are left alone.
"""

from __future__ import annotations

import torch

from ..errors import LayoutError
from .base import FamilyAdapter, ModelInputs, RoleRule, _require


def _grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
    """(height, width) from the image rows of ``position_ids``"""
    name = type(model).__name__
    tokens = _require(inputs, "hidden_states", name).shape[1]
    ids = _require(inputs, "position_ids", name)[-tokens:]
    h = int(ids[:, 1].max() - ids[:, 1].min()) + 1
    w = int(ids[:, 2].max() - ids[:, 2].min()) + 1
    if h * w != tokens:
        raise LayoutError(f"{name}: the image rows of position_ids span {h}x{w}, but hidden_states has {tokens} tokens")
    return (h, w)


ADAPTER = FamilyAdapter(
    "krea2",
    "Krea2Transformer2DModel",
    (RoleRule(r"transformer_blocks\.\d+\.attn", "joint", text_first=True),),
    _grid,
    cfg_in_batch=False,  # Krea2Pipeline runs the negative prompt as a second forward (pipeline_krea2.py:658)
    timestep_scale=1000.0,  # it passes t / num_train_timesteps (pipeline_krea2.py:644)
)
