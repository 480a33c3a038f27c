"""Seeded generators for the synthetic shapes world: images, videos and a torch Dataset.

Images are ``H x W x 3`` uint8 arrays. Each object is rendered flat-coloured (palette colour
plus a small per-object jitter) and anti-aliased by 4x4 supersampling; the background is the
scene's background colour with a faint gradient and noise that stay within
``BACKGROUND_AMPLITUDE`` levels of the base colour, far from every palette colour.

Geometry: an object's anchor is the area centroid of its shape (for a triangle, one third of
the height above the base), so the centroid ShapesBench measures is the centre recorded here.
Pixel coordinates are continuous with pixel ``i`` covering ``[i, i + 1)``; its centre is
``i + 0.5``.

Only readable scenes are produced: objects stay ``EDGE_MARGIN_PX`` inside the image and at
least ``max(MIN_GAP_PX, MIN_GAP * shorter side)`` apart, and their centroids stay inside the
region of their position word (see :func:`diffattn_bench.grammar.position_of`). Scenes that cannot
be drawn that way raise ValueError instead of rendering something ShapesBench cannot read.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from diffattn_bench.grammar import (
    BACKGROUNDS,
    COLOURS,
    MOTION_DIRECTIONS,
    POSITIONS,
    SHAPES,
    SIZES,
    Motion,
    Scene,
    ShapeSpec,
    caption,
    shape_coverage,
    shape_extent,
    trajectory,
)

__all__ = [
    "BACKGROUND_AMPLITUDE",
    "EDGE_MARGIN_PX",
    "MAX_JITTER",
    "MIN_GAP",
    "MIN_GAP_PX",
    "Box",
    "ObjectRecord",
    "SceneRecord",
    "ShapesDataset",
    "object_box",
    "random_scene",
    "random_video_scene",
    "render_scene",
    "render_video",
    "scene_problem",
    "video_problem",
]

logger = logging.getLogger(__name__)

#: Largest random offset of an object from its nominal centre, fraction of the image side.
#: Position cells are 0.15 wide on each side of the nominal centre, so centroids stay inside.
MAX_JITTER = 0.04
#: Smallest gap between two objects' bounding boxes, fraction of the shorter image side ...
MIN_GAP = 0.04
#: ... and in pixels: with 2 px at least one untouched pixel separates two objects, so their
#: anti-aliased edges never touch and ShapesBench sees them as separate blobs.
MIN_GAP_PX = 2.0
#: Objects' bounding boxes stay this many pixels inside the image border.
EDGE_MARGIN_PX = 1.0
#: Background pixels stay within this many levels (per channel) of the background base colour.
BACKGROUND_AMPLITUDE = 12
#: Per-channel colour jitter of an object, in 8-bit levels.
COLOUR_JITTER = 8
_SUPERSAMPLE = 4
_JITTER_TRIES = 20
_LAYOUT_TRIES = 500
_MIN_SIDE = 16

RngLike = np.random.Generator | int | Sequence[int] | None


def _rng(rng: RngLike) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _as_size(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if min(h, w) < _MIN_SIDE:
        raise ValueError(
            f"image size {(h, w)} is too small; use at least {_MIN_SIDE} px per side (32 or 64 recommended)"
        )
    return int(h), int(w)


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """Axis-aligned box in continuous pixel coordinates (x0 < x1, y0 < y1)."""

    x0: float
    y0: float
    x1: float
    y1: float

    def gap(self, other: Box) -> float:
        """Separation from ``other`` (largest axis gap); negative when the boxes overlap."""
        return max(other.x0 - self.x1, self.x0 - other.x1, other.y0 - self.y1, self.y0 - other.y1)

    def inside(self, size: tuple[int, int], margin: float) -> bool:
        h, w = size
        return self.x0 >= margin and self.y0 >= margin and self.x1 <= w - margin and self.y1 <= h - margin


def _side_px(spec: ShapeSpec, size: tuple[int, int]) -> float:
    return spec.size_fraction * min(size)


def object_box(spec: ShapeSpec, centre_px: tuple[float, float], size: tuple[int, int]) -> Box:
    """Bounding box of ``spec`` drawn with its area centroid at ``centre_px``."""
    return Box(*shape_extent(spec.shape, centre_px, _side_px(spec, size)))


def _clamp_centre(spec: ShapeSpec, centre_px: tuple[float, float], size: tuple[int, int]) -> tuple[float, float]:
    """Move the centre inwards just enough for the object to keep EDGE_MARGIN_PX from the border."""
    box = object_box(spec, centre_px, size)
    h, w = size
    m = EDGE_MARGIN_PX
    dx = max(0.0, m - box.x0) - max(0.0, box.x1 - (w - m))
    dy = max(0.0, m - box.y0) - max(0.0, box.y1 - (h - m))
    return (centre_px[0] + dx, centre_px[1] + dy)


def _nominal_px(spec: ShapeSpec, size: tuple[int, int]) -> tuple[float, float]:
    h, w = size
    return (spec.centre[0] * w, spec.centre[1] * h)


def _layout_problem(
    specs: Sequence[ShapeSpec], centres: Sequence[tuple[float, float]], size: tuple[int, int]
) -> str | None:
    boxes = [object_box(s, c, size) for s, c in zip(specs, centres)]
    for spec, box in zip(specs, boxes):
        if not box.inside(size, EDGE_MARGIN_PX):
            return f"the {spec.size} {spec.shape} at the {spec.position} does not fit inside a {size} image"
    min_gap = max(MIN_GAP_PX, MIN_GAP * min(size))
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            if boxes[i].gap(boxes[j]) < min_gap:
                a, b = specs[i], specs[j]
                return (
                    f"the {a.size} {a.shape} at the {a.position} and the {b.size} {b.shape} at the "
                    f"{b.position} are less than {min_gap:.1f} px apart"
                )
    return None


def scene_problem(scene: Scene, size: int | tuple[int, int] = 32) -> str | None:
    """Why ``scene`` cannot be rendered readably at ``size`` (objects at nominal positions), or None."""
    size = _as_size(size)
    centres = [_clamp_centre(o, _nominal_px(o, size), size) for o in scene.objects]
    return _layout_problem(scene.objects, centres, size)


def _video_centres(
    scene: Scene, motions: Sequence[Motion | None], frames: int, size: tuple[int, int], offsets: np.ndarray
) -> list[list[tuple[float, float]]]:
    """Per frame, per object centre in pixels."""
    h, w = size
    per_object = [
        [(x * w + ox, y * h + oy) for x, y in trajectory(m, frames, o.centre)]
        for o, m, (ox, oy) in zip(scene.objects, motions, offsets)
    ]
    return [list(frame) for frame in zip(*per_object)]


def video_problem(
    scene: Scene, motions: Sequence[Motion | None], frames: int = 8, size: int | tuple[int, int] = 32
) -> str | None:
    """Why the clip cannot be rendered readably (an object leaves the frame or objects get too close), or None."""
    size = _as_size(size)
    _check_motions(scene, motions, frames)
    zero = np.zeros((len(scene.objects), 2))
    for t, centres in enumerate(_video_centres(scene, motions, frames, size, zero)):
        problem = _layout_problem(scene.objects, centres, size)
        if problem:
            return f"frame {t}: {problem}"
    return None


def _check_motions(scene: Scene, motions: Sequence[Motion | None], frames: int) -> None:
    if len(motions) != len(scene.objects):
        raise ValueError(
            f"got {len(motions)} motions for {len(scene.objects)} objects; pass one Motion (or None) per object"
        )
    if frames < 2:
        raise ValueError(f"a video needs at least 2 frames, got frames={frames}")


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectRecord:
    """Ground truth of one rendered object.

    ``centre`` is the exact area centroid (x, y) in continuous pixel coordinates, ``bbox`` the
    (x0, y0, x1, y1) pixel-index box of ``mask`` (end exclusive), ``mask`` the H x W pixels at
    least half covered by the shape, ``colour`` the RGB actually painted.
    """

    spec: ShapeSpec
    centre: tuple[float, float]
    bbox: tuple[int, int, int, int]
    mask: np.ndarray = field(repr=False, compare=False)
    colour: tuple[int, int, int]


@dataclass(frozen=True)
class SceneRecord:
    """Ground truth of one rendered image (or one video frame)."""

    scene: Scene
    size: tuple[int, int]
    objects: tuple[ObjectRecord, ...]
    background: tuple[int, int, int]


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _background(name: str, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Base colour + faint linear gradient + faint noise, within BACKGROUND_AMPLITUDE of the base."""
    h, w = size
    base = np.asarray(BACKGROUNDS[name], dtype=np.float64)
    angle = rng.uniform(0, 2 * math.pi)
    amplitude = rng.uniform(0, BACKGROUND_AMPLITUDE - 4)
    yy, xx = np.mgrid[0:h, 0:w]
    # linear ramp in [-1, 1] along a random direction
    ramp = (np.cos(angle) * (xx / max(w - 1, 1) - 0.5) + np.sin(angle) * (yy / max(h - 1, 1) - 0.5)) * math.sqrt(2)
    noise = rng.normal(0, 1.5, size=(h, w, 3))
    texture = np.clip(amplitude * ramp[..., None] + noise, -BACKGROUND_AMPLITUDE, BACKGROUND_AMPLITUDE)
    return base + texture


