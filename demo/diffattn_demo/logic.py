"""What the demo's tabs do, without Gradio: input checks, the models, and one function per tab.

Everything here runs in the demo's server process (or in a test calling it directly) and uses only diffattn's public
API — what a user could call in Python. Bad input raises :class:`DemoInputError` with a message saying what to change;
the app shows it in the page. Images go in as uint8 ``(H, W, 3)`` arrays (or upload paths that Gradio wrote into the
demo's own temporary folder) and come back as uint8 arrays enlarged by a whole factor without smoothing, so every
model pixel is a square block of screen pixels.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DemoInputError",
    "Limits",
    "LIMITS",
    "Models",
    "EditOutput",
    "LayoutOutput",
    "EraseOutput",
    "GuidanceOutput",
    "SpeedOutput",
    "check_seed",
    "check_steps",
    "fit_prompt",
    "load_upload",
    "mask_from_editor",
    "enlarge",
    "shrink",
    "difference_map",
    "parse_subjects",
    "parse_scales",
    "draw_boxes",
    "run_edit",
    "run_layout",
    "run_erase",
    "generate_image",
    "run_guidance",
    "run_speed",
    "SPEED_SIZES",
    "SPEED_MAX_STEPS",
    "GUIDANCE_METHODS",
    "EDIT_METHODS",
]


class DemoInputError(ValueError):
    """A user input the demo cannot use; the message says what to change."""


@dataclass(frozen=True)
class Limits:
    """Bounds on user input (uploads, seeds, steps, lists)."""

    upload_bytes: int = 10 * 1024 * 1024
    upload_side: int = 2048
    upload_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
    max_seed: int = 2**31 - 1
    min_steps: int = 1
    max_steps: int = 50
    max_scales: int = 6
    max_scale: float = 20.0
    max_subjects: int = 4


LIMITS = Limits()
EDIT_METHODS = ("prompt-to-prompt", "MasaCtrl")
GUIDANCE_METHODS = ("PAG", "SEG", "SoftPAG")
# (frames, height, width) in pixels of the video model; the second (the tab's default) is `diffattn compare`'s size
SPEED_SIZES: dict[str, tuple[int, int, int]] = {
    "8 x 32 x 64 px (quick)": (8, 32, 64),
    "16 x 64 x 64 px (diffattn compare's size)": (16, 64, 64),
    "64 x 64 x 64 px (length extension, slow)": (64, 64, 64),
}
SPEED_MAX_STEPS = 10  # every step runs once per method; at 10 steps ShapesBench's score means something
CFG = 4.0  # classifier-free guidance of every image call (the embedded model's evaluation setting)


# ----------------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------------
def _whole_number(value: Any, what: str) -> int:
    """``value`` (an int, a float with no fraction as Gradio's number boxes send, or a numeric string) as an int."""
    if isinstance(value, bool):
        raise DemoInputError(f"{what} must be a whole number, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise DemoInputError(f"{what} must be a whole number, got {value!r}")


def check_seed(seed: Any) -> int:
    """The seed as an int in [0, 2**31 - 1]."""
    value = _whole_number(seed, "seed")
    if not 0 <= value <= LIMITS.max_seed:
        raise DemoInputError(f"seed must be between 0 and {LIMITS.max_seed}, got {value}")
    return value


def check_steps(steps: Any) -> int:
    """The number of denoising steps as an int within the limits."""
    value = _whole_number(steps, "steps")
    if not LIMITS.min_steps <= value <= LIMITS.max_steps:
        raise DemoInputError(f"steps must be between {LIMITS.min_steps} and {LIMITS.max_steps}, got {value}")
    return value


def fit_prompt(pipe: Any, prompt: Any, what: str = "prompt") -> tuple[str, str]:
    """``(prompt, note)``: the prompt stripped, cut to the tokenizer's limit (the note says so, else it is empty)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise DemoInputError(f"enter a {what} (e.g. 'a red circle on the left')")
    prompt = " ".join(prompt.split())
    tokenizer = pipe.tokenizer
    limit = int(getattr(tokenizer, "model_max_length", 77) or 77)
    ids = tokenizer(prompt).input_ids
    if len(ids) <= limit:
        return prompt, ""
    # keep the first limit - 2 word tokens (BOS and EOS take the other two places)
    kept = tokenizer.decode(ids[1 : limit - 1], skip_special_tokens=True).strip()
    return kept, f'The {what} was longer than the model\'s {limit} tokens and was cut to: "{kept}".'


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def load_upload(path: Any, upload_folder: Path, size: tuple[int, int]) -> tuple[np.ndarray, str]:
    """An uploaded image file as uint8 ``(H, W, 3)`` at the model's ``size`` (height, width), and a note when it was
    resized. Only files Gradio stored in ``upload_folder`` are read (no user text becomes a path); PNG, JPEG or
    WebP, at most 10 MB and 2048 px a side."""
    from PIL import Image, UnidentifiedImageError

    if path is None:
        raise DemoInputError("upload an image first")
    file = Path(str(path))
    if not _inside(file, upload_folder) or not file.is_file():
        raise DemoInputError("the image must be uploaded through the page (drop a PNG, JPEG or WebP file)")
    nbytes = file.stat().st_size
    if nbytes > LIMITS.upload_bytes:
        raise DemoInputError(
            f"the image file is {nbytes / 2**20:.1f} MB; upload one of at most {LIMITS.upload_bytes // 2**20} MB"
        )
    try:
        with Image.open(file) as image:
            kind = image.format
            if kind not in LIMITS.upload_formats:
                raise DemoInputError(f"upload a PNG, JPEG or WebP image (this file is {kind or 'not an image'})")
            if max(image.size) > LIMITS.upload_side:
                raise DemoInputError(
                    f"the image is {image.size[0]} x {image.size[1]} px; upload one of at most "
                    f"{LIMITS.upload_side} px a side"
                )
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError):
        raise DemoInputError("the file is not a readable PNG, JPEG or WebP image") from None
    return _to_size(np.asarray(rgb), size)


def _to_size(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, str]:
    """``image`` at ``size`` (height, width): an exact block mean for whole-factor enlargements, a box filter
    otherwise; a note when the size changed."""
    from PIL import Image

    h, w = image.shape[:2]
    if (h, w) == size:
        return image, ""
    if h % size[0] == 0 and w % size[1] == 0 and h // size[0] == w // size[1]:
        return shrink(image, h // size[0]), ""  # an image the demo showed enlarged, handed back
    resized = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BOX))
    return resized, f"The image ({w} x {h} px) was resized to the model's {size[1]} x {size[0]} px."


def mask_from_editor(value: Any, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, str]:
    """``(image, mask, note)`` from a ``gr.ImageEditor`` value (``background`` + painted ``layers``, numpy): the
    background at the model's ``size`` (uint8), the mask (bool, True where any layer is painted) at the same size —
    a model pixel is masked when any screen pixel over it is painted — and a note on resizing."""
    if not isinstance(value, dict) or value.get("background") is None:
        raise DemoInputError("upload or generate an image in the Erase canvas first")
    background = np.asarray(value["background"])
    if background.ndim != 3 or background.shape[2] not in (3, 4):
        raise DemoInputError(f"the canvas image must be colour (H x W x 3), got shape {background.shape}")
    if max(background.shape[:2]) > LIMITS.upload_side:
        raise DemoInputError(
            f"the image is {background.shape[1]} x {background.shape[0]} px; use one of at most "
            f"{LIMITS.upload_side} px a side"
        )
    background = background[..., :3].astype(np.uint8)
    painted = np.zeros(background.shape[:2], bool)
    notes = []
    for layer in value.get("layers") or []:
        layer = np.asarray(layer)
        if layer.ndim != 3 or layer.shape[2] != 4:
            raise DemoInputError(f"a mask layer must be RGBA (H x W x 4), got shape {layer.shape}")
        alpha = layer[..., 3] > 0
        if alpha.shape != painted.shape:
            alpha = _resize_mask(alpha, painted.shape)
            notes.append(
                f"The mask ({layer.shape[1]} x {layer.shape[0]} px) was resized to the image's "
                f"{painted.shape[1]} x {painted.shape[0]} px."
            )
        painted |= alpha
    if not painted.any():
        raise DemoInputError("paint over the object to remove with the brush first")
    image, note = _to_size(background, size)
    if note:
        notes.append(note)
    return image, _resize_mask(painted, size), " ".join(notes)


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``mask`` at ``size`` (height, width): nearest neighbour where it grows, and where it shrinks a cell is True
    when any pixel over it is True (a thin brush stroke is never lost)."""
    h, w = mask.shape
    big = (max(h, size[0]), max(w, size[1]))
    if big != (h, w):
        mask = mask[(np.arange(big[0]) * h) // big[0]][:, (np.arange(big[1]) * w) // big[1]]
    out = np.zeros(size, bool)
    yy, xx = np.nonzero(mask)
    out[(yy * size[0]) // big[0], (xx * size[1]) // big[1]] = True
    return out


def parse_subjects(text: Any) -> list[tuple[str, tuple[float, float, float, float]]]:
    """Subjects from lines ``word: x0 y0 x1 y1`` (fractions of the image, origin top-left; commas allowed)."""
    if not isinstance(text, str) or not text.strip():
        raise DemoInputError("enter at least one subject line, e.g. 'circle: 0 0 0.5 0.5'")
    subjects = []
    for number, line in enumerate(text.strip().splitlines(), 1):
        if not line.strip():
            continue
        word, colon, rest = line.partition(":")
        numbers = rest.replace(",", " ").split()
        if not colon or not word.strip() or len(numbers) != 4:
            raise DemoInputError(f"subject line {number} ({line.strip()!r}): write 'word: x0 y0 x1 y1'")
        try:
            box = tuple(float(n) for n in numbers)
        except ValueError:
            raise DemoInputError(f"subject line {number}: the box must be four numbers, got {rest.strip()!r}") from None
        x0, y0, x1, y1 = box
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in box) or not (x0 < x1 and y0 < y1):
            raise DemoInputError(
                f"subject line {number}: the box {box} must satisfy 0 <= x0 < x1 <= 1 and "
                "0 <= y0 < y1 <= 1 (fractions of the image, origin top-left)"
            )
        subjects.append((word.strip(), box))
    if len(subjects) > LIMITS.max_subjects:
        raise DemoInputError(f"at most {LIMITS.max_subjects} subjects, got {len(subjects)}")
    return subjects  # type: ignore[return-value]


def parse_scales(text: Any) -> list[float]:
    """Guidance scales from a comma-separated list (0 = no guidance is always included first)."""
    parts = [p for p in re.split(r"[,\s]+", str(text or "")) if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise DemoInputError(f"scales must be numbers separated by commas, e.g. '0, 1.5, 3', got {text!r}") from None
    if any(not math.isfinite(v) or not 0.0 <= v <= LIMITS.max_scale for v in values):
        raise DemoInputError(f"every scale must be between 0 and {LIMITS.max_scale}, got {text!r}")
    scales = sorted(set([0.0, *values]))
    if len(scales) > LIMITS.max_scales:
        raise DemoInputError(f"at most {LIMITS.max_scales} scales (0 included), got {len(scales)}")
    return scales


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------
def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def display_factor(size: tuple[int, int], target: int = 256) -> int:
    """The whole enlargement that brings the longer side to about ``target`` px (at least 1)."""
    return max(1, target // max(size))


def enlarge(image: np.ndarray, factor: int) -> np.ndarray:
    """Each pixel as a ``factor`` x ``factor`` block (nearest neighbour: no smoothing)."""
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def shrink(image: np.ndarray, factor: int) -> np.ndarray:
    """The inverse of :func:`enlarge` (block mean, exact for enlarged images)."""
    h, w = image.shape[0] // factor, image.shape[1] // factor
    blocks = image[: h * factor, : w * factor].reshape(h, factor, w, factor, -1).astype(np.float32).mean(axis=(1, 3))
    return blocks.round().astype(np.uint8).reshape(h, w, *image.shape[2:])


def difference_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| (max over channels) as a grey image, scaled so the largest difference is white (black: identical)."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1).astype(np.float32)
    peak = float(diff.max())
    grey = (diff / peak * 255.0).round().astype(np.uint8) if peak > 0 else diff.astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


BOX_COLOURS = ((255, 80, 80), (80, 160, 255), (80, 220, 80), (240, 200, 60))


def draw_boxes(subjects: Sequence[tuple[str, tuple[float, float, float, float]]], size: int = 256) -> np.ndarray:
    """The subjects' boxes as outlines on a dark square canvas (one colour per subject, in order)."""
    canvas = np.full((size, size, 3), 24, np.uint8)
    for (_, (x0, y0, x1, y1)), colour in zip(subjects, BOX_COLOURS):
        a, b = int(round(x0 * (size - 1))), int(round(x1 * (size - 1)))
        c, d = int(round(y0 * (size - 1))), int(round(y1 * (size - 1)))
        for t in range(2):
            canvas[c : d + 1, min(a + t, b)] = colour
            canvas[c : d + 1, max(b - t, a)] = colour
            canvas[min(c + t, d), a : b + 1] = colour
            canvas[max(d - t, c), a : b + 1] = colour
    return canvas


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
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


Progress = Callable[[float, str], None]


def _no_progress(fraction: float, text: str) -> None:
    return None


# ----------------------------------------------------------------------------------------------------------------
# Tabs
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EditOutput:
    source: np.ndarray  # uint8, enlarged
    target: np.ndarray
    difference: np.ndarray
    note: str
    seconds: float


def _swap(source: str, word: str, replacement: str) -> str:
    pattern = rf"(?<![\w]){re.escape(word)}(?![\w])"
    if not re.search(pattern, source):
        raise DemoInputError(f"the word {word!r} to swap is not in the source prompt {source!r}")
    return re.sub(pattern, replacement, source)


def run_edit(
    models: Models,
    source: str,
    target: str,
    method: str,
    seed: Any,
    steps: Any,
    *,
    swap_word: str = "",
    swap_to: str = "",
    reweight_word: str = "",
    reweight: float = 1.0,
    upload: Any = None,
    upload_folder: Path | None = None,
    progress: Progress = _no_progress,
) -> EditOutput:
    """Edit tab: the source prompt's image and the target prompt's edit of it, from the same noise, with
    prompt-to-prompt (word swap and re-weight) or MasaCtrl; with an uploaded image, its DDIM inversion replaces the
    noise. An empty target prompt means the source prompt (with the swap applied, if one is given)."""
    import diffattn
    from diffattn.editing import edit, invert, token_indices

    seed, steps = check_seed(seed), check_steps(steps)
    if method not in EDIT_METHODS:
        raise DemoInputError(f"method must be one of {', '.join(EDIT_METHODS)}, got {method!r}")
    if not math.isfinite(float(reweight)) or not 0.0 <= float(reweight) <= 5.0:
        raise DemoInputError(f"the re-weight factor must be between 0 and 5, got {reweight!r}")
    start = time.perf_counter()
    with models.image() as pipe:
        source, note_source = fit_prompt(pipe, source, "source prompt")
        target_text = target if isinstance(target, str) and target.strip() else source
        if swap_word and swap_word.strip():
            if not swap_to or not swap_to.strip():
                raise DemoInputError(f"enter the word that replaces {swap_word.strip()!r}")
            target_text = _swap(target_text, swap_word.strip(), swap_to.strip())
        target, note_target = fit_prompt(pipe, target_text, "target prompt")
        notes = [n for n in (note_source, note_target) if n]
        if method == "prompt-to-prompt":
            n_source, n_target = len(pipe.tokenizer(source).input_ids), len(pipe.tokenizer(target).input_ids)
            if n_source != n_target:
                raise DemoInputError(
                    f"prompt-to-prompt needs prompts of equal token count (source {n_source}, target {n_target}): "
                    "swap one word for one word, or use MasaCtrl"
                )
            reweights: tuple[tuple[int, float], ...] = ()
            if reweight_word and reweight_word.strip() and float(reweight) != 1.0:
                try:
                    indices = token_indices(pipe, target, reweight_word.strip())
                except ValueError:
                    raise DemoInputError(
                        f"the word {reweight_word.strip()!r} to re-weight is not in the target prompt {target!r}"
                    ) from None
                reweights = tuple((i, float(reweight)) for i in indices)
            method_obj: Any = diffattn.PromptToPrompt(reweight=reweights)
        else:
            method_obj = diffattn.MutualSelfAttention(start_step=min(4, max(steps // 5, 0)))
        size = image_size(pipe)
        latents = None
        if upload is not None:
            if upload_folder is None:
                raise DemoInputError("uploads are not enabled in this call")
            image, note = load_upload(upload, upload_folder, size)
            notes += [note] if note else []
            progress(0.1, "inverting the uploaded image")
            latents = invert(pipe, image, source, steps)
        progress(0.5 if latents is not None else 0.1, "editing")
        result = edit(
            pipe, source, target, method_obj, seed=seed, latents=latents, num_inference_steps=steps, guidance_scale=CFG
        )
    a, b = to_uint8(result.source), to_uint8(result.target)
    factor = display_factor(a.shape[:2])
    seconds = time.perf_counter() - start
    notes.append(
        f'{method}: "{source}" -> "{target}", seed {seed}, {steps} steps'
        f"{' from the inverted upload' if latents is not None else ''}, {seconds:.1f} s."
    )
    return EditOutput(
        enlarge(a, factor), enlarge(b, factor), enlarge(difference_map(a, b), factor), " ".join(notes), seconds
    )


@dataclass(frozen=True)
class LayoutOutput:
    boxes: np.ndarray
    plain: np.ndarray
    bounded: np.ndarray
    note: str


def run_layout(
    models: Models, prompt: str, subjects_text: str, seed: Any, steps: Any, *, progress: Progress = _no_progress
) -> LayoutOutput:
    """Layout tab: the prompt without and with bounded attention (each subject word kept in its box), same noise."""
    from diffattn.editing import layout

    seed, steps = check_seed(seed), check_steps(steps)
    subjects = parse_subjects(subjects_text)
    with models.image() as pipe:
        prompt, note = fit_prompt(pipe, prompt)
        images = []
        for i, bounded in enumerate((False, True)):
            progress(0.1 + 0.45 * i, "bounded attention" if bounded else "plain prompt")
            try:
                images.append(
                    to_uint8(
                        layout(
                            pipe,
                            prompt,
                            subjects,
                            seed=seed,
                            bounded=bounded,
                            num_inference_steps=steps,
                            guidance_scale=CFG,
                        )
                    )
                )
            except ValueError as error:  # a subject word not in the prompt, a bad box: layout says which
                raise DemoInputError(str(error)) from None
    factor = display_factor(images[0].shape[:2])
    side = images[0].shape[0] * factor
    return LayoutOutput(
        draw_boxes(subjects, side),
        enlarge(images[0], factor),
        enlarge(images[1], factor),
        " ".join(
            filter(
                None,
                [
                    note,
                    f"seed {seed}, {steps} steps; boxes: "
                    + "; ".join(f"{w} ({x0:g}, {y0:g}) - ({x1:g}, {y1:g})" for w, (x0, y0, x1, y1) in subjects),
                ],
            )
        ),
    )


def generate_image(models: Models, prompt: str, seed: Any, steps: Any) -> tuple[np.ndarray, str]:
    """One image of ``prompt`` (enlarged uint8, for the Erase canvas) and a note."""
    import torch

    seed, steps = check_seed(seed), check_steps(steps)
    with models.image() as pipe:
        prompt, note = fit_prompt(pipe, prompt)
        out = pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=CFG,
            output_type="np",
            generator=torch.Generator().manual_seed(seed),
        )
    image = to_uint8(np.asarray(out.images[0]))
    return enlarge(image, display_factor(image.shape[:2])), note


@dataclass(frozen=True)
class EraseOutput:
    source: np.ndarray
    mask: np.ndarray
    erased: np.ndarray
    note: str


def run_erase(models: Models, editor: Any, seed: Any, steps: Any, *, progress: Progress = _no_progress) -> EraseOutput:
    """Erase tab: remove what the brush painted over, with Attentive Eraser (``diffattn.editing.erase``)."""
    from diffattn.editing import erase

    seed, steps = check_seed(seed), check_steps(steps)
    with models.image() as pipe:
        image, mask, note = mask_from_editor(editor, image_size(pipe))
        progress(0.1, "erasing")
        try:
            out = to_uint8(erase(pipe, image, mask, num_inference_steps=steps, seed=seed))
        except (ValueError, TypeError, AttributeError) as error:
            raise DemoInputError(f"erase cannot run on this model ({type(pipe).__name__}): {error}") from None
    factor = display_factor(image.shape[:2])
    shown = np.where(mask[..., None], (0.5 * image + 0.5 * np.array([255, 0, 255])).astype(np.uint8), image)
    return EraseOutput(
        enlarge(image, factor),
        enlarge(shown, factor),
        enlarge(out, factor),
        " ".join(filter(None, [note, f"{int(mask.sum())} of {mask.size} pixels masked, seed {seed}, {steps} steps."])),
    )


@dataclass(frozen=True)
class GuidanceOutput:
    grid: np.ndarray  # rows: methods, columns: scales (enlarged cells, 4 px gaps)
    table: str  # markdown: max |difference| to no guidance, per cell
    cells: dict[tuple[str, float], np.ndarray]  # (method, scale) -> uint8 image at model size


def _guidance_method(name: str, scale: float, layers: Any) -> Any:
    from diffattn.guidance import PAG, SEG, SoftPAG

    if name == "PAG":
        return PAG(scale=scale, layers=layers)
    if name == "SEG":
        return SEG(scale=scale, layers=layers)
    if name == "SoftPAG":
        return SoftPAG(scale=scale, u=0.5, layers=layers)
    raise DemoInputError(f"guidance method must be one of {', '.join(GUIDANCE_METHODS)}, got {name!r}")


def guidance_layer_choices(pipe: Any) -> list[str]:
    """'family default' and the top-level blocks with self-attention, for the Guidance tab's layer picker."""
    import diffattn

    model = getattr(pipe, "unet", None) or pipe.transformer
    blocks = []
    for name, _ in diffattn.attention_modules(model):
        parts = name.split(".")
        block = (
            ".".join(parts[:2])
            if parts[0] in ("down_blocks", "up_blocks", "blocks", "transformer_blocks", "single_transformer_blocks")
            else parts[0]
        )
        if block not in blocks:
            blocks.append(block)
    return ["family default", *blocks]


def run_guidance(
    models: Models,
    prompt: str,
    methods: Sequence[str],
    scales_text: str,
    seed: Any,
    steps: Any,
    layers: str = "family default",
    *,
    progress: Progress = _no_progress,
) -> GuidanceOutput:
    """Guidance tab: the prompt at each scale of each guidance method, same seed; scale 0 is the plain pipeline."""
    import torch

    import diffattn

    seed, steps = check_seed(seed), check_steps(steps)
    methods = [m for m in methods or []]
    if not methods:
        raise DemoInputError(f"pick at least one guidance method ({', '.join(GUIDANCE_METHODS)})")
    for name in methods:
        _guidance_method(name, 1.0, None)
    scales = parse_scales(scales_text)
    cells: dict[tuple[str, float], np.ndarray] = {}
    with models.image() as pipe:
        prompt, note = fit_prompt(pipe, prompt)
        choices = guidance_layer_choices(pipe)
        if layers not in choices:
            raise DemoInputError(f"layers must be one of {', '.join(choices)}, got {layers!r}")
        pattern = None if layers == "family default" else layers

        def generate() -> np.ndarray:
            out = pipe(
                prompt,
                num_inference_steps=steps,
                guidance_scale=CFG,
                output_type="np",
                generator=torch.Generator().manual_seed(seed),
            )
            return to_uint8(np.asarray(out.images[0]))

        total = 1 + len(methods) * (len(scales) - 1)
        progress(0.0, "no guidance")
        plain = generate()
        done = 1
        for name in methods:
            cells[(name, 0.0)] = plain
            for scale in scales[1:]:
                progress(done / total, f"{name} scale {scale:g}")
                try:
                    handle = diffattn.guidance.enable(pipe, _guidance_method(name, scale, pattern))
                except diffattn.DiffattnError as error:
                    raise DemoInputError(str(error)) from None
                try:
                    cells[(name, scale)] = generate()
                finally:
                    handle.remove()
                done += 1
    factor = display_factor(plain.shape[:2], 128)
    gap = 4
    h, w = plain.shape[0] * factor, plain.shape[1] * factor
    grid = np.full((len(methods) * (h + gap) - gap, len(scales) * (w + gap) - gap, 3), 255, np.uint8)
    header = "| method | " + " | ".join(f"scale {s:g}" for s in scales) + " |"
    lines = [header, "|" + "---|" * (len(scales) + 1)]
    for r, name in enumerate(methods):
        row = []
        for c, scale in enumerate(scales):
            cell = cells[(name, scale)]
            grid[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = enlarge(cell, factor)
            row.append(f"{int(np.abs(cell.astype(int) - plain.astype(int)).max())}")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    table = "\n".join(
        [
            *([note] if note else []),
            f"Rows: {', '.join(methods)}; columns: scales {', '.join(f'{s:g}' for s in scales)} "
            f"(layers: {layers}; seed {seed}, {steps} steps, CFG {CFG:g}). Max |difference| to no guidance "
            "(levels of 255):",
            "",
            *lines,
        ]
    )
    return GuidanceOutput(grid, table, cells)


@dataclass(frozen=True)
class SpeedOutput:
    table: str  # markdown
    frames: np.ndarray  # rows: dense (stock), then each method; first / middle / last frame
    plot: np.ndarray  # the compare plot (uint8)
    rows: list = field(default_factory=list)  # diffattn_bench.compare.CompareRow


SPEED_PROMPT = "a red circle on the left moving right"


def run_speed(
    models: Models,
    methods: Sequence[str],
    size: str,
    steps: Any,
    out_folder: Path,
    *,
    progress: Progress = _no_progress,
) -> SpeedOutput:
    """Speed tab: ``diffattn compare`` for the chosen sparse methods at the chosen size, in this process: times and
    density against dense attention, the frames side by side and the speed plot."""
    import torch
    from PIL import Image

    from diffattn_bench.compare import ClipSize, default_methods, run_video, save_outputs
    from diffattn_bench.peers import method_peer

    if size not in SPEED_SIZES:
        raise DemoInputError(f"size must be one of {', '.join(SPEED_SIZES)}, got {size!r}")
    steps = check_steps(steps)
    if steps > SPEED_MAX_STEPS:
        raise DemoInputError(
            f"the speed comparison runs at most {SPEED_MAX_STEPS} steps (each runs every method), got {steps}"
        )
    frames, height, width = SPEED_SIZES[size]
    with models.video() as pipe:
        patch = pipe.transformer.config.patch_size
        grid = (frames // patch[0], height // patch[1], width // patch[2])
        available = default_methods(grid)
        chosen = [m for m in methods or []]
        unknown = [m for m in chosen if m not in available]
        if not chosen or unknown:
            raise DemoInputError(
                f"pick sparse methods among {', '.join(available)}"
                + (f" (unknown: {', '.join(unknown)})" if unknown else "")
            )
        progress(0.05, "comparing")
        import diffattn
        from diffattn_kernels import cpu_block_sparse

        peers = [method_peer("dense", diffattn.Dense()), *(method_peer(m, available[m]) for m in chosen)]
        rows, videos = run_video(
            pipe, ClipSize(frames, height, width), peers, prompts=[SPEED_PROMPT], steps=steps, desc="speed tab"
        )
        failed = [r for r in rows if r.error]
        if failed:
            raise DemoInputError(
                f"a method cannot run at {size}: " + "; ".join(f"{r.method}: {r.error}" for r in failed)
            )
    title = (
        f"{frames} frames x {height}x{width} px = {int(np.prod(grid))} tokens, {steps} steps, "
        f"{torch.get_num_threads()} threads, {cpu_block_sparse.cpu_model()}"
    )
    png = save_outputs({"video": (rows, videos)}, Path(out_folder), title, {"title": title})[1]
    plot = np.asarray(Image.open(png).convert("RGB"))
    lines = [
        f"Measured now, one process: {title}.",
        "",
        "| method | density | generation | attention | attention speedup | end-to-end speedup | PSNR vs dense | "
        "ShapesBench trajectory error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        error = r.scores.get("mean_trajectory_error", float("nan"))
        if r.method == "dense (stock)":
            lines.append(f"| {r.method} | 1 | {r.seconds:.2f} s | | | 1.00x | | {error:.3f} |")
        else:
            lines.append(
                f"| {r.method} | {r.density:.3f} | {r.seconds:.2f} s | {r.attention_seconds:.2f} s | "
                f"{r.attention_speedup:.2f}x | **{r.speedup:.2f}x** | {r.psnr:.1f} dB | {error:.3f} |"
            )
    strips = []
    labels = [r.method for r in rows if r.method != "dense"]
    for label in labels:
        clip = to_uint8(videos[label])
        strips.append(np.concatenate([clip[0], clip[len(clip) // 2], clip[-1]], axis=1))
    sheet = np.concatenate(strips, axis=0)
    factor = display_factor(sheet.shape[:2], 512)
    lines += ["", "Frames (first / middle / last), top to bottom: " + ", ".join(labels) + "."]
    return SpeedOutput("\n".join(lines), enlarge(sheet, factor), plot, rows)
