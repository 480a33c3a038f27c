"""MiniMax-H3 (``MiniMaxH3Transformer3DModel``, ``transformer_minimax_h3.py`` in diffusers 0.42.1): refused. Its
blocks run full self-attention over one packed sequence holding the text, the audio rows and the conditioning and
target video rows, each placed at caller-chosen positions (``index_copy`` by ``text_indices`` / ``video_indices`` /
``audio_indices``, lines 636-638)."""

from __future__ import annotations

REFUSED = {
    "MiniMaxH3Transformer3DModel": (
        "its attention runs over one packed sequence of text, audio and (conditioning and target) video rows at "
        "caller-chosen positions (video_indices / audio_indices / text_indices), not text plus one visual grid"
    ),
}
