"""Qwen-Image (``QwenImageTransformer2DModel``): dual-stream blocks whose ``attn`` is joint attention over
``[text | image]``, text first: ``transformer_qwenimage.py:556`` ``torch.cat([txt_query, img_query], dim=1)`` in
``QwenDoubleStreamAttnProcessor2_0``. The grid from ``img_shapes`` (per sample, a list of ``(frames, h, w)`` after
patching; the pipelines give ``[[(1, h, w)]] * batch``).

Edit and layered pipelines list further shapes after the first (reference images, extra layers), whose tokens are
appended to ``hidden_states``: the grid reader raises ``LayoutError`` for those.

Refused: ``QwenImage21Transformer2DModel`` (Qwen-Image 2.1) attends block-causally: its processors run one attention
call per text / condition-image segment (each over the keys before it, the text ones with a causal mask) and one for
the target image over all keys (``transformer_qwenimage21.py:505-545``), and with the KV cache the target image's
queries attend cached text and condition keys (``:362-366``).
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

REFUSED = {
    "QwenImage21Transformer2DModel": (
        "block-causal attention: each layer runs one attention call per text / condition-image segment (causal "
        "within the text) and the target image attends a prefix of text and condition-image keys, which the self / "
        "cross / joint roles over one visual grid cannot describe"
    ),
}
