"""Audio denoisers, tiny: refused (a 1-D sequence of audio frames, no visual grid)."""

from __future__ import annotations

import diffusers
import torch

from . import Refusal, seeded

_REASON = "no visual token grid"


def _stable_audio() -> torch.nn.Module:
    return diffusers.StableAudioDiTModel(
        sample_size=8,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        num_key_value_attention_heads=1,
        out_channels=4,
        cross_attention_dim=16,
        time_proj_dim=8,
        global_states_input_dim=16,
        cross_attention_input_dim=16,
    )


def _stable_audio3() -> torch.nn.Module:
    return diffusers.StableAudio3DiTModel(
        io_channels=4,
        embed_dim=16,
        depth=1,
        num_heads=2,
        cond_token_dim=8,
        global_cond_dim=8,
        local_add_cond_dim=5,
        timestep_features_dim=8,
        num_memory_tokens=2,
    )


def _ace_step() -> torch.nn.Module:
    return diffusers.AceStepTransformer1DModel(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        in_channels=8,
        audio_acoustic_hidden_dim=4,
        sliding_window=4,
    )


def _longcat() -> torch.nn.Module:
    return diffusers.LongCatAudioDiTTransformer(dit_dim=16, dit_depth=2, dit_heads=2, dit_text_dim=8, latent_dim=4)


def _minimax() -> torch.nn.Module:
    return diffusers.MiniMaxMusic3Transformer1DModel(
        in_channels=4,
        condition_dim=8,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=8,
        ff_inner_dim=32,
        rotary_dim=4,
        fourier_embedding_dim=8,
    )


REFUSALS = (
    Refusal("StableAudioDiTModel", seeded(_stable_audio), _REASON),
    Refusal("StableAudio3DiTModel", seeded(_stable_audio3), _REASON),
    Refusal("AceStepTransformer1DModel", seeded(_ace_step), _REASON),
    Refusal("LongCatAudioDiTTransformer", seeded(_longcat), _REASON),
    Refusal("MiniMaxMusic3Transformer1DModel", seeded(_minimax), _REASON),
)
