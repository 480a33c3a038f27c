"""Tiny random-weight diffusers models, inputs and pipelines for offline tests.

Everything here is built from small configs: nothing is downloaded, weights are random (seeded) and
one forward pass takes milliseconds on a CPU.

* :func:`tiny_model` builds the denoiser of a model family (``FAMILIES``).
* :func:`tiny_inputs` builds keyword arguments for that denoiser whose visual token grid, after
  patching, is a requested ``(h, w)`` (image families) or ``(f, h, w)`` (video families).
* :func:`visual_grid_of` reads that grid back from such inputs.
* :func:`tiny_pipeline` assembles a complete standard diffusers pipeline (VAE, text encoders,
  locally built tokenizers, scheduler) around the same tiny denoisers.

Grid conventions (``grid`` is always counted in visual tokens of the denoiser's first attention
level, in row-major ``(f, h, w)`` / ``(h, w)`` order):

* ``unet_sd15`` / ``unet_sdxl``: no patching, ``grid == latent (H, W)``; any size >= 1 works (the
  UNet matches its upsampling to the skip size). Level 1 is ``(ceil(H/2), ceil(W/2))``. sd15 attends
  at level 0 (``down_blocks.0``, ``up_blocks.1``) and level 1 (``mid_block``); sdxl only at level 1
  (``down_blocks.1``, ``mid_block``, ``up_blocks.0``), like SDXL, whose top level has no attention.
* ``sd3``: patch 2, latent ``(2h, 2w)``; ``h, w <= SD3_POS_EMBED_MAX`` (cropped position table).
* ``flux``: latents are already 2x2-packed tokens ``(B, h*w, 16)``; the grid comes from ``img_ids``.
* ``wan``: patch ``(1, 2, 2)``, latent ``(B, 16, f, 2h, 2w)``; each of ``f, h, w <= WAN_ROPE_MAX``.
* ``cogvideox``: patch 2 per frame, latent ``(B, f, 4, 2h, 2w)``; the text length is fixed to
  ``COGVIDEOX_TEXT_LEN`` (the sin-cos position table covers ``text + video`` tokens).
* ``hunyuan_video``: patch 2, patch_t 1, latent ``(B, 4, f, 2h, 2w)``.
* ``ltx_video``: patch 1, latents are packed tokens ``(B, f*h*w, 8)`` plus ``num_frames/height/width``.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

__all__ = [
    "FAMILIES",
    "VIDEO_FAMILIES",
    "IMAGE_FAMILIES",
    "PIPELINE_KINDS",
    "tiny_model",
    "tiny_inputs",
    "visual_grid_of",
    "tiny_pipeline",
]

FAMILIES: tuple[str, ...] = (
    "unet_sd15",
    "unet_sdxl",
    "sd3",
    "flux",
    "wan",
    "cogvideox",
    "hunyuan_video",
    "ltx_video",
)
VIDEO_FAMILIES: frozenset[str] = frozenset({"wan", "cogvideox", "hunyuan_video", "ltx_video"})
IMAGE_FAMILIES: frozenset[str] = frozenset(FAMILIES) - VIDEO_FAMILIES
PIPELINE_KINDS: tuple[str, ...] = ("sd", "sdxl", "flux", "wan", "sd3")

#: Largest patch grid side the tiny SD3 model accepts (its cropped position-embedding table).
SD3_POS_EMBED_MAX = 32
#: Largest (patched) frames / height / width the tiny Wan model accepts (its RoPE table length).
WAN_ROPE_MAX = 128
#: Text length the tiny CogVideoX model requires (its sin-cos table reserves this many text slots).
COGVIDEOX_TEXT_LEN = 7

# Text-embedding widths the denoisers expect (and that tiny_pipeline's text encoders produce).
_TEXT_DIM = 32
_SDXL_POOLED_DIM = 16  # CLIPTextModelWithProjection projection_dim of SDXL's second encoder
_SDXL_TIME_EMBED_DIM = 8
_HUNYUAN_POOLED_DIM = 16
_LTX_CHANNELS = 8
_TIMESTEP = 500.0


# --------------------------------------------------------------------------------------------------
# Denoisers
# --------------------------------------------------------------------------------------------------
def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _build_model(family: str) -> torch.nn.Module:
    import diffusers

    if family == "unet_sd15":
        # SD1.5 layout shrunk to two levels: attention at full resolution and in the mid block.
        return diffusers.UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=2,
            norm_num_groups=8,
            cross_attention_dim=_TEXT_DIM,
            attention_head_dim=(2, 4),  # SD1.5 meaning: number of heads -> head dim 16
        )
    if family == "unet_sdxl":
        # SDXL layout shrunk to two levels: plain first level, linear-projection transformers below.
        return diffusers.UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2),
            norm_num_groups=8,
            cross_attention_dim=_TEXT_DIM,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=_SDXL_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=6 * _SDXL_TIME_EMBED_DIM + _SDXL_POOLED_DIM,
        )
    if family == "sd3":
        return diffusers.SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=_TEXT_DIM,
            caption_projection_dim=32,  # must equal heads * head_dim
            pooled_projection_dim=_TEXT_DIM,
            pos_embed_max_size=SD3_POS_EMBED_MAX,
            dual_attention_layers=(0,),  # SD3.5 style: block 0 has an extra self-attention `attn2`
            qk_norm="rms_norm",
        )
    if family == "flux":
        return diffusers.FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels packed 2x2
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=_TEXT_DIM,
            pooled_projection_dim=_TEXT_DIM,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        )
    if family == "wan":
        return diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,  # RoPE split t/h/w = 4/4/4
            in_channels=16,
            out_channels=16,
            text_dim=_TEXT_DIM,
            freq_dim=32,
            ffn_dim=48,
            num_layers=2,
            rope_max_seq_len=WAN_ROPE_MAX,
        )
    if family == "cogvideox":
        return diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=4,
            time_embed_dim=32,
            text_embed_dim=_TEXT_DIM,
            num_layers=2,
            sample_width=16,
            sample_height=16,
            sample_frames=9,  # 3 latent frames; other sizes recompute the sin-cos table
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=COGVIDEOX_TEXT_LEN,
            use_rotary_positional_embeddings=False,
            use_learned_positional_embeddings=False,
        )
    if family == "hunyuan_video":
        return diffusers.HunyuanVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=1,
            num_single_layers=1,
            num_refiner_layers=1,
            mlp_ratio=2.0,
            patch_size=2,
            patch_size_t=1,
            guidance_embeds=True,
            text_embed_dim=_TEXT_DIM,
            pooled_projection_dim=_HUNYUAN_POOLED_DIM,
            rope_axes_dim=(4, 6, 6),  # sums to attention_head_dim
        )
    if family == "ltx_video":
        return diffusers.LTXVideoTransformer3DModel(
            in_channels=_LTX_CHANNELS,
            out_channels=_LTX_CHANNELS,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=2,
            attention_head_dim=16,
            cross_attention_dim=32,  # must equal heads * head_dim
            num_layers=2,
            caption_channels=_TEXT_DIM,
        )
    raise AssertionError(family)  # unreachable: _check_family ran first


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """Random-weight tiny model of that family, eval mode, fp32, CPU, deterministic for a seed.

    The global torch RNG state is left untouched.
    """
    _check_family(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build_model(family)
    if any(p.dtype != torch.float32 for p in model.parameters()):  # only if the default dtype was changed
        model = model.float()
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
def _check_grid(family: str, grid: tuple[int, ...]) -> tuple[int, ...]:
    grid = tuple(int(g) for g in grid)
    want = 3 if family in VIDEO_FAMILIES else 2
    if len(grid) != want:
        kind = "(f, h, w)" if want == 3 else "(h, w)"
        raise ValueError(f"{family} needs a {kind} grid, got {grid}")
    if min(grid) < 1:
        raise ValueError(f"grid sizes must be >= 1, got {grid}")
    if family == "sd3" and max(grid) > SD3_POS_EMBED_MAX:
        raise ValueError(f"sd3 grid sides must be <= {SD3_POS_EMBED_MAX}, got {grid}")
    if family == "wan" and max(grid) > WAN_ROPE_MAX:
        raise ValueError(f"wan grid sizes must be <= {WAN_ROPE_MAX}, got {grid}")
    return grid


def _flux_img_ids(h: int, w: int) -> torch.Tensor:
    """Flux image position ids, (h*w, 3) rows of (0, row, col) as the Flux pipeline builds them."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def tiny_inputs(
    family: str,
    grid: tuple[int, ...],
    *,
    batch: int = 1,
    text_len: int = 7,
    seed: int = 0,
) -> dict[str, Any]:
    """Keyword arguments for ``tiny_model(family)(**inputs)`` with a visual token grid ``grid``.

    ``grid`` is ``(h, w)`` for image families and ``(f, h, w)`` for video families, counted after
    patching. Latents and text embeddings are seeded random normals; the timestep is 500 on the
    model's own scale (0.5 for Flux, whose transformer multiplies by 1000). ``return_dict=False``
    is included, so the model returns a tuple whose first item is the prediction.
    """
    _check_family(family)
    grid = _check_grid(family, grid)
    if batch < 1 or text_len < 1:
        raise ValueError("batch and text_len must be >= 1")
    if family == "cogvideox" and text_len != COGVIDEOX_TEXT_LEN:
        raise ValueError(f"the tiny cogvideox model needs text_len == {COGVIDEOX_TEXT_LEN}, got {text_len}")

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    b = batch
    timestep = torch.full((b,), _TIMESTEP)
    text = randn(b, text_len, _TEXT_DIM)

    if family == "unet_sd15":
        h, w = grid
        return {
            "sample": randn(b, 4, h, w),
            "timestep": timestep,
            "encoder_hidden_states": text,
            "return_dict": False,
        }
    if family == "unet_sdxl":
        h, w = grid
        size = [8 * h, 8 * w]  # pixel size the latents stand for: original, crop top-left, target
        time_ids = torch.tensor([size + [0, 0] + size], dtype=torch.float32).repeat(b, 1)
        return {
            "sample": randn(b, 4, h, w),
            "timestep": timestep,
            "encoder_hidden_states": text,
            "added_cond_kwargs": {"text_embeds": randn(b, _SDXL_POOLED_DIM), "time_ids": time_ids},
            "return_dict": False,
        }
    if family == "sd3":
        h, w = grid
        return {
            "hidden_states": randn(b, 4, 2 * h, 2 * w),
            "encoder_hidden_states": text,
            "pooled_projections": randn(b, _TEXT_DIM),
            "timestep": timestep,
            "return_dict": False,
        }
    if family == "flux":
        h, w = grid
        return {
            "hidden_states": randn(b, h * w, 16),
            "encoder_hidden_states": text,
            "pooled_projections": randn(b, _TEXT_DIM),
            "timestep": timestep / 1000.0,
            "img_ids": _flux_img_ids(h, w),
            "txt_ids": torch.zeros(text_len, 3),
            "guidance": torch.full((b,), 3.5),
            "return_dict": False,
        }
    if family == "wan":
        f, h, w = grid
        return {
            "hidden_states": randn(b, 16, f, 2 * h, 2 * w),
            "timestep": timestep,
            "encoder_hidden_states": text,
            "return_dict": False,
        }
    if family == "cogvideox":
        f, h, w = grid
        return {
            "hidden_states": randn(b, f, 4, 2 * h, 2 * w),
            "encoder_hidden_states": text,
            "timestep": timestep,
            "return_dict": False,
        }
    if family == "hunyuan_video":
        f, h, w = grid
        return {
            "hidden_states": randn(b, 4, f, 2 * h, 2 * w),
            "timestep": timestep,
            "encoder_hidden_states": text,
            "encoder_attention_mask": torch.ones(b, text_len),
            "pooled_projections": randn(b, _HUNYUAN_POOLED_DIM),
            "guidance": torch.full((b,), 6000.0),  # guidance_scale 6 * 1000, as the pipeline does
            "return_dict": False,
        }
    if family == "ltx_video":
        f, h, w = grid
        return {
            "hidden_states": randn(b, f * h * w, _LTX_CHANNELS),
            "encoder_hidden_states": text,
            "timestep": timestep,
            "encoder_attention_mask": torch.ones(b, text_len),
            "num_frames": f,
            "height": h,
            "width": w,
            # what LTXPipeline passes: (vae temporal ratio / frame rate, vae spatial, vae spatial)
            "rope_interpolation_scale": (8 / 25, 32.0, 32.0),
            "return_dict": False,
        }
    raise AssertionError(family)


