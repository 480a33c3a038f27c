"""Audio denoisers: refused. Their attention runs over a 1-D sequence of audio latent frames (plus text / prompt
tokens), so there is no visual token grid for diffattn's methods (sparse patterns, guidance and editing maps are all
laid out on an image or video grid)."""

from __future__ import annotations

_NO_GRID = "an audio model: its tokens are a 1-D sequence of audio latent frames, with no visual token grid"

REFUSED = {
    "StableAudioDiTModel": _NO_GRID,
    "StableAudio3DiTModel": _NO_GRID,
    "AceStepTransformer1DModel": _NO_GRID,
    "LongCatAudioDiTTransformer": _NO_GRID,
    "MiniMaxMusic3Transformer1DModel": _NO_GRID,
}
