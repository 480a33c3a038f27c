"""Scene grammar for the synthetic "shapes" world, shared by the data generator and ShapesBench.

A scene is one to a few flat-coloured shapes on a dark (or light) background. Each object is
described by four words: a size, a colour, a shape and a position, and captions are built
from a small fixed grammar::

    caption  := phrase ( ", " phrase )* " and " phrase | phrase
    phrase   := "a" [SIZE] COLOUR SHAPE POSITION_PHRASE [MOTION_PHRASE]
    POSITION_PHRASE := "on the left" | "at the top left" | "in the centre" | ...
    MOTION_PHRASE   := "moving left|right|up|down" | "moving in a circle"

Coordinates are fractions of the image: x to the right, y downwards, both in [0, 1].
Positions sit on a 3x3 grid (0.2, 0.5, 0.8); the region a position word covers is its cell
of that grid (cell borders at 0.35 and 0.65), see :func:`position_of`. Sizes are the side
of the shape's bounding box as a fraction of the shorter image side.

This module depends on numpy only (no torch, no diffusers).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

__all__ = [
    "BACKGROUNDS",
    "CIRCLE_RADIUS",
    "COLOURS",
    "LINEAR_DISTANCE",
    "MOTION_DIRECTIONS",
    "MOTION_KINDS",
    "POSITIONS",
    "POSITION_CENTRES",
    "SHAPES",
    "SHAPE_AREAS",
    "SIZES",
    "SIZE_FRACTIONS",
    "VOCABULARY",
    "Motion",
    "ParsedObject",
    "Scene",
    "ShapeSpec",
    "caption",
    "parse_caption",
    "position_of",
    "shape_coverage",
    "shape_extent",
    "trajectory",
]

# --------------------------------------------------------------------------------------------
# Vocabulary and constants
# --------------------------------------------------------------------------------------------

#: Object palette (RGB). Every channel is either 30 or 225, so any two colours differ by at
#: least 195 in RGB distance (one channel), complementary pairs by 338. Values are kept away
#: from 0/255 so per-object colour jitter never clips.
COLOURS: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {
        "red": (225, 30, 30),
        "green": (30, 225, 30),
        "blue": (30, 30, 225),
        "yellow": (225, 225, 30),
        "magenta": (225, 30, 225),
        "cyan": (30, 225, 225),
    }
)

#: Background base colours. Mid grey is deliberately absent: the 50/50 mix of two
#: complementary palette colours (red+cyan, green+magenta, blue+yellow) is mid grey, so on a
#: grey background colour leakage between such subjects would be invisible.
BACKGROUNDS: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {
        "black": (24, 24, 24),
        "white": (232, 232, 232),
    }
)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

#: Side of the shape's bounding box as a fraction of the shorter image side. "small" (9 px at
#: 32x32) is about the least at which circles and squares stay distinguishable; as grid
#: positions are 0.3 apart, objects at neighbouring positions never fit together.
SIZE_FRACTIONS: Mapping[str, float] = MappingProxyType({"small": 0.28, "medium": 0.34, "large": 0.40})
SIZES: tuple[str, ...] = tuple(SIZE_FRACTIONS)

_GRID = (0.2, 0.5, 0.8)
_CELL_BORDERS = (0.35, 0.65)

#: Nominal centre (x, y) of each position word, fractions of the image.
POSITION_CENTRES: Mapping[str, tuple[float, float]] = MappingProxyType(
    {
        "left": (_GRID[0], _GRID[1]),
        "right": (_GRID[2], _GRID[1]),
        "top": (_GRID[1], _GRID[0]),
        "bottom": (_GRID[1], _GRID[2]),
        "centre": (_GRID[1], _GRID[1]),
        "top left": (_GRID[0], _GRID[0]),
        "top right": (_GRID[2], _GRID[0]),
        "bottom left": (_GRID[0], _GRID[2]),
        "bottom right": (_GRID[2], _GRID[2]),
    }
)
POSITIONS: tuple[str, ...] = tuple(POSITION_CENTRES)

_PREPOSITION = MappingProxyType({"left": "on", "right": "on", "centre": "in"})  # everything else: "at"

MOTION_KINDS: tuple[str, ...] = ("linear", "circular")
#: Unit direction (dx, dy) of each linear motion word (y points down).
MOTION_DIRECTIONS: Mapping[str, tuple[int, int]] = MappingProxyType(
    {
        "left": (-1, 0),
        "right": (1, 0),
        "up": (0, -1),
        "down": (0, 1),
    }
)
#: Total travel of a linear motion over the clip, fraction of the image side.
LINEAR_DISTANCE = 0.24
#: Radius of a circular motion, fraction of the image side.
CIRCLE_RADIUS = 0.1

#: Every word (and the comma) a caption can contain, in a fixed order; a tokenizer is built
#: from this tuple.
VOCABULARY: tuple[str, ...] = (
    "a",
    "and",
    ",",
    *SIZES,
    *COLOURS,
    *SHAPES,
    "on",
    "at",
    "in",
    "the",
    "left",
    "right",
    "top",
    "bottom",
    "centre",
    "moving",
    "up",
    "down",
)

# --------------------------------------------------------------------------------------------
# Dataclasses
# --------------------------------------------------------------------------------------------


def _check_word(value: object, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; use one of {', '.join(map(repr, allowed))}")


@dataclass(frozen=True)
class Motion:
    """How an object moves over a clip; its position word names the mean position.

    ``kind="linear"`` needs ``direction`` in ``MOTION_DIRECTIONS``: the object travels
    ``LINEAR_DISTANCE`` in that direction, centred on its position. ``kind="circular"`` takes
    no direction: the object goes once clockwise (on screen) round a circle of radius
    ``CIRCLE_RADIUS`` centred on its position, starting at the top.
    """

    kind: str
    direction: str | None = None

    def __post_init__(self) -> None:
        _check_word(self.kind, MOTION_KINDS, "motion kind")
        if self.kind == "linear":
            if self.direction is None:
                raise ValueError(
                    "a linear Motion needs a direction; pass direction= one of "
                    f"{', '.join(map(repr, MOTION_DIRECTIONS))}"
                )
            _check_word(self.direction, tuple(MOTION_DIRECTIONS), "motion direction")
        elif self.direction is not None:
            raise ValueError("a circular Motion takes no direction; pass direction=None")

    @property
    def phrase(self) -> str:
        """The caption phrase, e.g. ``"moving left"`` or ``"moving in a circle"``."""
        return f"moving {self.direction}" if self.kind == "linear" else "moving in a circle"

    def offset(self, t: int, frames: int) -> tuple[float, float]:
        """Displacement (dx, dy) from the mean position at frame ``t`` of ``frames``."""
        if frames < 2:
            raise ValueError(f"a clip needs at least 2 frames for motion, got frames={frames}")
        if not 0 <= t < frames:
            raise ValueError(f"frame index t={t} is outside 0..{frames - 1}")
        if self.kind == "linear":
            assert self.direction is not None
            dx, dy = MOTION_DIRECTIONS[self.direction]
            u = (t / (frames - 1) - 0.5) * LINEAR_DISTANCE
            return (dx * u, dy * u)
        theta = -math.pi / 2 + 2 * math.pi * t / frames
        return (CIRCLE_RADIUS * math.cos(theta), CIRCLE_RADIUS * math.sin(theta))

    def position(self, t: int, frames: int, centre: tuple[float, float]) -> tuple[float, float]:
        """Exact position (x, y) at frame ``t`` of ``frames`` for a trajectory around ``centre``."""
        dx, dy = self.offset(t, frames)
        return (centre[0] + dx, centre[1] + dy)


def trajectory(motion: Motion | None, frames: int, centre: tuple[float, float]) -> list[tuple[float, float]]:
    """Positions for all frames; ``motion=None`` means the object stays at ``centre``."""
    if motion is None:
        return [centre] * frames
    return [motion.position(t, frames, centre) for t in range(frames)]


@dataclass(frozen=True)
class ShapeSpec:
    """One object: ``shape`` in SHAPES, ``colour`` in COLOURS, ``position`` in POSITIONS,
    ``size`` in SIZES."""

    shape: str
    colour: str
    position: str
    size: str = "medium"

    def __post_init__(self) -> None:
        _check_word(self.shape, SHAPES, "shape")
        _check_word(self.colour, tuple(COLOURS), "colour")
        _check_word(self.position, POSITIONS, "position")
        _check_word(self.size, SIZES, "size")

    @property
    def centre(self) -> tuple[float, float]:
        """Nominal centre (x, y) of the object's position word."""
        return POSITION_CENTRES[self.position]

    @property
    def size_fraction(self) -> float:
        return SIZE_FRACTIONS[self.size]