def visual_grid_of(family: str, inputs: dict) -> tuple[int, ...]:
    """The visual token grid implied by ``inputs`` (same convention as :func:`tiny_inputs`)."""
    _check_family(family)
    if family in ("unet_sd15", "unet_sdxl"):
        h, w = inputs["sample"].shape[-2:]
        return (int(h), int(w))
    if family == "sd3":
        h, w = inputs["hidden_states"].shape[-2:]
        return (int(h) // 2, int(w) // 2)
    if family == "flux":
        ids = inputs["img_ids"]
        ids = ids[0] if ids.ndim == 3 else ids
        h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        if h * w != inputs["hidden_states"].shape[1]:
            raise ValueError("img_ids do not describe a full row-major grid of the latent tokens")
        return (h, w)
    if family in ("wan", "hunyuan_video"):
        f, h, w = inputs["hidden_states"].shape[-3:]
        return (int(f), int(h) // 2, int(w) // 2)
    if family == "cogvideox":
        _, f, _, h, w = inputs["hidden_states"].shape
        return (int(f), int(h) // 2, int(w) // 2)
    if family == "ltx_video":
        grid = (int(inputs["num_frames"]), int(inputs["height"]), int(inputs["width"]))
        if grid[0] * grid[1] * grid[2] != inputs["hidden_states"].shape[1]:
            raise ValueError("num_frames * height * width does not match the latent token count")
        return grid
    raise AssertionError(family)


# --------------------------------------------------------------------------------------------------
# Tokenizers (built locally; nothing is downloaded)
# --------------------------------------------------------------------------------------------------
_CLIP_MAX_LEN = 77  # as the real CLIP tokenizers
_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
_WORDS = (  # whole-word tokens of both tokenizers (so common prompt words are one token)
    "a an the of and with in on at to photo picture painting video image red green blue yellow black "
    "white circle square triangle cat dog bird car tree house man woman sky sea mountain city night day"
).split()
_T5_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;()\"&/"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges (lowest rank first) to one word's symbols."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


_clip_dir: Path | None = None


def write_clip_vocab(folder: Path, words: Iterable[str]) -> Path:
    """Write a CLIP ``vocab.json`` and ``merges.txt`` into ``folder`` (load with ``CLIPTokenizer.from_pretrained``).

    Byte-level BPE: every byte is a token (so any text encodes), and each of ``words`` is merged into a single
    ``word</w>`` token.
    """
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        # Split the word with the merges so far, then append merges that join those pieces left to
        # right. Appended merges rank last, so words handled earlier keep their single token.
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            ranks.setdefault((pieces[0], pieces[1]), len(ranks))
            tokens.append(pieces[0] + pieces[1])
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    vocab[_CLIP_BOS] = len(vocab)
    vocab[_CLIP_EOS] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = "".join(f"{a} {b}\n" for a, b in ranks)  # dicts keep insertion (= rank) order
    (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
    return folder


def _clip_tokenizer_dir() -> Path:
    """A per-process temp folder with the tiny models' CLIP vocabulary (common prompt words are one token)."""
    global _clip_dir
    if _clip_dir is not None and (_clip_dir / "merges.txt").is_file():
        return _clip_dir
    folder = Path(tempfile.mkdtemp(prefix="diffattn-tiny-tok-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    _clip_dir = write_clip_vocab(folder, _WORDS)
    return folder


def _clip_tokenizer(pad_token: str = _CLIP_EOS) -> Any:
    """Byte-level CLIP tokenizer (common words are single tokens), model_max_length 77."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(
        str(_clip_tokenizer_dir()), model_max_length=_CLIP_MAX_LEN, pad_token=pad_token
    )


def _clip_ids(tokenizer: Any) -> dict[str, int]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _t5_tokenizer() -> Any:
    """T5-like fast tokenizer: whitespace/punctuation split, WordPiece over a few words + characters.

    Ids: <pad>=0, </s>=1, <unk>=2 (as in T5); every encoded text ends with </s>.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    tokens = ["<pad>", "</s>", "<unk>"] + list(_WORDS)
    tokens += [c for c in _T5_CHARS if c not in tokens] + ["##" + c for c in _T5_CHARS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tok = Tokenizer(WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=64))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
        padding_side="right",
    )


# --------------------------------------------------------------------------------------------------
# Text encoders and VAEs
# --------------------------------------------------------------------------------------------------
def _clip_text_model(tokenizer: Any, hidden: int, *, projection_dim: int | None = None) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=max(1024, len(tokenizer)),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=_CLIP_MAX_LEN,
        projection_dim=projection_dim or hidden,
        hidden_act="quick_gelu",
        **_clip_ids(tokenizer),
    )
    cls = CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection
    return cls(config)


def _t5_encoder(tokenizer: Any, *, umt5: bool = False) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    cfg_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = cfg_cls(
        vocab_size=max(128, len(tokenizer)),
        d_model=_TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return model_cls(config)


def _vae(*, latent_channels: int = 4, flow: str | None = None) -> torch.nn.Module:
    """Two-level AutoencoderKL (spatial factor 2). ``flow`` = "sd3" / "flux" adds their scaling and shift."""
    from diffusers import AutoencoderKL

    extra: dict[str, Any] = {}
    if flow in ("sd3", "flux"):  # the real SD3 / Flux VAE latent statistics; no quant convs
        scaling, shift = (1.5305, 0.0609) if flow == "sd3" else (0.3611, 0.1159)
        extra = {"scaling_factor": scaling, "shift_factor": shift}
        extra.update(use_quant_conv=False, use_post_quant_conv=False)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        **extra,
    )


def _wan_vae() -> torch.nn.Module:
    """AutoencoderKLWan with real compression (8x spatial, 4x temporal) but tiny widths."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )


# --------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------
def _build_pipeline(kind: str) -> DiffusionPipeline:
    import diffusers

    if kind == "sd":
        tok = _clip_tokenizer()
        return diffusers.StableDiffusionPipeline(
            vae=_vae(),
            text_encoder=_clip_text_model(tok, _TEXT_DIM),
            tokenizer=tok,
            unet=_build_model("unet_sd15"),
            # SD1.5's shipped DDIM settings (the class defaults trigger the pipeline's deprecation warnings)
            scheduler=diffusers.DDIMScheduler(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                clip_sample=False,
                set_alpha_to_one=False,
                steps_offset=1,
            ),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if kind == "sdxl":
        tok, tok2 = _clip_tokenizer(), _clip_tokenizer(pad_token="!")
        half = _TEXT_DIM // 2  # the UNet cross-attends to both encoders' hidden states concatenated
        return diffusers.StableDiffusionXLPipeline(
            vae=_vae(),
            text_encoder=_clip_text_model(tok, half),
            text_encoder_2=_clip_text_model(tok2, half, projection_dim=_SDXL_POOLED_DIM),
            tokenizer=tok,
            tokenizer_2=tok2,
            unet=_build_model("unet_sdxl"),
            scheduler=diffusers.EulerDiscreteScheduler(),
            add_watermarker=False,
        )
    if kind == "sd3":
        tok, tok2, tok3 = _clip_tokenizer(), _clip_tokenizer(pad_token="!"), _t5_tokenizer()
        half = _TEXT_DIM // 2  # CLIP-L and CLIP-G hidden states are concatenated, padded to T5 width
        return diffusers.StableDiffusion3Pipeline(
            transformer=_build_model("sd3"),
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_vae(flow="sd3"),
            text_encoder=_clip_text_model(tok, half, projection_dim=half),
            tokenizer=tok,
            text_encoder_2=_clip_text_model(tok2, half, projection_dim=half),
            tokenizer_2=tok2,
            text_encoder_3=_t5_encoder(tok3),
            tokenizer_3=tok3,
        )
    if kind == "flux":
        tok, tok2 = _clip_tokenizer(), _t5_tokenizer()
        return diffusers.FluxPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0),
            vae=_vae(flow="flux"),
            text_encoder=_clip_text_model(tok, _TEXT_DIM),
            tokenizer=tok,
            text_encoder_2=_t5_encoder(tok2),
            tokenizer_2=tok2,
            transformer=_build_model("flux"),
        )
    if kind == "wan":
        tok = _t5_tokenizer()
        return diffusers.WanPipeline(
            tokenizer=tok,
            text_encoder=_t5_encoder(tok, umt5=True),
            vae=_wan_vae(),
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0),
            transformer=_build_model("wan"),
        )
    raise ValueError(f"unknown pipeline kind {kind!r}; expected one of {PIPELINE_KINDS}")


def tiny_pipeline(kind: str, seed: int = 0) -> DiffusionPipeline:
    """A full standard diffusers pipeline with tiny random components; ``kind`` in ``PIPELINE_KINDS``.

    sd -> StableDiffusionPipeline, sdxl -> StableDiffusionXLPipeline, flux -> FluxPipeline,
    wan -> WanPipeline, sd3 -> StableDiffusion3Pipeline. The denoiser has the same config as
    ``tiny_model`` of the matching family. VAEs compress 2x spatially (Wan: 8x spatial, 4x temporal),
    CLIP tokenizers have ``model_max_length`` 16. Deterministic for a seed; the global RNG is untouched.
    """
    if kind not in PIPELINE_KINDS:
        raise ValueError(f"unknown pipeline kind {kind!r}; expected one of {PIPELINE_KINDS}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _build_pipeline(kind)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            if any(p.dtype != torch.float32 for p in component.parameters()):
                component.float()
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
