"""Image utilities of the demo. Images are uint8 ``(H, W, 3)`` arrays; the tabs show them enlarged by a whole factor
without smoothing, so every model pixel is a square block of screen pixels."""

from __future__ import annotations

import numpy as np

__all__ = ["to_uint8", "display_factor", "enlarge", "shrink", "difference_map"]


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
