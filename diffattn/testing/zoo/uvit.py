"""aMUSEd (``UVit2DModel``), whose latent input is ``input_ids`` (VQ token ids)."""

from __future__ import annotations

import torch

from . import ZooCase, seeded

_TEXT_LEN = 7


def _uvit(downsample: bool) -> torch.nn.Module:
    from diffusers import UVit2DModel

    return UVit2DModel(
        hidden_size=16,
        cond_embed_dim=8,
        micro_cond_encode_dim=2,
        micro_cond_embed_dim=10,  # 5 micro-conditions x 2
        encoder_hidden_size=12,
        vocab_size=33,
        codebook_size=32,
        in_channels=8,
        block_out_channels=16,
        num_res_blocks=1,
        downsample=downsample,
        upsample=downsample,
        block_num_heads=2,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )


def _inputs(h: int, w: int) -> dict:
    torch.manual_seed(1)
    return {
        "input_ids": torch.randint(0, 32, (1, h, w)),
        "encoder_hidden_states": torch.randn(1, _TEXT_LEN, 12),
        "pooled_text_emb": torch.randn(1, 8),
        "micro_conds": torch.randn(1, 5),
    }


CASES = (
    ZooCase("UVit2DModel", seeded(lambda: _uvit(False)), lambda: _inputs(3, 5), (3, 5), text_len=_TEXT_LEN),
    # downsample: every layer sees the halved grid (3 x 5 of the 6 x 10 input)
    ZooCase(
        "UVit2DModel",
        seeded(lambda: _uvit(True)),
        lambda: _inputs(6, 10),
        (6, 10),
        text_len=_TEXT_LEN,
        name="UVit2DModel[downsample]",
    ),
)