@dataclass(frozen=True)
class Scene:
    """One or more objects, at distinct positions, on a named background."""

    objects: tuple[ShapeSpec, ...]
    background: str = "black"

    def __post_init__(self) -> None:
        if isinstance(self.objects, list):
            object.__setattr__(self, "objects", tuple(self.objects))
        if not isinstance(self.objects, tuple) or not self.objects:
            raise ValueError("Scene needs a non-empty tuple of ShapeSpec objects")
        for obj in self.objects:
            if not isinstance(obj, ShapeSpec):
                raise TypeError(f"Scene objects must be ShapeSpec, got {type(obj).__name__}")
        positions = [obj.position for obj in self.objects]
        if len(set(positions)) != len(positions):
            raise ValueError(f"two objects share a position in {positions}; give every object its own position")
        _check_word(self.background, tuple(BACKGROUNDS), "background")


@dataclass(frozen=True)
class ParsedObject:
    """An object as read back from a caption; ``size`` and ``motion`` are None when absent."""

    colour: str
    shape: str
    position: str
    size: str | None = None
    motion: Motion | None = None

    def __post_init__(self) -> None:
        _check_word(self.shape, SHAPES, "shape")
        _check_word(self.colour, tuple(COLOURS), "colour")
        _check_word(self.position, POSITIONS, "position")
        if self.size is not None:
            _check_word(self.size, SIZES, "size")

    @property
    def centre(self) -> tuple[float, float]:
        return POSITION_CENTRES[self.position]

    def matches(self, spec: ShapeSpec) -> bool:
        """True if colour, shape, position (and size, when parsed) agree with ``spec``."""
        return (self.colour, self.shape, self.position) == (spec.colour, spec.shape, spec.position) and self.size in (
            None,
            spec.size,
        )


