"""Helpers several test rooms share (``tests/`` is on ``sys.path`` through pytest's ``pythonpath`` setting)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

import diffattn
from diffattn.testing import standalone_context, tiny_model


def make_ctx(layout, *, layer="layer", **kwargs):
    """:func:`diffattn.testing.standalone_context` on a layer named ``layer``."""
    return standalone_context(layout, layer=layer, **kwargs)


def qkv(batch, heads, n, dim=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, dim, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]


@dataclass(frozen=True)
class Recording(diffattn.AttentionMethod):
    """Dense attention that records ``read(q, k, ctx)`` (default: the step) of every call it handles."""

    read: Callable = lambda q, k, ctx: ctx.step
    seen: list = field(default_factory=list, compare=False)
    roles: frozenset = frozenset({"self"})

    def __call__(self, q, k, v, ctx):
        self.seen.append(self.read(q, k, ctx))
        return ctx.dense(q, k, v)


def ip_adapter_unet():
    """A tiny SD1.5 UNet with IP-Adapter's processor on every attn2 (its second SDPA call attends 4 image-prompt
    tokens), wired the way load_ip_adapter wires it."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    model = tiny_model("unet_sd15", seed=0)
    cross = model.config.cross_attention_dim
    projection = ImageProjection(image_embed_dim=16, cross_attention_dim=cross, num_image_text_embeds=4)
    model.encoder_hid_proj = MultiIPAdapterImageProjection([projection])
    model.register_to_config(encoder_hid_dim_type="ip_image_proj")
    for name, module in model.named_modules():
        if name.endswith("attn2"):
            processor = IPAdapterAttnProcessor2_0(module.to_q.out_features, cross, num_tokens=(4,), scale=1.0)
            module.set_processor(processor)
    return model


def generate(pipe, steps: int = 4, guidance_scale: float | None = None, **extra) -> np.ndarray:
    video = "Wan" in type(pipe).__name__
    kwargs = dict(num_frames=5, height=16, width=16) if video else dict(height=32, width=32)
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    kwargs.update(extra)
    out = pipe(
        "a red circle",
        num_inference_steps=steps,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    return np.asarray(out.frames if video else out.images)
