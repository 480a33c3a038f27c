"""Qwen-Image (``QwenImageTransformer2DModel``): dual-stream blocks whose ``attn`` is joint attention over
``[text | image]``, text first: ``transformer_qwenimage.py:556`` ``torch.cat([txt_query, img_query], dim=1)`` in
``QwenDoubleStreamAttnProcessor2_0``. The grid from ``img_shapes`` (per sample, a list of ``(frames, h, w)`` after
patching; the pipelines give ``[[(1, h, w)]] * batch``).

Edit and layered pipelines list further shapes after the first (reference images, extra layers), whose tokens are
appended to ``hidden_states``: the grid reader raises ``LayoutError`` for those.
"""

from __future__ import annotations

import torch

from ..errors import LayoutError
from .base import FamilyAdapter, ModelInputs, RoleRule, _require


def _img_shapes_grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
    """``(h, w)`` of the generated image, from ``img_shapes`` (a ``(f, h, w)``, a list of them, or one list per
    sample), checked against the ``hidden_states`` token count."""
    name = type(model).__name__
    shapes = _require(inputs, "img_shapes", name)
    if isinstance(shapes, tuple) and len(shapes) == 3 and all(isinstance(n, int) for n in shapes):
        shapes = [shapes]
    if isinstance(shapes[0], list):  # one list per sample
        shapes = shapes[0]
    tokens = _require(inputs, "hidden_states", name).shape[1]
    frames, h, w = (int(n) for n in shapes[0])
    if len(shapes) > 1 or frames != 1 or frames * h * w != tokens:
        raise LayoutError(
            f"{name}: img_shapes {list(shapes)} describe more than one {h}x{w} image ({tokens} tokens in "
            "hidden_states); reference images (edit pipelines) and extra layers (layered pipeline) are not "
            "supported by diffattn's one-grid layout"
        )
    return (h, w)


ADAPTER = FamilyAdapter(
    "qwenimage",
    "QwenImageTransformer2DModel",
    (RoleRule(r"transformer_blocks\.\d+\.attn", "joint", text_first=True),),
    _img_shapes_grid,
    cfg_in_batch=False,  # QwenImagePipeline runs true CFG's negative prompt as a second forward
    timestep_scale=1000.0,  # with timestep / 1000 (pipeline_qwenimage.py:647)
)
