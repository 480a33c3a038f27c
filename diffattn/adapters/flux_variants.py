"""Models built like Flux (dual-stream blocks, then single-stream blocks over one ``[text | image]`` sequence), whose
forward takes packed latents ``(B, h*w, C)`` and position ids ``img_ids`` / ``txt_ids``: joint attention, text first,
the grid from ``img_ids``.

Where each model puts the text first (installed diffusers 0.42.1, ``diffusers/models/transformers/``):

- ``ChromaTransformer2DModel``: ``FluxAttnProcessor`` (``transformer_flux.py:113``, ``torch.cat([encoder_query,
  query])``) in the dual blocks; ``transformer_chroma.py:583`` ``torch.cat([encoder_hidden_states, hidden_states])``
  before the single blocks.
- ``BriaTransformer2DModel``: ``transformer_bria.py:156`` (``BriaAttnProcessor``) and ``:481`` (single block).
- ``BriaFiboTransformer2DModel``: ``transformer_bria_fibo.py:102`` (``BriaFiboAttnProcessor``, dual blocks) and
  ``:617`` ``torch.cat([encoder_hidden_states, hidden_states])`` before each single block (``BriaAttnProcessor``).
- ``LongCatImageTransformer2DModel``: ``transformer_longcat_image.py:103`` (processor) and ``:245`` (single block).
- ``OvisImageTransformer2DModel``: ``transformer_ovis_image.py:103`` (processor) and ``:245`` (single block).
- ``Flux2Transformer2DModel``: ``transformer_flux2.py:364`` (``Flux2AttnProcessor``) and ``:1378``
  ``torch.cat([encoder_hidden_states, hidden_states])`` before the single blocks (``Flux2ParallelSelfAttention``).
  Its ids are ``(t, h, w, l)``; reference images (Flux2 edit, Klein) sit at other ``t`` and their tokens are appended
  to ``hidden_states``, and the KV-cache modes (``kv_cache_mode``) add reference keys: both raise ``LayoutError``.
"""

from __future__ import annotations

import torch

from ..errors import LayoutError
from .base import FamilyAdapter, ModelInputs, RoleRule, ids_grid

_FLUX_BLOCKS = (RoleRule(r"(single_)?transformer_blocks\.\d+\.attn", "joint", text_first=True),)


def _flux2_grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
    """(height, width) from the image rows of the 4-axis ``img_ids``"""
    if inputs.get("kv_cache_mode") is not None:
        raise LayoutError(
            f"{type(model).__name__}: kv_cache_mode={inputs['kv_cache_mode']!r} attends the image and text to cached "
            "reference-image keys as well; diffattn's layout has text and one visual grid only"
        )
    return _IDS_GRID(model, inputs)


_IDS_GRID = ids_grid()

ADAPTERS = (
    # ChromaPipeline runs the unconditional branch as a second forward, with timestep / 1000
    FamilyAdapter(
        "chroma", "ChromaTransformer2DModel", _FLUX_BLOCKS, ids_grid(), cfg_in_batch=False, timestep_scale=1000.0
    ),
    # BriaPipeline stacks [uncond, cond] latents (pipeline_bria.py:674) and passes the raw timestep
    FamilyAdapter("bria", "BriaTransformer2DModel", _FLUX_BLOCKS, ids_grid()),
    # BriaFiboPipeline stacks [uncond, cond] latents too (pipeline_bria_fibo.py:663)
    FamilyAdapter("bria_fibo", "BriaFiboTransformer2DModel", _FLUX_BLOCKS, ids_grid()),
    FamilyAdapter(
        "longcat_image",
        "LongCatImageTransformer2DModel",
        _FLUX_BLOCKS,
        ids_grid(),
        cfg_in_batch=False,
        timestep_scale=1000.0,
    ),
    # Flux2Pipeline / Flux2KleinPipeline pass timestep / 1000; Klein runs the negative prompt as a second forward
    FamilyAdapter(
        "flux2", "Flux2Transformer2DModel", _FLUX_BLOCKS, _flux2_grid, cfg_in_batch=False, timestep_scale=1000.0
    ),
    FamilyAdapter(
        "ovis_image",
        "OvisImageTransformer2DModel",
        _FLUX_BLOCKS,
        ids_grid(),
        cfg_in_batch=False,
        timestep_scale=1000.0,
    ),
)
