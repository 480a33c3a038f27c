"""Scenes for the second embedded image model: textured backgrounds, patterned objects, captions that leave room.

The first model's captions (see :mod:`diffattn_bench.grammar`) name every attribute, so the noise decides nothing
and editing or guidance methods have nothing to preserve. Here a scene is 1-3 objects, each with a colour, shape,
size (small / large), surface pattern (solid, striped, dotted) and position, drawn in order (later objects on top,
so they may overlap) on a background of one of six kinds (plain, vertical / horizontal gradient, striped, checked,
speckled) in one of four colours (two dark, two light). Captions always name each object's colour and shape and
leave out its position, size and pattern, and the background, each with a probability::

    caption    := object ( ", " object )* " and " object [ " on a " BGCOLOUR " " BGKIND " background" ]
    object     := "a" [SIZE] COLOUR [PATTERN] SHAPE [POSITION_PHRASE]

e.g. ``"a small red striped circle at the top left and a blue square on a black checked background"``.

Everything is in the frozen :class:`Scene` (object centres, colour shades, the background's seed), so
:func:`render` is a pure function of the scene and :func:`render_without` differs from it only inside the
removed object's mask. Images are 64 x 64 RGB uint8. Words are in :data:`SCENE_VOCABULARY` (the first model's
grammar plus the new words), see :func:`diffattn_bench.embedded.scenes_tokenizer`.

A generalisation split: the (colour, shape, pattern) combinations in :data:`HELD_OUT` never appear in
``sample_scene(rng, "train")``; ``sample_scene(rng, "held_out")`` puts one of them in every scene.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from diffattn_bench.grammar import COLOURS, SHAPES, VOCABULARY, _position_phrase, position_of, shape_coverage

__all__ = [
    "BACKGROUND_COLOURS",
    "BACKGROUND_KINDS",
    "HELD_OUT",
    "IMAGE_SIZE",
    "LEAVE_OUT",
    "PATTERNS",
    "SCENE_SIZES",
    "SCENE_VOCABULARY",
    "Background",
    "Named",
    "ParsedSceneObject",
    "Scene",
    "SceneObject",
    "caption",
    "object_masks",
    "parse_caption",
    "render",
    "render_without",
    "sample_scene",
    "visible_masks",
]

IMAGE_SIZE = 64

#: Side of an object's bounding box, fraction of the image side (14 and 26 px at 64 px).
SCENE_SIZES: Mapping[str, float] = MappingProxyType({"small": 0.22, "large": 0.40})
PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted")

#: Background base colours: two dark, two light, all far from the saturated object palette.
BACKGROUND_COLOURS: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {
        "black": (24, 24, 24),
        "brown": (92, 62, 40),
        "white": (232, 232, 232),
        "beige": (214, 200, 164),
    }
)
DARK_BACKGROUNDS = ("black", "brown")

#: Background kinds; the caption's word(s) for each.
BACKGROUND_KINDS: Mapping[str, str] = MappingProxyType(
    {
        "flat": "plain",
        "vertical": "vertical gradient",
        "horizontal": "horizontal gradient",
        "stripes": "striped",
        "checks": "checked",
        "noise": "speckled",
    }
)

#: (colour, shape, pattern) combinations never rendered in the training split: each colour once, each shape and
#: each pattern twice, so every single word is still seen in training, only these combinations are new.
HELD_OUT: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("red", "triangle", "dotted"),
        ("green", "circle", "striped"),
        ("blue", "square", "dotted"),
        ("yellow", "triangle", "striped"),
        ("magenta", "square", "solid"),
        ("cyan", "circle", "solid"),
    }
)

#: Default probability that a caption leaves out each attribute (per object for position, size and pattern).
LEAVE_OUT: Mapping[str, float] = MappingProxyType({"position": 0.5, "size": 0.5, "pattern": 0.5, "background": 0.5})

_NEW_WORDS = (
    *PATTERNS,
    *BACKGROUND_COLOURS,
    "background",
    "plain",
    "vertical",
    "horizontal",
    "gradient",
    "checked",
    "speckled",
)
#: The first model's words followed by the new ones (existing words keep their order; "striped" doubles as a
#: pattern and a background kind).
SCENE_VOCABULARY: tuple[str, ...] = (*VOCABULARY, *(w for w in dict.fromkeys(_NEW_WORDS) if w not in VOCABULARY))

_OBJECT_COUNTS = (1, 2, 3)
_OBJECT_COUNT_P = (0.3, 0.4, 0.3)
_CENTRE_JITTER = 0.08  # position cells are 0.3 wide around their nominal centre (0.2, 0.5, 0.8)
_GRID = (0.2, 0.5, 0.8)
_MIN_VISIBLE = 0.6  # every object keeps at least this fraction of its area visible
_SHADE = 10  # per-channel colour jitter of an object
_EDGE = 1.0 / IMAGE_SIZE
_SUPERSAMPLE = 4
_LAYOUT_TRIES = 200


def _check(value: object, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; use one of {', '.join(map(repr, allowed))}")


# --------------------------------------------------------------------------------------------
# Dataclasses
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """One object; ``centre`` is its area centroid (x, y) as fractions of the image, ``shade`` an RGB offset."""

    colour: str
    shape: str
    size: str
    pattern: str
    centre: tuple[float, float]
    shade: tuple[int, int, int] = (0, 0, 0)

    def __post_init__(self) -> None:
        _check(self.colour, tuple(COLOURS), "colour")
        _check(self.shape, SHAPES, "shape")
        _check(self.size, tuple(SCENE_SIZES), "size")
        _check(self.pattern, PATTERNS, "pattern")

    @property
    def position(self) -> str:
        """The grammar's position word of the centre (3 x 3 grid cells, see ``grammar.position_of``)."""
        return position_of(*self.centre)

    @property
    def combination(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.pattern)

    @property
    def rgb(self) -> np.ndarray:
        return np.clip(np.asarray(COLOURS[self.colour]) + np.asarray(self.shade), 0, 255).astype(np.float64)


