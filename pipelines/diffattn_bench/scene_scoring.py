"""ShapesBench for the scenes model: score a generated 64 x 64 scene from pixels against its (partial) caption.

The scenes of :mod:`diffattn_bench.scenes` have textured backgrounds and patterned, possibly overlapping objects,
and their captions leave position, size, pattern and background open with some probability. This scorer reads an
image in five steps and reports, per caption, what it NAMED (scored) and what it left OPEN (what the image shows,
so an editing score can later check that it stayed the same):

1. **Pixel labels.** Every background of the renderer is its base colour plus a grey tone (lighter on dark
   backgrounds, darker on light ones), so background pixels lie on a line parallel to grey; every object pixel is
   its palette colour scaled by 0.35-1 (the dark tone of stripes and dots is 0.35 x the colour), so it lies on the
   segment from 0.35 c to c. The background's chroma (its colour minus its grey level) is the median chroma of the
   pixels far from every palette segment; a pixel gets the label of the nearest of {background line, palette
   segments} when it is within ``label_distance`` of it, and none otherwise (anti-aliased edges of two objects,
   or of an object on a light background).
2. **Background.** Kind from the grey tone of the background pixels (objects and their rims masked out): flat
   (tone spread < ``flat_spread``), one-dimensional (a per-column or per-row profile explains the tone) =
   gradient if that profile is nearly linear else stripes, two-dimensional = checks if the tone is two-level
   else speckled noise; colour = nearest of :data:`~diffattn_bench.scenes.BACKGROUND_COLOURS` by chroma and by
   dark / light.
3. **Objects.** 8-connected components of one palette label with a core (pixels whose 3 x 3 neighbourhood is all
   that label; this drops the one-pixel lines where two objects' edges mix into a third palette colour); pieces of
   one colour joined through another object's pixels are one occluded object. Soft coverage: 1 inside, and on the
   rim the pixel's position between the local background (box-filtered background pixels) and the nearest inner
   object colour.
4. **Shape, size, position** from a template fit (:func:`diffattn_bench.scoring.classify_shape` by moments; for an
   object that touches another one, a local search of centre and side that scores the IoU only outside the other
   objects' pixels, so occlusion does not bias it). Position word of the fitted centre
   (:func:`diffattn_bench.grammar.position_of`); size ``small`` when the fitted side is below ``size_split`` of
   the image (renderer: 0.22 and 0.40).
5. **Pattern** from the object's tone (its pixels' brightness relative to its bright colour) inside the eroded
   mask: solid when few pixels are dark, else striped when the tone varies along one direction only (the mean
   absolute difference between neighbours is much smaller along one of four directions than across it), else
   dotted.

Per image (:class:`SceneImageResult`): per named attribute a check; ``count_correct`` (exactly the named objects,
no extra palette-coloured object); ``all_checks`` = all of them. Open attributes are in ``open_attributes``.
Also :func:`object_mask` (the pixels of one named object) and :func:`background_psnr` for removal scores.

CLI: ``python -m diffattn_bench.scene_scoring IMAGE_DIR`` scores ``IMAGE_DIR/*.png`` listed in
``IMAGE_DIR/prompts.json``; ``python -m diffattn_bench.scene_scoring --calibrate`` measures the scorer on rendered
ground truth (full captions) and on captions with one wrong word.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffattn_bench.grammar import COLOURS, POSITION_CENTRES, SHAPE_AREAS, SHAPES, position_of, shape_coverage
from diffattn_bench.scenes import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    PATTERNS,
    SCENE_SIZES,
    Background,
    ParsedSceneObject,
    caption,
    parse_caption,
    sample_scene,
)
from diffattn_bench.scoring import _as_image, _centroid, _dilate, _label, classify_shape, prompted_images, psnr

__all__ = [
    "ATTRIBUTES",
    "BackgroundReading",
    "DetectedObject",
    "SceneBenchConfig",
    "SceneImageResult",
    "SceneObjectResult",
    "SceneReading",
    "background_psnr",
    "calibrate",
    "evaluate_scene",
    "format_scene_table",
    "main",
    "object_mask",
    "read_scene",
    "scenes_prompts",
    "summarize_scenes",
]

_NAMES: tuple[str, ...] = tuple(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES], dtype=np.float64)
_DARK_TONE = 0.35  # the renderer's pattern tone: 0.35 x the object colour
_GREY = np.ones(3) / math.sqrt(3)

#: Named attributes, in report order (colour and shape are always named; background kind and colour together).
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "position", "size", "pattern", "background_kind", "background_colour")


@dataclass(frozen=True)
class SceneBenchConfig:
    """Thresholds (RGB distances in 8-bit levels; fractions of the image side), set on rendered ground truth.

    - ``label_distance``: largest distance of a pixel from the background line or a palette segment to get its
      label (colour jitter is +-10 per channel, the dark tone of yellow is ~34 from the brown background line).
    - ``segment_low``: darkest end of a palette segment, as a fraction of the colour (renderer: 0.35).
    - ``min_core``: core pixels (3 x 3 neighbourhood all one label) an object needs (a small triangle has ~40).
    - ``min_area``: pixels an object needs.
    - ``size_split``: fitted side (fraction of the image) below which an object is ``small``.
    - ``dark_tone``: tone (fraction of the object's bright colour) below which an object pixel is dark.
    - ``solid_dark_fraction``: at most this fraction of an object's inner pixels dark -> solid.
    - ``stripe_anisotropy``: (smallest / largest directional tone difference) below which a pattern is striped.
    - ``flat_spread``: 5-95 % spread of the background tone below which it is plain.
    - ``profile_r2``: share of the tone variance a per-column or per-row profile must explain (1-D background).
    - ``gradient_r2``: share of the profile's variance a line must explain for a gradient (else stripes).
    - ``two_level``: share of background pixels near its two tone levels above which a 2-D background is checked.
    """

    label_distance: float = 30.0
    segment_low: float = 0.3
    min_core: int = 6
    min_area: int = 20
    size_split: float = 0.30
    dark_tone: float = 0.72
    solid_dark_fraction: float = 0.06
    stripe_anisotropy: float = 0.45
    flat_spread: float = 10.0
    profile_r2: float = 0.85
    gradient_r2: float = 0.9
    two_level: float = 0.8


# --------------------------------------------------------------------------------------------
# Small numpy helpers
# --------------------------------------------------------------------------------------------


def _erode(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    return ~_dilate(~mask, steps)


def _box(x: np.ndarray, radius: int) -> np.ndarray:
    """Sum over the (2 radius + 1)^2 window of each pixel (zero padding), for H x W or H x W x C."""
    k = 2 * radius + 1
    p = np.pad(x, [(radius + 1, radius)] * 2 + [(0, 0)] * (x.ndim - 2))
    c = p.cumsum(0).cumsum(1)
    return c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]


def _shifted_pairs(x: np.ndarray, dy: int, dx: int) -> tuple[np.ndarray, np.ndarray]:
    """Views (x[y, x], x[y + dy, x + dx]) over the pixels where both exist (dy >= 0)."""
    h, w = x.shape[:2]
    x0, x1 = max(0, -dx), w - max(0, dx)
    return x[: h - dy, x0:x1], x[dy:, x0 + dx : x1 + dx]


def _segment_distance(pixels: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distance, t) of each pixel (..., 3) to the segment a + t (b - a), t in [0, 1]."""
    d = b - a
    t = np.clip(((pixels - a) @ d) / float(d @ d), 0.0, 1.0)
    return np.linalg.norm(pixels - a - t[..., None] * d, axis=-1), t


def _chroma(pixels: np.ndarray) -> np.ndarray:
    return pixels - pixels.mean(axis=-1, keepdims=True)


# --------------------------------------------------------------------------------------------
# Reading an image
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackgroundReading:
    """The background as read: ``kind`` and ``colour`` (scenes' words), ``base`` its mean RGB, ``features`` the
    tone statistics the kind was read from (spread, profile_r2, linear_r2, two_level)."""

    kind: str
    colour: str
    base: tuple[float, float, float]
    features: Mapping[str, float] = field(compare=False)
    mask: np.ndarray = field(repr=False, compare=False)  # H x W: pixels read as background


@dataclass(frozen=True)
class DetectedObject:
    """One object as read: colour word, shape (with IoU of every template), fitted centre (x, y) and side as
    fractions of the image, size and position words, pattern (with its features), whether it touches another
    object (``occluded``: its fit ignored the other objects' pixels), ``mask`` (its labelled pixels) and
    ``coverage`` (soft, rim included)."""

    colour: str
    shape: str
    shape_iou: Mapping[str, float] = field(compare=False)
    centre: tuple[float, float]
    side: float
    size: str
    pattern: str
    pattern_features: Mapping[str, float] = field(compare=False)
    occluded: bool
    area: int
    mask: np.ndarray = field(repr=False, compare=False)
    coverage: np.ndarray = field(repr=False, compare=False)

    @property
    def position(self) -> str:
        return position_of(*self.centre)

    def describe(self) -> dict[str, str]:
        return {
            "colour": self.colour,
            "shape": self.shape,
            "position": self.position,
            "size": self.size,
            "pattern": self.pattern,
        }


@dataclass(frozen=True)
class SceneReading:
    """Everything read from one image: background and objects (largest first), and the per-pixel labels
    (-1 none, 0 background, 1 + k palette colour k)."""

    background: BackgroundReading
    objects: tuple[DetectedObject, ...]
    labels: np.ndarray = field(repr=False, compare=False)

    def of_colour(self, colour: str) -> list[DetectedObject]:
        return [o for o in self.objects if o.colour == colour]


_PLANE = np.array([[1.0, -1.0, 0.0], [1.0, 1.0, -2.0]]) / np.array([[math.sqrt(2)], [math.sqrt(6)]])


def _background_chroma(chroma: np.ndarray) -> np.ndarray:
    """The most common chroma (2-D histogram mode, refined by the median of the pixels near it): the background
    covers more of the image than any one object, and its texture only changes the grey level."""
    flat = chroma.reshape(-1, 3)
    uv = flat @ _PLANE.T
    bins = np.floor(uv / 6.0).astype(int)
    bins -= bins.min(axis=0)
    hist = np.zeros(bins.max(axis=0) + 3)
    np.add.at(hist, (bins[:, 0] + 1, bins[:, 1] + 1), 1)
    smooth = _box(hist, 1)
    peak = np.array(np.unravel_index(smooth.argmax(), smooth.shape)) - 1
    near = np.all(np.abs(bins - peak) <= 1, axis=1)
    centre = np.median(flat[near], axis=0)
    close = np.linalg.norm(flat - centre, axis=-1) < 12
    return np.median(flat[close], axis=0) if close.sum() >= 20 else centre


def _pixel_labels(img: np.ndarray, config: SceneBenchConfig) -> tuple[np.ndarray, np.ndarray]:
    """Labels (-1 none, 0 background, 1 + k palette colour k) and the background chroma.

    Distances: to the background, the chroma distance from the background's chroma combined with how far the grey
    level is outside the background's range; to palette colour c, the chroma distance from the segment
    s x chroma(c), s in [``segment_low``, 1.25] (lightness free, so a desaturated or darker rendering of c still
    reads as c)."""
    chroma = _chroma(img)
    bg_chroma = _background_chroma(chroma)
    d_chroma = np.linalg.norm(chroma - bg_chroma, axis=-1)
    grey = img.mean(axis=-1)
    levels = grey[d_chroma < 12]
    lo, hi = np.percentile(levels, [1, 99]) if len(levels) >= 20 else (grey.min(), grey.max())
    gap = np.maximum(0.0, np.maximum(lo - grey, grey - hi))
    d_bg = np.sqrt(d_chroma**2 + 3 * gap**2)
    dists = []
    for c in _PALETTE:
        q = _chroma(c)
        t = np.clip((chroma @ q) / float(q @ q), config.segment_low, 1.25)
        dists.append(np.linalg.norm(chroma - t[..., None] * q, axis=-1))
    all_d = np.stack([d_bg, *dists], axis=-1)
    labels = all_d.argmin(axis=-1)
    limit = np.maximum(config.label_distance, 0.35 * np.linalg.norm(chroma, axis=-1))
    labels = np.where(all_d.min(axis=-1) < np.where(labels == 0, config.label_distance, limit), labels, -1)
    return labels, bg_chroma


def _read_background(img: np.ndarray, labels: np.ndarray, config: SceneBenchConfig) -> BackgroundReading:
    mask = labels == 0
    clean = mask & ~_dilate(labels > 0, 1)
    if clean.sum() < 50:
        clean = mask
    tone = img.mean(axis=-1)
    # the spread is read on a 3 x 3 mean over background pixels, so pixel noise does not make a plain one textured
    weights = clean.astype(np.float64)
    smooth = _box(tone * weights, 1) / np.maximum(_box(weights, 1), 1e-9)
    values = tone[clean]
    base = img[clean].mean(axis=0) if clean.any() else img.reshape(-1, 3).mean(axis=0)
    lo, hi = np.percentile(values, [5, 95]) if len(values) else (0.0, 0.0)
    spread = float(np.subtract(*np.percentile(smooth[clean], [95, 5]))) if len(values) else 0.0
    features: dict[str, float] = {"spread": spread}
    if spread < config.flat_spread:
        kind = "flat"
    else:
        total = float(((values - values.mean()) ** 2).sum()) or 1.0
        ys, xs = np.nonzero(clean)
        r2, profiles = {}, {}
        for axis, coord in (("x", xs), ("y", ys)):
            sums = np.bincount(coord, values, minlength=img.shape[1 if axis == "x" else 0])
            counts = np.bincount(coord, minlength=len(sums))
            prof = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
            r2[axis] = 1 - float(((values - prof[coord]) ** 2).sum()) / total
            profiles[axis] = (prof, counts)
        axis = max(r2, key=r2.__getitem__)
        features["profile_r2"] = r2[axis]
        if r2[axis] >= config.profile_r2:
            prof, counts = profiles[axis]
            ok = counts > 0
            pos = np.flatnonzero(ok).astype(float)
            fit = np.polyfit(pos, prof[ok], 1)
            resid = prof[ok] - np.polyval(fit, pos)
            linear = 1 - float((resid**2).sum()) / (float(((prof[ok] - prof[ok].mean()) ** 2).sum()) or 1.0)
            features["linear_r2"] = linear
            if linear >= config.gradient_r2:
                kind = "horizontal" if axis == "x" else "vertical"
            else:
                kind = "stripes"
        else:
            band = 0.2 * spread
            two = float(np.mean((np.abs(values - lo) < band) | (np.abs(values - hi) < band)))
            features["two_level"] = two
            kind = "checks" if two >= config.two_level else "noise"
    dark = float(np.median(values)) < 128 if len(values) else True
    options = [n for n, c in BACKGROUND_COLOURS.items() if (np.mean(c) < 128) == dark]
    colour = min(
        options, key=lambda n: float(np.linalg.norm(_chroma(np.asarray(BACKGROUND_COLOURS[n], float)) - _chroma(base)))
    )
    return BackgroundReading(kind, colour, tuple(float(v) for v in base), features, mask)


def _local_background(img: np.ndarray, bg_mask: np.ndarray, radius: int = 3) -> np.ndarray:
    """Per pixel the mean of the background pixels in a growing window (global mean where none)."""
    out = np.full(img.shape, np.nan)
    todo = np.ones(bg_mask.shape, bool)
    weights = bg_mask.astype(np.float64)
    for r in (radius, 2 * radius, 4 * radius):
        n = _box(weights, r)
        s = _box(img * weights[..., None], r)
        ok = todo & (n > 0)
        out[ok] = s[ok] / n[ok][:, None]
        todo &= ~ok
    if todo.any():
        out[todo] = img[bg_mask].mean(axis=0) if bg_mask.any() else img.reshape(-1, 3).mean(axis=0)
    return out


def _nearest_fill(values: np.ndarray, known: np.ndarray, steps: int = 3) -> np.ndarray:
    """Spread ``values`` (H x W x 3) from ``known`` pixels outwards by averaging known 8-neighbours."""
    out = np.where(known[..., None], values, 0.0)
    have = known.copy()
    for _ in range(steps):
        n = _box(have.astype(np.float64), 1)
        s = _box(out * have[..., None], 1)
        new = ~have & (n > 0)
        out[new] = s[new] / n[new][:, None]
        have |= new
    return out


def _soft_coverage(img: np.ndarray, mask: np.ndarray, others: np.ndarray, local_bg: np.ndarray) -> np.ndarray:
    """1 on the object's inner pixels; on its rim (2 px out, not other objects) the pixel's position between the
    local background and the nearest inner object colour."""
    inner = _erode(mask, 1)
    if inner.sum() < 4:
        inner = mask
    obj = _nearest_fill(img, inner, 4)
    rim = _dilate(mask, 2) & ~inner & ~others
    d = obj - local_bg
    denom = np.maximum((d * d).sum(-1), 1e-6)
    alpha = np.clip(((img - local_bg) * d).sum(-1) / denom, 0.0, 1.0)
    # a rim pixel that is no closer to the object than to the background contributes nothing
    alpha = np.where((d * d).sum(-1) < 400, 0.0, alpha)
    cov = np.where(inner, 1.0, np.where(rim, alpha, 0.0))
    return np.where(cov >= 0.1, cov, 0.0)


_MOVES = np.array([(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)], dtype=np.float64)


def _fit_template(cov: np.ndarray, known: np.ndarray, start: dict[str, tuple[float, float, float]]) -> dict:
    """Per shape, local search of (cx, cy, side) maximising soft IoU over ``known`` pixels."""
    best = {}
    c_known = np.where(known, cov, 0.0)
    for shape in SHAPES:
        cx, cy, side = start[shape]

        def score(cx: float, cy: float, side: float, shape: str = shape) -> float:
            t = np.where(known, shape_coverage(shape, (cx, cy), side, cov.shape, 2), 0.0)
            return float(np.minimum(c_known, t).sum() / max(np.maximum(c_known, t).sum(), 1e-9))

        current = score(cx, cy, side)
        for step in (2.0, 1.0, 0.5):
            improved = True
            while improved:
                improved = False
                for dx, dy, ds in _MOVES * step:
                    s = score(cx + dx, cy + dy, side + ds)
                    if s > current + 1e-6:
                        cx, cy, side, current = cx + dx, cy + dy, side + ds, s
                        improved = True
        best[shape] = (current, cx, cy, side)
    return best


def _pattern(img: np.ndarray, mask: np.ndarray, others: np.ndarray, config: SceneBenchConfig) -> tuple[str, dict]:
    """Pattern word and features (dark fraction, anisotropy) from the tone inside the eroded mask."""
    inner = _erode(mask, 1) & ~_dilate(others, 1)
    if inner.sum() < 12:
        inner = mask & ~others
    pix = img[inner]
    bright = np.percentile(np.linalg.norm(pix, axis=-1), 90) if len(pix) else 1.0
    direction = np.median(pix[np.linalg.norm(pix, axis=-1) >= 0.9 * bright], axis=0) if len(pix) else np.ones(3)
    unit = direction / max(np.linalg.norm(direction), 1e-6)
    tone = (img @ unit) / max(float(direction @ unit), 1e-6)
    dark = float(np.mean(tone[inner] < config.dark_tone)) if inner.any() else 0.0
    diffs = []
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a, b = _shifted_pairs(inner, dy, dx)
        ta, tb = _shifted_pairs(tone, dy, dx)
        both = a & b
        diffs.append(float(np.abs(ta - tb)[both].mean()) if both.any() else 0.0)
    anisotropy = min(diffs) / max(max(diffs), 1e-6)
    features = {"dark_fraction": dark, "anisotropy": anisotropy, "contrast": max(diffs)}
    if dark <= config.solid_dark_fraction:
        return "solid", features
    return ("striped" if anisotropy < config.stripe_anisotropy else "dotted"), features


def _components(labels: np.ndarray, config: SceneBenchConfig) -> list[tuple[int, np.ndarray]]:
    """(palette index, mask) of every object: cored components, pieces joined through other objects merged."""
    ids = _label(np.where(labels > 0, labels, -1))
    objects = []
    for i in range(1, int(ids.max()) + 1):
        m = ids == i
        k = int(labels[m][0]) - 1
        core = _erode(labels == k + 1, 1) & m
        if core.sum() >= config.min_core and m.sum() >= config.min_area:
            objects.append((k, m))
    # join pieces of one colour connected through the pixels of other objects (an object split by an occluder)
    merged: list[tuple[int, np.ndarray]] = []
    for k in sorted({k for k, _ in objects}):
        pieces = [m for kk, m in objects if kk == k]
        if len(pieces) > 1:
            bridge = _label(np.where((labels > 0) & (labels != k + 1) | np.logical_or.reduce(pieces), 0, -1))
            groups: dict[int, np.ndarray] = {}
            for m in pieces:
                g = int(np.bincount(bridge[m]).argmax())
                groups[g] = groups[g] | m if g in groups else m
            pieces = list(groups.values())
        merged += [(k, m) for m in pieces]
    return merged


def read_scene(image: np.ndarray, config: SceneBenchConfig | None = None) -> SceneReading:
    """Background and objects of an H x W x 3 uint8 scene image (see the module docstring)."""
    config = config or SceneBenchConfig()
    img = _as_image(image)
    h, w = img.shape[:2]
    labels, _ = _pixel_labels(img, config)
    background = _read_background(img, labels, config)
    local_bg = _local_background(img, labels == 0)
    comps = _components(labels, config)
    objects = []
    for k, mask in comps:
        others = np.zeros((h, w), bool)
        for _, m in comps:
            if m is not mask:
                others |= m
        cov = _soft_coverage(img, mask, others, local_bg)
        area = float(cov.sum())
        occluded = bool((_dilate(mask, 2) & others).any())
        shape, ious = classify_shape(cov)
        centre = _centroid(cov)
        side = math.sqrt(area / SHAPE_AREAS[shape])
        if occluded:
            known = ~_dilate(others, 1)
            start = {s: (*centre, math.sqrt(area / SHAPE_AREAS[s])) for s in SHAPES}
            fits = _fit_template(cov, known, start)
            shape = max(fits, key=lambda s: fits[s][0])
            ious = {s: f[0] for s, f in fits.items()}
            _, cx, cy, side = fits[shape]
            centre = (cx, cy)
        pattern, pfeatures = _pattern(img, mask, others, config)
        objects.append(
            DetectedObject(
                colour=_NAMES[k],
                shape=shape,
                shape_iou=ious,
                centre=(centre[0] / w, centre[1] / h),
                side=side / w,
                size="small" if side / w < config.size_split else "large",
                pattern=pattern,
                pattern_features=pfeatures,
                occluded=occluded,
                area=int(mask.sum()),
                mask=mask,
                coverage=cov,
            )
        )
    objects.sort(key=lambda o: -o.area)
    return SceneReading(background, tuple(objects), labels)


# --------------------------------------------------------------------------------------------
# Scoring against a caption
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObjectResult:
    """One named object: ``found`` (None when no object of its colour), and per attribute True / False when the
    caption named it, None when it left it open (then ``found`` says what the image shows)."""

    target: ParsedSceneObject
    found: DetectedObject | None
    shape_correct: bool
    position_correct: bool | None
    size_correct: bool | None
    pattern_correct: bool | None

    @property
    def colour_present(self) -> bool:
        return self.found is not None

    def checks(self) -> dict[str, bool]:
        out = {"colour": self.colour_present, "shape": self.shape_correct}
        for name in ("position", "size", "pattern"):
            value = getattr(self, f"{name}_correct")
            if value is not None:
                out[name] = value
        return out

    def open_attributes(self) -> dict[str, str | None]:
        """Attributes the caption left open and what the image shows for them (None if the object is missing)."""
        return {
            name: (getattr(self.found, name) if self.found is not None else None)
            for name in ("position", "size", "pattern")
            if getattr(self.target, name) is None
        }


@dataclass(frozen=True)
class SceneImageResult:
    """Scores of one image: per named object, the background (when named), the count; see :func:`evaluate_scene`."""

    prompt: str
    objects: tuple[SceneObjectResult, ...]
    background: BackgroundReading
    background_named: Background | None
    count_correct: bool
    extra: tuple[str, ...]

    @property
    def background_kind_correct(self) -> bool | None:
        return None if self.background_named is None else self.background.kind == self.background_named.kind

    @property
    def background_colour_correct(self) -> bool | None:
        return None if self.background_named is None else self.background.colour == self.background_named.colour

    def checks(self) -> dict[str, list[bool]]:
        """Per named attribute, one flag per instance (objects' attributes, background, count)."""
        out: dict[str, list[bool]] = {a: [] for a in (*ATTRIBUTES, "count")}
        for o in self.objects:
            for name, ok in o.checks().items():
                out[name].append(ok)
        if self.background_named is not None:
            out["background_kind"].append(bool(self.background_kind_correct))
            out["background_colour"].append(bool(self.background_colour_correct))
        out["count"].append(self.count_correct)
        return out

    def attribute_correct(self, name: str) -> bool | None:
        """All instances of a named attribute right (None when the caption does not name it)."""
        flags = self.checks()[name]
        return all(flags) if flags else None

    @property
    def all_checks(self) -> bool:
        return all(all(flags) for flags in self.checks().values())

    def open_attributes(self) -> dict[str, object]:
        """What the caption left open and what the image shows: ``objects`` per named object (position / size /
        pattern), ``background`` (kind and colour) when the caption names no background."""
        out: dict[str, object] = {"objects": [o.open_attributes() for o in self.objects]}
        if self.background_named is None:
            out["background"] = {"kind": self.background.kind, "colour": self.background.colour}
        return out


def _prompt(prompt: str | tuple) -> tuple[str, tuple[ParsedSceneObject, ...], Background | None]:
    if isinstance(prompt, str):
        objects, background = parse_caption(prompt)
        return prompt, objects, background
    objects, background = prompt
    objects = tuple(objects)
    if not objects or not all(isinstance(o, ParsedSceneObject) for o in objects):
        raise TypeError("prompt must be a caption or a (ParsedSceneObject sequence, Background | None) pair")
    return "; ".join(f"{o.colour} {o.shape}" for o in objects), objects, background


def _cost(target: ParsedSceneObject, found: DetectedObject) -> float:
    cost = 0.0 if found.shape == target.shape else 1.0
    if target.position is not None:
        cost += math.dist(found.centre, POSITION_CENTRES[target.position])
    for name in ("size", "pattern"):
        if getattr(target, name) is not None and getattr(target, name) != getattr(found, name):
            cost += 0.5
    return cost


def _match(reading: SceneReading, targets: Sequence[ParsedSceneObject]) -> list[DetectedObject | None]:
    matched: list[DetectedObject | None] = [None] * len(targets)
    for colour in {t.colour for t in targets}:
        idx = [i for i, t in enumerate(targets) if t.colour == colour]
        candidates = reading.of_colour(colour)[:6]
        k = min(len(idx), len(candidates))
        best, best_cost = (), math.inf
        for comps in itertools.permutations(candidates, k):
            for chosen in itertools.permutations(idx, k):
                cost = sum(_cost(targets[i], c) for c, i in zip(comps, chosen))
                if cost < best_cost:
                    best, best_cost = tuple(zip(comps, chosen)), cost
        for c, i in best:
            matched[i] = c
    return matched


def evaluate_scene(
    image: np.ndarray,
    prompt: str | tuple[Sequence[ParsedSceneObject], Background | None],
    config: SceneBenchConfig | None = None,
    reading: SceneReading | None = None,
) -> SceneImageResult:
    """Score an H x W x 3 uint8 image against a scenes caption (or its :func:`~diffattn_bench.scenes.parse_caption`
    parse). Objects are matched by colour (among several of one colour, by the named attributes); every other
    palette-coloured object is extra and fails the count. Pass ``reading`` to reuse a :func:`read_scene`."""
    text, targets, background = _prompt(prompt)
    reading = reading or read_scene(image, config)
    matched = _match(reading, targets)
    results = []
    for t, f in zip(targets, matched):

        def named(attr: str, t: ParsedSceneObject = t, f: DetectedObject | None = f) -> bool | None:
            want = getattr(t, attr)
            return None if want is None else (f is not None and getattr(f, attr) == want)

        results.append(
            SceneObjectResult(
                target=t,
                found=f,
                shape_correct=f is not None and f.shape == t.shape,
                position_correct=named("position"),
                size_correct=named("size"),
                pattern_correct=named("pattern"),
            )
        )
    used = {id(f) for f in matched if f is not None}
    extra = tuple(o.colour for o in reading.objects if id(o) not in used)
    count_correct = not extra and all(f is not None for f in matched)
    return SceneImageResult(text, tuple(results), reading.background, background, count_correct, extra)


# --------------------------------------------------------------------------------------------
# Helpers for removal scores
# --------------------------------------------------------------------------------------------


def object_mask(
    image: np.ndarray, colour: str, shape: str | None = None, config: SceneBenchConfig | None = None
) -> np.ndarray:
    """H x W bool mask of the pixels of the named object (its labelled pixels and every rim pixel it covers at
    all); of several objects of ``colour`` the one of ``shape`` (else the largest). All False when none found."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; use one of {', '.join(COLOURS)}")
    if shape is not None and shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
    reading = read_scene(image, config)
    found = reading.of_colour(colour)
    if shape is not None:
        found = [o for o in found if o.shape == shape] or found
    if not found:
        return np.zeros(np.asarray(image).shape[:2], bool)
    return found[0].mask | (found[0].coverage > 0)


def background_psnr(image: np.ndarray, clean: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR (dB, uint8 range) between ``image`` and ``clean`` (e.g. ``scenes.render_without``) over the pixels
    of ``mask`` (all pixels when None); inf when they agree there, nan for an empty mask."""
    a, b = np.asarray(image), np.asarray(clean)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if mask is None:
        return psnr(a, b, 255.0)
    mask = np.asarray(mask, bool)
    if mask.shape != a.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match the image's {a.shape[:2]}")
    if not mask.any():
        return math.nan
    return psnr(a[mask], b[mask], 255.0)


# --------------------------------------------------------------------------------------------
# The benchmark's prompt set
# --------------------------------------------------------------------------------------------

#: Seed of the benchmark's scenes; the training set is ``sample_scene(default_rng((0, i)))`` (seed 0).
BENCH_SEED = 1009


def scenes_prompts(count: int, split: str = "train", seed: int = BENCH_SEED) -> list[str]:
    """``count`` seeded ShapesBench captions of the scenes model: caption ``i`` describes
    ``sample_scene(default_rng((seed, i)), split)`` and leaves attributes out as in training (``scenes.LEAVE_OUT``).
    ``split="held_out"`` puts a (colour, shape, pattern) combination never trained on in every scene; ``"train"``
    scenes are new images of trained combinations. The same (count, split, seed) always gives the same list."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    rng = np.random.default_rng
    return [caption(sample_scene(rng((seed, i)), split), rng((seed, i, 1)))[0] for i in range(count)]


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


def summarize_scenes(results: Iterable[SceneImageResult]) -> dict[str, float]:
    """Rates over images: per attribute the fraction of named instances read right (nan when never named),
    ``count`` and ``all_checks`` per image, and ``n_images``."""
    results = list(results)
    out: dict[str, float] = {"n_images": float(len(results))}
    for name in (*ATTRIBUTES, "count"):
        flags = [f for r in results for f in r.checks()[name]]
        out[name] = float(np.mean(flags)) if flags else math.nan
    out["all_checks"] = float(np.mean([r.all_checks for r in results])) if results else math.nan
    return out


# --------------------------------------------------------------------------------------------
# Calibration on rendered ground truth
# --------------------------------------------------------------------------------------------

_PERTURB = ("colour", "shape", "position", "size", "pattern", "background_kind", "background_colour")


def _perturbed(
    objects: Sequence[ParsedSceneObject], background: Background, attribute: str, rng: np.random.Generator
) -> tuple[tuple[ParsedSceneObject, ...], Background, int | None]:
    """The parse with one wrong word for ``attribute`` (of a random object); returns the object index changed."""
    from dataclasses import replace

    from diffattn_bench.grammar import POSITIONS

    if attribute == "background_kind":
        kind = str(rng.choice([k for k in BACKGROUND_KINDS if k != background.kind]))
        return tuple(objects), Background(kind, background.colour), None
    if attribute == "background_colour":
        colour = str(rng.choice([c for c in BACKGROUND_COLOURS if c != background.colour]))
        return tuple(objects), Background(background.kind, colour), None
    i = int(rng.integers(len(objects)))
    current = getattr(objects[i], attribute)
    pool = {
        "colour": [c for c in COLOURS if c not in {o.colour for o in objects}],
        "shape": [s for s in SHAPES if s != current],
        "position": [p for p in POSITIONS if p != current],
        "size": [s for s in SCENE_SIZES if s != current],
        "pattern": [p for p in PATTERNS if p != current],
    }[attribute]
    changed = list(objects)
    changed[i] = replace(objects[i], **{attribute: str(rng.choice(pool))})
    return tuple(changed), background, i


def calibrate(n: int = 300, seed: int = 0, config: SceneBenchConfig | None = None) -> dict[str, dict[str, float]]:
    """Score ``n`` rendered scenes (half train, half held-out split) against their full captions, and against
    captions with one wrong word per attribute. Returns ``{"truth": rates, "perturbed": failure rates, "seconds"}``
    where a perturbed case counts as caught when that attribute's check (for the changed object) fails."""
    from diffattn_bench.scenes import caption, render, sample_scene

    rng = np.random.default_rng(seed)
    truth, caught = [], {a: [] for a in _PERTURB}
    start = time.perf_counter()
    for i in range(n):
        split = "train" if i % 2 == 0 else "held_out"
        scene = sample_scene(np.random.default_rng((seed, i)), split)
        image = render(scene)
        text, _ = caption(scene, rng, leave_out={"position": 0, "size": 0, "pattern": 0, "background": 0})
        reading = read_scene(image, config)
        truth.append(evaluate_scene(image, text, config, reading))
        objects, background = parse_caption(text)
        assert background is not None
        for attribute in _PERTURB:
            changed, bg, index = _perturbed(objects, background, attribute, rng)
            result = evaluate_scene(image, (changed, bg), config, reading)
            if index is None:
                ok = result.attribute_correct(attribute)
            else:
                ok = result.objects[index].checks()[attribute]
            caught[attribute].append(not ok)
    return {
        "truth": summarize_scenes(truth),
        "perturbed": {a: float(np.mean(v)) for a, v in caught.items()},
        "seconds": {"total": time.perf_counter() - start},
    }


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return "  n/a" if math.isnan(x) else f"{100 * x:5.1f}"


def format_scene_table(names: Sequence[str], results: Sequence[SceneImageResult]) -> str:
    """One row per image (checks that failed, what the caption left open), then the rates in %."""
    width = max([len(n) for n in names] + [4])
    lines = [f"{'file':<{width}}  all   failed / open  prompt"]
    for name, r in zip(names, results):
        failed = [a for a, flags in r.checks().items() if flags and not all(flags)]
        open_ = r.open_attributes()
        shown = "; ".join(
            ", ".join(f"{k}={v}" for k, v in o.items())
            for o in open_["objects"]
            if o  # type: ignore[union-attr]
        )
        if "background" in open_:
            bg = open_["background"]
            shown += f"{'; ' if shown else ''}background={bg['colour']} {bg['kind']}"  # type: ignore[index]
        lines.append(
            f"{name:<{width}}  {'yes' if r.all_checks else 'no ':<4}  "
            f"{'failed: ' + ','.join(failed) if failed else ''}{' | open: ' + shown if shown else ''}  {r.prompt}"
        )
    s = summarize_scenes(results)
    lines += ["", f"images {int(s['n_images'])}"]
    lines.append("  ".join(f"{a} % {_pct(s[a])}" for a in (*ATTRIBUTES, "count", "all_checks")))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m diffattn_bench.scene_scoring IMAGE_DIR`` or ``--calibrate [--n N]``."""
    parser = argparse.ArgumentParser(
        prog="python -m diffattn_bench.scene_scoring",
        description="ShapesBench for the scenes model: score a folder of PNGs, or calibrate on rendered scenes.",
    )
    parser.add_argument("image_dir", type=Path, nargs="?", help="folder with PNGs and prompts.json (file -> caption)")
    parser.add_argument("--calibrate", action="store_true", help="measure the scorer on rendered ground truth")
    parser.add_argument("--n", type=int, default=300, help="scenes for --calibrate (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --calibrate")
    args = parser.parse_args(argv)
    if args.calibrate:
        report = calibrate(args.n, args.seed)
        t = report["truth"]
        sys.stdout.write(f"rendered truth, full captions: {int(t['n_images'])} scenes (half held-out split)\n")
        for a in (*ATTRIBUTES, "count", "all_checks"):
            sys.stdout.write(f"  {a:<18} {_pct(t[a])} %\n")
        sys.stdout.write("one wrong word in the caption: share of cases whose check fails\n")
        for a, v in report["perturbed"].items():
            sys.stdout.write(f"  {a:<18} {_pct(v)} %\n")
        sys.stdout.write(f"time {report['seconds']['total']:.1f} s\n")
        return 0
    if args.image_dir is None:
        parser.error("give IMAGE_DIR or --calibrate")
    names, images, prompts = prompted_images(args.image_dir, parser.error)
    results = [evaluate_scene(image, prompt) for image, prompt in zip(images, prompts, strict=True)]
    sys.stdout.write(format_scene_table(names, results) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
