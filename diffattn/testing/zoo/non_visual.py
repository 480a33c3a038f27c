"""Diffusers models diffattn refuses because they have no visual token grid (audio, music, protein, embedding
priors), built tiny so the refusal is checked."""

from __future__ import annotations

import torch

from . import Refusal, seeded


def _unet1d() -> torch.nn.Module:
    from diffusers import UNet1DModel

    return UNet1DModel(block_out_channels=(8, 8, 16), extra_in_channels=16, in_channels=2, out_channels=2)


def _prior() -> torch.nn.Module:
    from diffusers import PriorTransformer

    return PriorTransformer(
        num_attention_heads=2, attention_head_dim=4, num_layers=1, embedding_dim=8, num_embeddings=7
    )


def _t5film() -> torch.nn.Module:
    from diffusers import T5FilmDecoder

    return T5FilmDecoder(
        input_dims=8, targets_length=8, d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32, dropout_rate=0.0
    )


def _rfd4() -> torch.nn.Module:
    from diffusers import RFD4ProteinaTransformer

    return RFD4ProteinaTransformer(
        nlayers=1,
        token_dim=16,
        nheads=2,
        dim_cond=8,
        pair_repr_dim=8,
        latent_dim=4,
        token_type_emb_dim=4,
        cath_emb_dim=4,
        t_emb_dim=8,
        seq_sep_dim=8,
        xt_pair_dist_dim=4,
    )


def _minimax_depth() -> torch.nn.Module:
    from diffusers import MiniMaxMusic3RVQDepthDecoder

    return MiniMaxMusic3RVQDepthDecoder(
        hidden_size=16,
        num_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        audio_vocab_size=8,
        num_codebooks=3,
        max_position_embeddings=8,
    )


REFUSALS = (
    Refusal("UNet1DModel", seeded(_unet1d), "1-D .* no visual grid"),
    Refusal("PriorTransformer", seeded(_prior), "embedding prior"),
    Refusal("T5FilmDecoder", seeded(_t5film), "spectrogram decoder"),
    Refusal("RFD4ProteinaTransformer", seeded(_rfd4), "protein structure model"),
    Refusal("MiniMaxMusic3RVQDepthDecoder", seeded(_minimax_depth), "causal attention"),
)