# --------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------


def _band(v: float) -> int:
    return 0 if v < _CELL_BORDERS[0] else (2 if v > _CELL_BORDERS[1] else 1)


def position_of(x: float, y: float) -> str:
    """The position word whose region contains the point (x, y) (fractions of the image).

    Regions are the cells of a 3x3 grid with borders at 0.35 and 0.65, i.e. each point gets
    the position word with the nearest nominal centre. So "left" means left third *and*
    vertically central; an object in the top-left cell is "top left", not "left".
    """
    col, row = _band(x), _band(y)
    horizontal = ("left", "", "right")[col]
    vertical = ("top", "", "bottom")[row]
    return " ".join(w for w in (vertical, horizontal) if w) or "centre"


# --------------------------------------------------------------------------------------------
# Shape geometry (pixel coordinates: pixel i covers [i, i + 1), x right, y down)
# --------------------------------------------------------------------------------------------


def shape_extent(shape: str, centre: tuple[float, float], side: float) -> tuple[float, float, float, float]:
    """Bounding box (x0, y0, x1, y1) of ``shape`` with side ``side`` and area centroid ``centre``.

    Every shape fits a ``side`` x ``side`` box; the triangle is upright and isosceles with
    width = height = ``side``, so its centroid sits one third of the height above its base.
    """
    _check_word(shape, SHAPES, "shape")
    cx, cy = centre
    if shape == "triangle":
        return (cx - side / 2, cy - 2 * side / 3, cx + side / 2, cy + side / 3)
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def shape_coverage(
    shape: str, centre: tuple[float, float], side: float, size: tuple[int, int], supersample: int = 4
) -> np.ndarray:
    """Fraction of each pixel of an ``size`` = (H, W) image covered by the shape (floats in [0, 1]).

    Coverage is estimated on a ``supersample`` x ``supersample`` grid per pixel
    (``supersample=1`` samples pixel centres only, i.e. no anti-aliasing).
    """
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    h, w = size
    bx0, by0, bx1, by1 = shape_extent(shape, centre, side)
    x0, x1 = max(0, math.floor(bx0) - 1), min(w, math.ceil(bx1) + 1)
    y0, y1 = max(0, math.floor(by0) - 1), min(h, math.ceil(by1) + 1)
    cov = np.zeros((h, w))
    if x1 <= x0 or y1 <= y0:
        return cov
    n = supersample
    xs = x0 + (np.arange((x1 - x0) * n) + 0.5) / n
    ys = y0 + (np.arange((y1 - y0) * n) + 0.5) / n
    X, Y = np.meshgrid(xs, ys)
    cx, cy = centre
    if shape == "circle":
        inside = (X - cx) ** 2 + (Y - cy) ** 2 <= (side / 2) ** 2
    elif shape == "square":
        inside = (np.abs(X - cx) <= side / 2) & (np.abs(Y - cy) <= side / 2)
    else:
        inside = (Y >= by0) & (Y <= by1) & (np.abs(X - cx) <= (Y - by0) / 2)
    cov[y0:y1, x0:x1] = inside.reshape(y1 - y0, n, x1 - x0, n).mean(axis=(1, 3))
    return cov