def _paint(
    canvas: np.ndarray,
    scene: Scene,
    centres: Sequence[tuple[float, float]],
    colours: Sequence[tuple[int, int, int]],
    size: tuple[int, int],
    antialias: bool,
) -> tuple[ObjectRecord, ...]:
    records = []
    for spec, centre, colour in zip(scene.objects, centres, colours):
        cov = shape_coverage(spec.shape, centre, _side_px(spec, size), size, _SUPERSAMPLE if antialias else 1)
        canvas *= 1 - cov[..., None]
        canvas += cov[..., None] * np.asarray(colour, dtype=np.float64)
        mask = cov >= 0.5
        ys, xs = np.nonzero(mask)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        centre = (float(centre[0]), float(centre[1]))
        records.append(ObjectRecord(spec=spec, centre=centre, bbox=bbox, mask=mask, colour=colour))
    return tuple(records)


def _object_colours(scene: Scene, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    colours = []
    for obj in scene.objects:
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        colours.append(tuple(int(v) for v in np.clip(np.asarray(COLOURS[obj.colour]) + jitter, 0, 255)))
    return colours


def _to_uint8(canvas: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def render_scene(
    scene: Scene,
    size: int | tuple[int, int] = 32,
    rng: RngLike = None,
    *,
    antialias: bool = True,
    jitter: bool = True,
) -> tuple[np.ndarray, SceneRecord]:
    """Render ``scene`` to an ``H x W x 3`` uint8 image and its ground-truth record.

    ``size`` is ``(H, W)`` or one int for a square image; ``rng`` a Generator or seed. Each
    object is offset by up to ``MAX_JITTER`` from its nominal centre (``jitter=False`` turns
    this off). Raises ValueError, with :func:`scene_problem`'s reason, if the scene cannot
    be drawn readably at this size.
    """
    size = _as_size(size)
    rng = _rng(rng)
    problem = scene_problem(scene, size)
    if problem:
        raise ValueError(f"cannot render scene: {problem}; use smaller sizes or positions further apart")
    canvas = _background(scene.background, size, rng)
    colours = _object_colours(scene, rng)
    h, w = size
    nominal = [_nominal_px(o, size) for o in scene.objects]
    centres = [_clamp_centre(o, c, size) for o, c in zip(scene.objects, nominal)]
    if jitter:
        for attempt in range(_JITTER_TRIES):
            offsets = rng.uniform(-MAX_JITTER, MAX_JITTER, size=(len(scene.objects), 2)) * (w, h)
            trial = [
                _clamp_centre(o, (x + dx, y + dy), size) for o, (x, y), (dx, dy) in zip(scene.objects, nominal, offsets)
            ]
            if _layout_problem(scene.objects, trial, size) is None:
                centres = trial
                break
            logger.debug("jitter attempt %d overlaps, retrying", attempt)
    objects = _paint(canvas, scene, centres, colours, size, antialias)
    record = SceneRecord(scene=scene, size=size, objects=objects, background=BACKGROUNDS[scene.background])
    return _to_uint8(canvas), record


def render_video(
    scene: Scene,
    motions: Sequence[Motion | None],
    frames: int = 8,
    size: int | tuple[int, int] = 32,
    rng: RngLike = None,
    *,
    antialias: bool = True,
    jitter: bool = True,
) -> tuple[np.ndarray, tuple[SceneRecord, ...]]:
    """Render a clip: ``T x H x W x 3`` uint8 frames and one record per frame.

    Object ``i`` follows ``motions[i]`` exactly (None: static) around its nominal centre, plus
    one constant offset per object of up to ``MAX_JITTER`` when ``jitter``. The background is
    identical in every frame. Raises ValueError if an object would leave the frame or come
    too close to another; :func:`random_video_scene` only produces clips that fit.
    """
    size = _as_size(size)
    rng = _rng(rng)
    problem = video_problem(scene, motions, frames, size)
    if problem:
        raise ValueError(f"cannot render video: {problem}; use smaller sizes, other positions or other motions")
    background = _background(scene.background, size, rng)
    colours = _object_colours(scene, rng)
    h, w = size
    n = len(scene.objects)
    paths = _video_centres(scene, motions, frames, size, np.zeros((n, 2)))
    if jitter:
        for _ in range(_JITTER_TRIES):
            offsets = rng.uniform(-MAX_JITTER, MAX_JITTER, size=(n, 2)) * (w, h)
            trial = _video_centres(scene, motions, frames, size, offsets)
            if all(_layout_problem(scene.objects, c, size) is None for c in trial):
                paths = trial
                break
    video = np.empty((frames, h, w, 3), dtype=np.uint8)
    records = []
    for t, centres in enumerate(paths):
        canvas = background.copy()
        objects = _paint(canvas, scene, centres, colours, size, antialias)
        video[t] = _to_uint8(canvas)
        records.append(SceneRecord(scene=scene, size=size, objects=objects, background=BACKGROUNDS[scene.background]))
    return video, tuple(records)


# --------------------------------------------------------------------------------------------
# Random scenes
# --------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options: Sequence[str], k: int, replace: bool = True) -> list[str]:
    return [options[i] for i in rng.choice(len(options), size=k, replace=replace)]


def _check_options(max_objects: int, min_objects: int, colours: Sequence[str], positions: Sequence[str]) -> None:
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects} and {max_objects}")
    if max_objects > min(len(colours), len(positions)):
        raise ValueError(
            f"max_objects={max_objects} needs as many distinct colours and positions; "
            f"got {len(colours)} colours and {len(positions)} positions"
        )


def random_scene(
    rng: RngLike,
    max_objects: int = 3,
    *,
    min_objects: int = 1,
    size: int | tuple[int, int] = 32,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    positions: Sequence[str] = POSITIONS,
    sizes: Sequence[str] = SIZES,
    backgrounds: Sequence[str] = ("black",),
) -> Scene:
    """A random readable scene: distinct colours and positions, no overlaps at ``size``.

    The object count is uniform in ``[min_objects, max_objects]``; layouts that do not fit
    (see :func:`scene_problem`) are redrawn, which favours smaller sizes in crowded scenes.
    """
    rng = _rng(rng)
    size = _as_size(size)
    _check_options(max_objects, min_objects, colours, positions)
    n = int(rng.integers(min_objects, max_objects + 1))
    background = _pick(rng, backgrounds, 1)[0]
    for _ in range(_LAYOUT_TRIES):
        objects = tuple(
            ShapeSpec(shape=s, colour=c, position=p, size=z)
            for s, c, p, z in zip(
                _pick(rng, shapes, n),
                _pick(rng, colours, n, replace=False),
                _pick(rng, positions, n, replace=False),
                _pick(rng, sizes, n),
            )
        )
        scene = Scene(objects=objects, background=background)
        if scene_problem(scene, size) is None:
            return scene
    raise ValueError(
        f"found no readable layout of {n} objects at size {size} in {_LAYOUT_TRIES} tries; "
        "allow smaller sizes, more positions or fewer objects"
    )


def _all_motions() -> tuple[Motion, ...]:
    return (*(Motion("linear", d) for d in MOTION_DIRECTIONS), Motion("circular"))


def random_video_scene(
    rng: RngLike,
    max_objects: int = 2,
    *,
    min_objects: int = 1,
    frames: int = 8,
    size: int | tuple[int, int] = 32,
    allow_static: bool = False,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    positions: Sequence[str] = POSITIONS,
    sizes: Sequence[str] = SIZES,
    backgrounds: Sequence[str] = ("black",),
) -> tuple[Scene, tuple[Motion | None, ...]]:
    """A random scene plus one motion per object whose clip fits (see :func:`video_problem`)."""
    rng = _rng(rng)
    size = _as_size(size)
    _check_options(max_objects, min_objects, colours, positions)
    options: tuple[Motion | None, ...] = _all_motions() + ((None,) if allow_static else ())
    n = int(rng.integers(min_objects, max_objects + 1))
    background = _pick(rng, backgrounds, 1)[0]
    for _ in range(_LAYOUT_TRIES):
        # place objects one at a time; restart when one finds no room
        objects: list[ShapeSpec] = []
        motions: list[Motion | None] = []
        for _ in range(n):
            free_colours = [c for c in colours if c not in {o.colour for o in objects}]
            free_positions = [p for p in positions if p not in {o.position for o in objects}]
            for _ in range(50):
                spec = ShapeSpec(
                    shape=_pick(rng, shapes, 1)[0],
                    colour=_pick(rng, free_colours, 1)[0],
                    position=_pick(rng, free_positions, 1)[0],
                    size=_pick(rng, sizes, 1)[0],
                )
                motion = options[int(rng.integers(len(options)))]
                trial = Scene(objects=(*objects, spec), background=background)
                if video_problem(trial, (*motions, motion), frames, size) is None:
                    objects.append(spec)
                    motions.append(motion)
                    break
            else:
                break
        if len(objects) == n:
            return Scene(objects=tuple(objects), background=background), tuple(motions)
    raise ValueError(
        f"found no clip of {n} moving objects that fits at size {size} in {_LAYOUT_TRIES} tries; "
        "use a larger image, smaller sizes or fewer objects"
    )


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


class ShapesDataset(torch.utils.data.Dataset):
    """Random shapes scenes, deterministic per ``(seed, index)``.

    Items are dicts ``{"pixel_values": float32 3 x H x W tensor in [-1, 1], "caption": str}``.
    Scene options (``shapes``, ``colours``, ``positions``, ``sizes``, ``backgrounds``) are
    passed to :func:`random_scene`.
    """

    def __init__(
        self,
        length: int,
        *,
        seed: int = 0,
        size: int | tuple[int, int] = 32,
        max_objects: int = 3,
        min_objects: int = 1,
        with_size: bool = False,
        **scene_options: Sequence[str],
    ) -> None:
        if length < 1:
            raise ValueError(f"length must be positive, got {length}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy seeds are non-negative), got {seed}")
        self.length = int(length)
        self.seed = int(seed)
        self.size = _as_size(size)
        self.max_objects = max_objects
        self.min_objects = min_objects
        self.with_size = with_size
        self.scene_options = dict(scene_options)
        random_scene(0, max_objects, min_objects=min_objects, size=self.size, **self.scene_options)  # validate now

    def __len__(self) -> int:
        return self.length

    def example(self, index: int) -> tuple[np.ndarray, SceneRecord, str]:
        """Image (uint8 H x W x 3), record and caption of item ``index``."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a ShapesDataset of length {self.length}")
        rng = np.random.default_rng((self.seed, index))
        scene = random_scene(rng, self.max_objects, min_objects=self.min_objects, size=self.size, **self.scene_options)
        image, record = render_scene(scene, self.size, rng)
        return image, record, caption(scene, with_size=self.with_size)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        image, _, text = self.example(index)
        pixels = torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)
        return {"pixel_values": pixels, "caption": text}