@dataclass(frozen=True)
class Background:
    """``kind`` in BACKGROUND_KINDS, ``colour`` in BACKGROUND_COLOURS; ``seed`` draws its texture details
    (direction of the gradient, stripe period and orientation, check size, noise)."""

    kind: str
    colour: str
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.kind, tuple(BACKGROUND_KINDS), "background kind")
        _check(self.colour, tuple(BACKGROUND_COLOURS), "background colour")

    @property
    def dark(self) -> bool:
        return self.colour in DARK_BACKGROUNDS

    @property
    def phrase(self) -> str:
        return f"on a {self.colour} {BACKGROUND_KINDS[self.kind]} background"


@dataclass(frozen=True)
class Scene:
    """Objects in drawing order (later ones on top) on a background."""

    objects: tuple[SceneObject, ...]
    background: Background

    def __post_init__(self) -> None:
        if isinstance(self.objects, list):
            object.__setattr__(self, "objects", tuple(self.objects))
        if not self.objects:
            raise ValueError("a Scene needs at least one object")

    def without(self, index: int) -> Scene:
        if not 0 <= index < len(self.objects):
            raise IndexError(f"object index {index} out of range for {len(self.objects)} objects")
        return Scene(self.objects[:index] + self.objects[index + 1 :], self.background)


@dataclass(frozen=True)
class Named:
    """Which attributes a caption names: ``background`` and, per object, ``position``, ``size``, ``pattern``
    (colour and shape are always named)."""

    background: bool
    objects: tuple[Mapping[str, bool], ...] = field(default=())


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    return xx, yy


