"""Diffusers models with no visual token grid (audio, music, protein, embedding priors), or whose attention diffattn
cannot replace; all refused with the obstacle named."""

from __future__ import annotations

REFUSED = {
    "UNet1DModel": (
        "a 1-D (audio / trajectory) UNet with no visual grid, and its attention (SelfAttention1d) is a manual "
        "softmax in a module without an attention processor, so there is no SDPA call to replace"
    ),
    "PriorTransformer": (
        "an embedding prior: its sequence is [text tokens, text embedding, time embedding, image embedding, "
        "prediction token] of CLIP vectors under a causal mask, with no visual grid"
    ),
    "T5FilmDecoder": (
        "a spectrogram decoder over 1-D audio frames with no visual grid, and its attention processor "
        "(AttnProcessor) computes a manual softmax, not SDPA"
    ),
    "RFD4ProteinaTransformer": (
        "a protein structure model: attention over residues with a pair-representation bias, with no visual grid"
    ),
    "MiniMaxMusic3RVQDepthDecoder": (
        "an autoregressive music-codebook decoder: causal attention over RVQ depth steps, with no visual grid"
    ),
}
