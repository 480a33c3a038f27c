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
from .base import FamilyAdapter, GridFn, ModelInputs, RoleRule, _require

_FLUX_BLOCKS = (RoleRule(r"(single_)?transformer_blocks\.\d+\.attn", "joint", text_first=True),)


def _ids_grid(ids_key: str = "img_ids", tokens_key: str = "hidden_states") -> GridFn:
    """The ``(h, w)`` grid spanned by the position ids of the generated image: rows ``(modality, row, col)`` whose
    modality is the first row's (reference images carry another modality id and are not supported), each axis
    counted from its smallest id (LongCat starts the image ids after the text's)."""

    def grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
        name = type(model).__name__
        ids = _require(inputs, ids_key, name)
        ids = ids[0] if ids.ndim == 3 else ids
        tokens = _require(inputs, tokens_key, name).shape[1]
        own = ids[ids[:, 0] == ids[0, 0]]
        h = int(own[:, 1].max() - own[:, 1].min()) + 1
        w = int(own[:, 2].max() - own[:, 2].min()) + 1
        if h * w != tokens or own.shape[0] != tokens:
            raise LayoutError(
                f"{name}: {ids_key} describe a {h}x{w} image grid but {tokens_key} has {tokens} tokens; "
                "reference-image conditioning (edit pipelines that append image tokens) is not supported by this "
                "adapter."
            )
        return (h, w)

    return grid


def _flux2_grid(model: torch.nn.Module, inputs: ModelInputs) -> tuple[int, ...]:
    if inputs.get("kv_cache_mode") is not None:
        raise LayoutError(
            f"{type(model).__name__}: kv_cache_mode={inputs['kv_cache_mode']!r} attends the image and text to cached "
            "reference-image keys as well; diffattn's layout has text and one visual grid only"
        )
    return _IDS_GRID(model, inputs)


_IDS_GRID = _ids_grid()

ADAPTERS = (
    # ChromaPipeline runs the unconditional branch as a second forward, with timestep / 1000
    FamilyAdapter(
        "chroma", "ChromaTransformer2DModel", _FLUX_BLOCKS, _ids_grid(), cfg_in_batch=False, timestep_scale=1000.0
    ),
    # BriaPipeline stacks [uncond, cond] latents (pipeline_bria.py:674) and passes the raw timestep
    FamilyAdapter("bria", "BriaTransformer2DModel", _FLUX_BLOCKS, _ids_grid()),
    # BriaFiboPipeline stacks [uncond, cond] latents too (pipeline_bria_fibo.py:663)
    FamilyAdapter("bria_fibo", "BriaFiboTransformer2DModel", _FLUX_BLOCKS, _ids_grid()),
    FamilyAdapter(
        "longcat_image",
        "LongCatImageTransformer2DModel",
        _FLUX_BLOCKS,
        _ids_grid(),
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
        _ids_grid(),
        cfg_in_batch=False,
        timestep_scale=1000.0,
    ),
)
