"""Image utilities of the demo. Images are uint8 ``(H, W, 3)`` arrays; the tabs show them enlarged by a whole factor
without smoothing, so every model pixel is a square block of screen pixels."""

from __future__ import annotations

import numpy as np

__all__ = [
    "to_uint8",
    "display_factor",
    "enlarge",
    "shrink",
    "DIFFERENCE_STOPS",
    "difference_levels",
    "difference_colours",
    "difference_map",
]

#: The fixed colour scale of every difference map: ``(level, RGB)`` stops, linear between them, from 0 (identical:
#: black) to 255 (black against white). The same level has the same colour in every image, so a small change looks
#: small; the demo shows this scale as the map's legend. Dim blue from the first levels up, so that a change of a
#: few levels is visible yet nothing like a large one.
DIFFERENCE_STOPS: tuple[tuple[int, tuple[int, int, int]], ...] = (
    (0, (0, 0, 0)),
    (16, (40, 40, 150)),
    (64, (190, 40, 160)),
    (128, (255, 150, 0)),
    (255, (255, 255, 255)),
)


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


def difference_levels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| per pixel, the largest over the colour channels, in levels of 255 (uint8 ``(H, W)``)."""
    if a.shape != b.shape:
        raise ValueError(f"a difference needs images of one shape, got {a.shape} and {b.shape}")
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1).astype(np.uint8)


def _scale() -> np.ndarray:
    """The 256 colours of :data:`DIFFERENCE_STOPS` (uint8 ``(256, 3)``)."""
    levels = [level for level, _ in DIFFERENCE_STOPS]
    colours = np.array([colour for _, colour in DIFFERENCE_STOPS], np.float64)
    ramp = np.arange(256)
    return np.stack([np.interp(ramp, levels, colours[:, c]) for c in range(3)], -1).round().astype(np.uint8)


def difference_colours(levels: np.ndarray) -> np.ndarray:
    """Levels of 255 (uint8) as the colours of the fixed difference scale (uint8 ``(..., 3)``)."""
    return _scale()[np.asarray(levels, np.uint8)]


def difference_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| (the largest over the channels) on the fixed scale :data:`DIFFERENCE_STOPS`: black where the images
    are identical, the same colour for the same number of levels in every image (never scaled to the image's own
    largest difference)."""
    return difference_colours(difference_levels(a, b))


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """``mask`` (bool H x W) grown by ``pixels`` in every direction (a square of side ``2 * pixels + 1``)."""
    if pixels <= 0:
        return mask
    h, w = mask.shape
    padded = np.pad(mask, pixels)
    out = np.zeros_like(mask)
    for dy in range(2 * pixels + 1):
        for dx in range(2 * pixels + 1):
            out |= padded[dy : dy + h, dx : dx + w]
    return out