#: Area of each shape with side 1 (used to fit a template of the right size to a measured area).
SHAPE_AREAS: Mapping[str, float] = MappingProxyType({"circle": math.pi / 4, "square": 1.0, "triangle": 0.5})


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def _position_phrase(position: str) -> str:
    return f"{_PREPOSITION.get(position, 'at')} the {position}"


def _object_phrase(spec: ShapeSpec, with_size: bool, motion: Motion | None) -> str:
    words = ["a"]
    if with_size:
        words.append(spec.size)
    words += [spec.colour, spec.shape, _position_phrase(spec.position)]
    if motion is not None:
        words.append(motion.phrase)
    return " ".join(words)


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(
    scene: Scene,
    *,
    with_size: bool = False,
    motions: tuple[Motion | None, ...] | None = None,
) -> str:
    """Caption of ``scene``: ``"a red circle on the left and a blue square on the right"``.

    ``with_size`` adds size words ("a small red circle ..."); ``motions`` (one entry per
    object, None for a static object) adds motion phrases for video captions.
    """
    if motions is None:
        motions = (None,) * len(scene.objects)
    if len(motions) != len(scene.objects):
        raise ValueError(
            f"got {len(motions)} motions for {len(scene.objects)} objects; pass one Motion (or None) per object"
        )
    return _join([_object_phrase(o, with_size, m) for o, m in zip(scene.objects, motions)])


_ALIASES = MappingProxyType({"center": "centre", "an": "a"})
_SPLIT = re.compile(r"\s*,\s*|\s+and\s+")
_EXPECTED = "expected phrases like 'a red circle on the left' joined by ', ' and ' and '"


def _parse_phrase(phrase: str, text: str) -> ParsedObject:
    words = [_ALIASES.get(w, w) for w in phrase.split()]

    def fail(reason: str) -> ValueError:
        return ValueError(f"cannot parse caption {text!r}: {reason} in {phrase!r}; {_EXPECTED}")

    if not words or words[0] != "a":
        raise fail("a phrase must start with 'a'")
    words = words[1:]
    size = None
    if words and words[0] in SIZE_FRACTIONS:
        size, words = words[0], words[1:]
    if len(words) < 2:
        raise fail("missing colour or shape")
    colour, shape, rest = words[0], words[1], words[2:]
    if colour not in COLOURS:
        raise fail(f"unknown colour {colour!r} (known: {', '.join(COLOURS)})")
    if shape not in SHAPES:
        raise fail(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    motion = None
    if "moving" in rest:
        i = rest.index("moving")
        rest, motion_words = rest[:i], rest[i + 1 :]
        if motion_words == ["in", "a", "circle"]:
            motion = Motion("circular")
        elif len(motion_words) == 1 and motion_words[0] in MOTION_DIRECTIONS:
            motion = Motion("linear", motion_words[0])
        else:
            raise fail(
                f"unknown motion 'moving {' '.join(motion_words)}' (known: moving "
                f"{', moving '.join(MOTION_DIRECTIONS)}, moving in a circle)"
            )
    if len(rest) < 3 or rest[0] not in ("on", "at", "in") or rest[1] != "the":
        raise fail("missing position phrase such as 'on the left' or 'at the top right'")
    position = " ".join(rest[2:])
    if position not in POSITION_CENTRES:
        raise fail(f"unknown position {position!r} (known: {', '.join(POSITIONS)})")
    return ParsedObject(colour=colour, shape=shape, position=position, size=size, motion=motion)


def parse_caption(text: str) -> tuple[ParsedObject, ...]:
    """Objects described by a caption of the grammar (case and extra spaces are ignored).

    Raises ValueError naming the offending phrase and word when ``text`` is not in the grammar.
    """
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}")
    cleaned = " ".join(text.lower().replace(",", " , ").split()).rstrip(" .")
    if not cleaned:
        raise ValueError(f"cannot parse an empty caption; {_EXPECTED}")
    phrases = _SPLIT.split(cleaned)
    if any(not p for p in phrases):
        raise ValueError(f"cannot parse caption {text!r}: empty phrase; {_EXPECTED}")
    return tuple(_parse_phrase(p, text) for p in phrases)
