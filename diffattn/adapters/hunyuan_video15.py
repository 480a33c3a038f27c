"""HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``): joint video + conditioning attention, video tokens
first, over ``(B, C, F, H, W)`` latents patched by ``(patch_size_t, patch_size, patch_size)``.

Where the text goes (diffusers 0.42.1): ``HunyuanVideo15AttnProcessor2_0`` appends the conditioning tokens after the
video tokens, ``torch.cat([query, encoder_query], dim=1)`` (models/transformers/transformer_hunyuan_video15.py,
line 97), before one ``dispatch_attention_fn``. The conditioning run is what the model's forward stacked at lines
739-753: the image-prompt (SigLIP) tokens, the ByT5 tokens and the MLLM tokens, valid ones first; diffattn counts all
of it as the text run. The token refiner's attention (``context_embedder.token_refiner...``) sees text only and is
left alone.

HunyuanVideo-Framepack (``HunyuanVideoFramepackTransformer3DModel``) is refused: its forward prepends the clean and
2x / 4x history latents to the video tokens (transformer_hunyuan_video_framepack.py, lines 392-406), at other
resolutions than the generated grid.
"""

from __future__ import annotations

from .base import FamilyAdapter, RoleRule, _video_grid

ADAPTER = FamilyAdapter(
    "hunyuan_video15",
    "HunyuanVideo15Transformer3DModel",
    (RoleRule(r"transformer_blocks\.\d+\.attn", "joint", text_first=False),),
    _video_grid(channels_first=True),
)

REFUSED = {
    "HunyuanVideoFramepackTransformer3DModel": (
        "its forward prepends clean and 2x/4x-downsampled history latents (latents_clean, latents_history_2x, "
        "latents_history_4x) to the video tokens, so the attention sequence is not one visual grid plus text"
    ),
}
