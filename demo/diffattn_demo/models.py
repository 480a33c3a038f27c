"""The demo's models: loading the image and video pipelines (the embedded ones, or local diffusers folders, offline),
the :class:`Models` holder that gives one call at a time each model, and what the tabs read off an image pipeline."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CFG", "Models", "image_size"]

CFG = 4.0  # classifier-free guidance of every image call (the embedded model's evaluation setting)


def _load_image_model(path: Path | None) -> Any:
    from diffattn_bench import embedded

    if path is None:
        return embedded.load_image_pipeline()
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(_model_folder(path), local_files_only=True)


def _load_video_model(path: Path | None) -> Any:
    from diffattn_bench import embedded

    if path is None:
        return embedded.load_video_pipeline()
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(_model_folder(path), local_files_only=True)


def _model_folder(path: Path) -> Path:
    if not (Path(path) / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a diffusers pipeline folder (no model_index.json); pass the folder "
            "that from_pretrained would load"
        )
    return Path(path)


@dataclass
class Models:
    """The demo's pipelines, each loaded once (the image model at start-up by :meth:`load`, the video model on first
    use) and used by one call at a time: :meth:`image` / :meth:`video` hold that model's lock."""

    image_path: Path | None = None
    video_path: Path | None = None
    _image: Any = field(default=None, repr=False)
    _video: Any = field(default=None, repr=False)
    _image_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _video_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def inversion_threshold(self) -> float | None:
        """The reconstruction PSNR (dB) below which an uploaded image is out of the image model's domain: measured
        for the embedded model, unknown (``None``) for a model loaded from a folder."""
        if self.image_path is not None:
            return None
        from diffattn_bench.embedded import IMAGE_INVERSION_PSNR

        return IMAGE_INVERSION_PSNR

    def load(self) -> Models:
        with self._image_lock:
            self._image_pipe()
        return self

    def _image_pipe(self) -> Any:
        if self._image is None:
            pipe = _load_image_model(self.image_path)
            pipe.set_progress_bar_config(leave=False, desc="denoising")
            self._image = pipe
        return self._image

    @contextlib.contextmanager
    def image(self) -> Iterator[Any]:
        with self._image_lock:
            yield self._image_pipe()

    @contextlib.contextmanager
    def video(self) -> Iterator[Any]:
        with self._video_lock:
            if self._video is None:
                pipe = _load_video_model(self.video_path)
                pipe.set_progress_bar_config(leave=False, desc="denoising")
                self._video = pipe
            yield self._video


def image_size(pipe: Any) -> tuple[int, int]:
    """The pipeline's native image size (height, width) in pixels: a UNet's ``sample_size`` or the pipeline's
    ``default_sample_size``, times the VAE's scale factor."""
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    unet = getattr(pipe, "unet", None)
    sample = unet.config.sample_size if unet is not None else getattr(pipe, "default_sample_size", 64)
    if isinstance(sample, (tuple, list)):
        return int(sample[0]) * scale, int(sample[1]) * scale
    return int(sample) * scale, int(sample) * scale
