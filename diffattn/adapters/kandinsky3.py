"""Kandinsky 3 (``Kandinsky3UNet``): self- and cross-attention blocks, a grid that halves per resolution level.

Each ``Kandinsky3DownSampleBlock`` / ``Kandinsky3UpSampleBlock`` (diffusers ``models/unets/unet_kandinsky3.py``) holds
``attentions``: entry 0 is self-attention over the level's ``H * W`` tokens (``Kandinsky3AttentionBlock.forward``
with ``context=None``: ``context = out``), entries 1.. are cross-attention (visual queries, the projected text as
keys, with the text mask); an entry is ``nn.Identity`` where the level has no attention. Each runs its inner
``Attention`` (``.attention``, ``AttnProcessor2_0``). Text and image never share a sequence. ``add_time_condition``
(attention pooling: one query, the mean of the text, over the text) has no visual tokens and is left alone.
The grid is the ``sample`` input's ``(H, W)``; deeper levels halve it.
"""

from __future__ import annotations

from .base import FamilyAdapter, RoleRule
from .unet2d import _sample_grid

ADAPTERS = (
    FamilyAdapter(
        "kandinsky3",
        "Kandinsky3UNet",
        (
            RoleRule(r"(down_blocks|up_blocks)\.\d+\.attentions\.0\.attention", "self"),
            RoleRule(r"(down_blocks|up_blocks)\.\d+\.attentions\.[1-9]\d*\.attention", "cross"),
        ),
        _sample_grid,
        multiscale=True,
    ),
)
