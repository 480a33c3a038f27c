"""The embedded default models: tiny image and video diffusion models trained here on shapes scenes.

Both load offline with standard diffusers classes: ``StableDiffusionPipeline.from_pretrained(IMAGE_MODEL_DIR)``
and ``ShapesVideoPipeline.from_pretrained(VIDEO_MODEL_DIR)`` (a ``DiffusionPipeline`` around the standard
``WanTransformer3DModel``). Their configs live here so training scripts and fallbacks build the same models.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from diffattn.testing import write_clip_vocab

from .grammar import VOCABULARY

__all__ = [
    "IMAGE_MODEL_DIR",
    "SCENES_MODEL_DIR",
    "SCENES_MAX_TEXT_TOKENS",
    "VIDEO_MODEL_DIR",
    "MAX_TEXT_TOKENS",
    "IMAGE_INVERSION_PSNR",
    "shapes_tokenizer",
    "scenes_tokenizer",
    "shapes_text_encoder",
    "video_transformer",
    "load_image_pipeline",
    "load_scenes_pipeline",
    "load_video_pipeline",
    "random_video_pipeline",
]

ASSETS = Path(__file__).parent / "assets"
IMAGE_MODEL_DIR = ASSETS / "shapes-image"
VIDEO_MODEL_DIR = ASSETS / "shapes-video"
SCENES_MODEL_DIR = ASSETS / "shapes-scenes"
MAX_TEXT_TOKENS = 32
#: The scenes model's captions run to 37 tokens (three objects with every attribute and a background phrase).
SCENES_MAX_TEXT_TOKENS = 48
#: The image model's out-of-domain limit: an image it regenerates from its DDIM inversion (20 steps, no guidance) at
#: a lower PSNR (dB) is unlike its training data (``diffattn.editing.check_reconstruction``). Measured with
#: ``python scripts/eval_inversion.py --model image --cases 20`` (rendered scenes vs photo-like and striped images):
#: in-domain 18.8-39.0 dB (mean 32.9), out-of-domain 8.3-14.2 dB (mean 9.8); the midpoint of the closest two.
IMAGE_INVERSION_PSNR = 16.5


def _grammar_tokenizer(words: tuple[str, ...], max_tokens: int) -> Any:
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_clip_vocab(Path(folder), words)
        return CLIPTokenizer.from_pretrained(folder, model_max_length=max_tokens, pad_token="<|endoftext|>")


def shapes_tokenizer() -> Any:
    """CLIP tokenizer whose vocabulary is the shapes grammar (every grammar word is one token)."""
    return _grammar_tokenizer(VOCABULARY, MAX_TEXT_TOKENS)


def scenes_tokenizer() -> Any:
    """The scenes model's tokenizer: the shapes grammar's words plus pattern and background words (one token each),
    up to SCENES_MAX_TEXT_TOKENS tokens. ``shapes_tokenizer`` (the first model's) is unchanged."""
    from .scenes import SCENE_VOCABULARY

    return _grammar_tokenizer(SCENE_VOCABULARY, SCENES_MAX_TEXT_TOKENS)


def shapes_text_encoder(tokenizer: Any, layers: int = 4, max_tokens: int = MAX_TEXT_TOKENS) -> torch.nn.Module:
    """The embedded models' CLIP text encoder (the shipped models use 4 layers; the scenes model reads
    SCENES_MAX_TEXT_TOKENS tokens)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=max_tokens,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def video_transformer(ffn_dim: int = 256) -> torch.nn.Module:
    """The embedded video model's WanTransformer3DModel: pixel space, 4x4 patches, 4 layers of 4 x 32 heads; its
    input is the noisy frames plus three coordinate channels (see ``shapes_video.with_coordinates``). ``ffn_dim``:
    the feed-forward width (256 for the first shipped model)."""
    from diffusers import WanTransformer3DModel

    from .shapes_video import COORDINATE_CHANNELS

    return WanTransformer3DModel(
        patch_size=(1, 4, 4),
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=3 + COORDINATE_CHANNELS,
        out_channels=3,
        text_dim=64,
        freq_dim=64,
        ffn_dim=ffn_dim,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=128,
    )


def _require(path: Path, what: str, script: str) -> Path:
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the embedded {what} model is not at {path}; train it with `python scripts/{script}` "
            "(or pass the folder of a trained checkpoint)"
        )
    return path


def load_image_pipeline(path: str | Path | None = None, **kwargs: Any) -> Any:
    from diffusers import StableDiffusionPipeline

    folder = _require(Path(path or IMAGE_MODEL_DIR), "image", "train_shapes_image.py")
    return StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, **kwargs)


def load_scenes_pipeline(path: str | Path | None = None, **kwargs: Any) -> Any:
    """The second embedded image model (textured scenes, captions that leave attributes open; see ``scenes``)."""
    from diffusers import StableDiffusionPipeline

    folder = _require(Path(path or SCENES_MODEL_DIR), "scenes image", "train_shapes_scenes.py")
    return StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, **kwargs)


def load_video_pipeline(path: str | Path | None = None, **kwargs: Any) -> Any:
    from .shapes_video import ShapesVideoPipeline

    folder = _require(Path(path or VIDEO_MODEL_DIR), "video", "train_shapes_video.py")
    return ShapesVideoPipeline.from_pretrained(folder, local_files_only=True, **kwargs)


def random_video_pipeline(seed: int = 0) -> Any:
    """The embedded video pipeline's architecture with random weights (for speed measurements without weights)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .shapes_video import ShapesVideoPipeline

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer = shapes_tokenizer()
        pipe = ShapesVideoPipeline(
            transformer=video_transformer().eval(),
            text_encoder=shapes_text_encoder(tokenizer).eval(),
            tokenizer=tokenizer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        )
    return pipe
