"""Mochi (``MochiTransformer3DModel``): refused.

Its ``MochiAttention`` modules carry a ``processor`` but no ``set_processor``, so they are not diffusers attention
modules to diffattn; and ``MochiAttnProcessor2_0`` runs one SDPA call per batch entry over
``[video, valid text]`` (models/attention_processor.py, lines 1066-1079), which batch-role methods cannot follow.
"""

from __future__ import annotations

REFUSED = {
    "MochiTransformer3DModel": (
        "its MochiAttention modules have no set_processor (diffattn finds no attention module to hook), and its "
        "processor attends each batch entry in a separate SDPA call"
    ),
}