def _background(bg: Background, size: int) -> np.ndarray:
    rng = np.random.default_rng(bg.seed)
    base = np.asarray(BACKGROUND_COLOURS[bg.colour], dtype=np.float64)
    toward = 1.0 if bg.dark else -1.0  # second tone: lighter on dark backgrounds, darker on light ones
    xx, yy = _grid(size)
    if bg.kind in ("vertical", "horizontal"):
        ramp = (yy if bg.kind == "vertical" else xx) / size
        if rng.random() < 0.5:
            ramp = 1 - ramp
        tone = ramp * rng.uniform(40, 60)
    elif bg.kind == "stripes":
        period = rng.uniform(8, 12)
        coord = xx if rng.random() < 0.5 else yy
        phase = rng.uniform(0, 1)
        tone = 36 * np.clip(0.5 + 2 * np.cos(2 * math.pi * (coord / period + phase)), 0, 1)
    elif bg.kind == "checks":
        cell = rng.uniform(8, 14)
        ox, oy = rng.uniform(0, cell, size=2)
        tone = 36.0 * ((np.floor((xx + ox) / cell) + np.floor((yy + oy) / cell)) % 2)
    elif bg.kind == "noise":
        coarse = rng.normal(0, 1, size=(size // 8 + 2, size // 8 + 2))
        # bilinear upsampling of a coarse grid: blotches a few pixels across, plus fine grain
        gx, gy = xx / 8, yy / 8
        x0, y0 = np.floor(gx).astype(int), np.floor(gy).astype(int)
        fx, fy = gx - x0, gy - y0
        smooth = (
            coarse[y0, x0] * (1 - fx) * (1 - fy)
            + coarse[y0, x0 + 1] * fx * (1 - fy)
            + coarse[y0 + 1, x0] * (1 - fx) * fy
            + coarse[y0 + 1, x0 + 1] * fx * fy
        )
        tone = np.clip(18 + 14 * smooth + rng.normal(0, 6, size=(size, size)), 0, 48)
    else:  # flat
        tone = np.zeros((size, size))
    canvas = base + toward * tone[..., None] + rng.normal(0, 1.5, size=(size, size, 3))
    return canvas


def _surface(obj: SceneObject, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB field of the object's surface, its main colour): patterns mix the colour with a darker tone."""
    colour = obj.rgb
    if obj.pattern == "solid":
        return np.broadcast_to(colour, (size, size, 3)), colour
    xx, yy = _grid(size)
    cx, cy = obj.centre[0] * size, obj.centre[1] * size
    if obj.pattern == "striped":  # diagonal stripes, period 8 px, anchored at the centroid
        dark = np.clip(0.5 + 2 * np.cos(2 * math.pi * ((xx - cx) + (yy - cy)) / 8.0), 0, 1)
    else:  # dotted: dots of radius ~1.8 px on a 7 px grid anchored at the centroid
        dx = (xx - cx + 3.5) % 7.0 - 3.5
        dy = (yy - cy + 3.5) % 7.0 - 3.5
        dark = np.clip(2.3 - np.hypot(dx, dy), 0, 1)
    second = colour * 0.35
    return colour + dark[..., None] * (second - colour), colour


def _coverage(obj: SceneObject, size: int, supersample: int = _SUPERSAMPLE) -> np.ndarray:
    centre = (obj.centre[0] * size, obj.centre[1] * size)
    return shape_coverage(obj.shape, centre, SCENE_SIZES[obj.size] * size, (size, size), supersample)


def _to_uint8(canvas: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene as an ``size x size x 3`` uint8 image (a pure function of ``scene``)."""
    canvas = _background(scene.background, size)
    for obj in scene.objects:
        cov = _coverage(obj, size)[..., None]
        surface, _ = _surface(obj, size)
        canvas = canvas * (1 - cov) + cov * surface
    return _to_uint8(canvas)


def render_without(scene: Scene, index: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene with object ``index`` removed (what a perfect removal leaves: the background and the objects it
    covered continue). Differs from ``render(scene)`` only inside ``object_masks(scene)[index]``."""
    return render(scene.without(index), size)


def object_masks(scene: Scene, size: int = IMAGE_SIZE) -> tuple[np.ndarray, ...]:
    """Per object, the H x W boolean mask of every pixel its shape touches (occluded parts included)."""
    return tuple(_coverage(o, size) > 0 for o in scene.objects)


def visible_masks(scene: Scene, size: int = IMAGE_SIZE) -> tuple[np.ndarray, ...]:
    """Per object, the pixels at least half covered by it and less than half by the objects drawn over it."""
    covs = [_coverage(o, size) for o in scene.objects]
    masks = []
    for i, cov in enumerate(covs):
        visible = cov.copy()
        for above in covs[i + 1 :]:
            visible *= 1 - above
        masks.append(visible >= 0.5)
    return tuple(masks)


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def _combinations(split: str) -> list[tuple[str, str, str]]:
    every = [(c, s, p) for c in COLOURS for s in SHAPES for p in PATTERNS]
    if split == "train":
        return [k for k in every if k not in HELD_OUT]
    if split == "held_out":
        return sorted(HELD_OUT)
    raise ValueError(f"unknown split {split!r}; use 'train' or 'held_out'")


def _clamped_centre(shape: str, side: float, x: float, y: float) -> tuple[float, float]:
    """Move (x, y) inwards so the shape's bounding box keeps one pixel from the border."""
    up, down = (2 * side / 3, side / 3) if shape == "triangle" else (side / 2, side / 2)
    x = min(max(x, side / 2 + _EDGE), 1 - side / 2 - _EDGE)
    y = min(max(y, up + _EDGE), 1 - down - _EDGE)
    return (x, y)


def _readable(objects: Sequence[SceneObject]) -> bool:
    covs = [_coverage(o, 32, supersample=1) for o in objects]  # a coarse check is enough
    for i, cov in enumerate(covs):
        visible = cov.copy()
        for above in covs[i + 1 :]:
            visible *= 1 - above
        if visible.sum() < _MIN_VISIBLE * cov.sum():
            return False
    return True


def sample_scene(rng: np.random.Generator | int, split: str = "train", objects: int | None = None) -> Scene:
    """A random readable scene: 1-3 objects (30/40/30%) of distinct colours at distinct position words, each keeping
    at least 60% of its area visible; in ``split="held_out"`` the first object's (colour, shape, pattern) is from
    HELD_OUT and the others are training combinations, in ``"train"`` no object's is."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    train = _combinations("train")
    first = _combinations(split)
    n = int(rng.choice(_OBJECT_COUNTS, p=_OBJECT_COUNT_P)) if objects is None else objects
    if not 1 <= n <= 3:
        raise ValueError(f"objects must be 1, 2 or 3, got {n}")
    background = Background(
        kind=str(rng.choice(tuple(BACKGROUND_KINDS))),
        colour=str(rng.choice(tuple(BACKGROUND_COLOURS))),
        seed=int(rng.integers(2**31)),
    )
    for _ in range(_LAYOUT_TRIES):
        cells = rng.choice(9, size=n, replace=False)
        chosen: list[SceneObject] = []
        for i, cell in enumerate(cells):
            pool = first if i == 0 else train
            used = {o.colour for o in chosen}
            options = [k for k in pool if k[0] not in used]
            colour, shape, pattern = options[int(rng.integers(len(options)))]
            size = str(rng.choice(tuple(SCENE_SIZES)))
            x = _GRID[cell % 3] + rng.uniform(-_CENTRE_JITTER, _CENTRE_JITTER)
            y = _GRID[cell // 3] + rng.uniform(-_CENTRE_JITTER, _CENTRE_JITTER)
            centre = _clamped_centre(shape, SCENE_SIZES[size], x, y)
            shade = tuple(int(v) for v in rng.integers(-_SHADE, _SHADE + 1, size=3))
            chosen.append(SceneObject(colour, shape, size, pattern, centre, shade))
        order = rng.permutation(n)  # drawing order independent of which object is the held-out one
        ordered = [chosen[i] for i in order]
        if _readable(ordered):
            return Scene(tuple(ordered), background)
    raise ValueError(f"found no readable layout of {n} objects in {_LAYOUT_TRIES} tries")


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def _object_phrase(obj: SceneObject, named: Mapping[str, bool]) -> str:
    words = ["a"]
    if named["size"]:
        words.append(obj.size)
    words.append(obj.colour)
    if named["pattern"]:
        words.append(obj.pattern)
    words.append(obj.shape)
    if named["position"]:
        words.append(_position_phrase(obj.position))
    return " ".join(words)


def caption(
    scene: Scene, rng: np.random.Generator | int | None = None, leave_out: Mapping[str, float] = LEAVE_OUT
) -> tuple[str, Named]:
    """A caption of ``scene`` and what it names. Colour and shape of every object are always named; each object's
    position, size and pattern, and the background, are left out independently with probability
    ``leave_out[attribute]`` (``0`` names everything, ``1`` nothing but colours and shapes)."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    unknown = set(leave_out) - set(LEAVE_OUT)
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)} in leave_out; use {', '.join(LEAVE_OUT)}")
    p = {**LEAVE_OUT, **leave_out}
    objects = tuple(
        MappingProxyType({a: bool(rng.random() >= p[a]) for a in ("position", "size", "pattern")})
        for _ in scene.objects
    )
    named = Named(background=bool(rng.random() >= p["background"]), objects=objects)
    phrases = [_object_phrase(o, n) for o, n in zip(scene.objects, objects)]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if named.background:
        text += " " + scene.background.phrase
    return text, named


@dataclass(frozen=True)
class ParsedSceneObject:
    """An object as read back from a caption; attributes the caption left out are None."""

    colour: str
    shape: str
    size: str | None = None
    pattern: str | None = None
    position: str | None = None


_BACKGROUND_RE = re.compile(r"\s+on a (\w+) (.+?) background$")
_KIND_OF_WORDS = {v: k for k, v in BACKGROUND_KINDS.items()}


def parse_caption(text: str) -> tuple[tuple[ParsedSceneObject, ...], Background | None]:
    """Objects and background (kind and colour; None when not named) of a caption made by :func:`caption`."""
    text = " ".join(text.lower().split())
    background = None
    match = _BACKGROUND_RE.search(text)
    if match:
        colour, kind = match.group(1), _KIND_OF_WORDS.get(match.group(2))
        if kind is None:
            raise ValueError(f"unknown background kind {match.group(2)!r} in {text!r}")
        background = Background(kind=kind, colour=colour)
        text = text[: match.start()]
    parsed = []
    for phrase in re.split(r"\s*,\s*|\s+and\s+", text):
        words = phrase.split()
        if not words or words[0] != "a":
            raise ValueError(f"phrase {phrase!r} of {text!r} does not start with 'a'")
        words = words[1:]
        size = words.pop(0) if words and words[0] in SCENE_SIZES else None
        if not words or words[0] not in COLOURS:
            raise ValueError(f"phrase {phrase!r} has no colour word")
        colour = words.pop(0)
        pattern = words.pop(0) if words and words[0] in PATTERNS else None
        if not words or words[0] not in SHAPES:
            raise ValueError(f"phrase {phrase!r} has no shape word")
        shape = words.pop(0)
        position = None
        if words:
            if len(words) < 3 or words[0] not in ("on", "at", "in") or words[1] != "the":
                raise ValueError(f"phrase {phrase!r} has an unreadable position phrase")
            position = " ".join(words[2:])
        parsed.append(ParsedSceneObject(colour, shape, size, pattern, position))
    return tuple(parsed), background
