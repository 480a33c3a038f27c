"""Stable Cascade / Würstchen (``StableCascadeUNet``), refused.

``SDCascadeAttnBlock.forward`` (diffusers ``models/unets/unet_stable_cascade.py``, line 107) builds the keys and
values as ``torch.cat([image tokens, conditioning tokens], dim=1)`` while the queries are the image tokens alone:
the queries and keys are different sequences (so not self or joint attention) and the keys are not text alone (so
not cross attention).
"""

from __future__ import annotations

REFUSED = {
    "StableCascadeUNet": (
        "its attention blocks attend image queries over image + conditioning keys (keys and values are "
        "cat([image tokens, text/CLIP tokens]), queries the image tokens only), which is neither self, cross nor "
        "joint attention"
    ),
}
