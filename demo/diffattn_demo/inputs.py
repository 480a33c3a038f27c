"""The demo's input rules: the limits on what a user may enter, :class:`DemoInputError` with a message saying what to
change, and the checks and parsers that turn the page's values (seeds, steps, prompts, uploads, the Erase canvas,
subject boxes, guidance scales) into what the tabs' logic uses. No Gradio here: the tabs call these, the app shows
a :class:`DemoInputError` in the page."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .images import shrink

__all__ = [
    "DemoInputError",
    "NOT_AN_IMAGE",
    "Limits",
    "LIMITS",
    "check_seed",
    "check_steps",
    "fit_prompt",
    "prompt_words",
    "unknown_words",
    "vocabulary_warning",
    "check_number",
    "load_upload",
    "mask_from_editor",
    "parse_subjects",
    "parse_scales",
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
    max_weight: float = 5.0
    max_cfg: float = 15.0
    max_dilation: int = 16
    max_subjects: int = 4


LIMITS = Limits()
NOT_AN_IMAGE = "that file is not a readable PNG, JPEG or WebP image: upload an image file in one of these formats"


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


def check_steps(steps: Any, maximum: int = LIMITS.max_steps, reason: str = "") -> int:
    """The number of denoising steps as an int within the limits (a tab may allow fewer: ``maximum``, and say why in
    ``reason``); never clamped, since API calls reach this without the sliders' bounds."""
    value = _whole_number(steps, "steps")
    if not LIMITS.min_steps <= value <= maximum:
        why = f" ({reason})" if reason else ""
        raise DemoInputError(f"steps must be between {LIMITS.min_steps} and {maximum}{why}, got {value}")
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


def prompt_words(text: str) -> list[str]:
    """The words of ``text`` as the embedded models' tokenizers read them: lower case, letters and digits in runs,
    every other mark (a comma) on its own."""
    return re.findall(r"[a-z0-9]+|[^a-z0-9\s]", text.lower())


def unknown_words(texts: Sequence[Any], vocabulary: Sequence[str] | None) -> list[str]:
    """The words of ``texts`` (prompts; ``None`` or empty ones are skipped) that are not in ``vocabulary``, each
    once, in the order typed; none when the vocabulary is open (``None``: a local model's tokenizer)."""
    if vocabulary is None:
        return []
    known = set(vocabulary)
    words = (w for text in texts if isinstance(text, str) for w in prompt_words(text))
    return list(dict.fromkeys(w for w in words if w not in known))


def vocabulary_warning(texts: Sequence[Any], vocabulary: Sequence[str] | None) -> str:
    """A warning naming the words of ``texts`` the model does not know (empty when it knows them all): the model
    runs anyway, but cannot draw what those words mean."""
    unknown = unknown_words(texts, vocabulary)
    if not unknown:
        return ""
    listed = ", ".join(f"'{w}'" for w in unknown)
    return (
        f"**Warning: the model does not know {listed}**: it learnt only the words listed by the prompt, so it cannot "
        "draw what an unknown word means (its tokenizer cuts it into pieces, e.g. 'cat' into 'c' + 'at'); the image "
        "follows the words it knows."
    )


def check_number(value: Any, what: str, minimum: float, maximum: float) -> float:
    """``value`` (a number, or a numeric string as the API may send) as a finite float in [minimum, maximum]; never
    clamped, since API calls reach this without the sliders' bounds."""
    if isinstance(value, bool):
        raise DemoInputError(f"{what} must be a number between {minimum:g} and {maximum:g}, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"{what} must be a number between {minimum:g} and {maximum:g}, got {value!r}") from None
    if not math.isfinite(number) or not minimum <= number <= maximum:
        raise DemoInputError(f"{what} must be between {minimum:g} and {maximum:g}, got {value!r}")
    return number


def check_whole(value: Any, what: str, minimum: int, maximum: int) -> int:
    """``value`` as a whole number in [minimum, maximum] (never rounded or clamped)."""
    number = _whole_number(value, what)
    if not minimum <= number <= maximum:
        raise DemoInputError(f"{what} must be between {minimum} and {maximum}, got {value!r}")
    return number


def check_cfg(value: Any) -> float:
    """The classifier-free guidance scale as a float in [1, ``LIMITS.max_cfg``] (1: no guidance)."""
    return check_number(value, "the CFG scale", 1.0, LIMITS.max_cfg)


def check_words(text: Any, what: str) -> tuple[str, ...]:
    """Words typed in a box, separated by spaces or commas (``()`` when empty)."""
    if text is None:
        return ()
    if not isinstance(text, str):
        raise DemoInputError(f"{what} must be text, got {text!r}")
    return tuple(w for w in re.split(r"[\s,]+", text.strip()) if w)


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
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise DemoInputError(NOT_AN_IMAGE) from None
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


def check_canvas_image(image: Any) -> np.ndarray:
    """A ``gr.ImageEditor``'s background as an array, refused when it is not colour or larger than the upload limit
    (checked as it arrives in the canvas and again at use)."""
    background = np.asarray(image)
    if background.ndim != 3 or background.shape[2] not in (3, 4):
        raise DemoInputError(f"the canvas image must be colour (H x W x 3), got shape {background.shape}")
    if max(background.shape[:2]) > LIMITS.upload_side:
        raise DemoInputError(
            f"the image is {background.shape[1]} x {background.shape[0]} px; use one of at most "
            f"{LIMITS.upload_side} px a side"
        )
    return background


def mask_from_editor(value: Any, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, str]:
    """``(image, mask, note)`` from a ``gr.ImageEditor`` value (``background`` + painted ``layers``, numpy): the
    background at the model's ``size`` (uint8), the mask (bool, True where any layer is painted) at the same size —
    a model pixel is masked when any screen pixel over it is painted — and a note on resizing."""
    if not isinstance(value, dict) or value.get("background") is None:
        raise DemoInputError("upload or generate an image in the Erase canvas first")
    background = check_canvas_image(value["background"])[..., :3].astype(np.uint8)
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
    subjects: list[tuple[str, tuple[float, float, float, float]]] = []
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
        subjects.append((word.strip(), (x0, y0, x1, y1)))
    if len(subjects) > LIMITS.max_subjects:
        raise DemoInputError(f"at most {LIMITS.max_subjects} subjects, got {len(subjects)}")
    return subjects


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
