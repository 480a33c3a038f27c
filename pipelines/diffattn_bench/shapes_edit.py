"""ShapesEdit v2: seeded editing cases on the scenes model (:mod:`diffattn_bench.scenes`) and their pixel checks.

The cases and the success checks live here (the model runs in ``scripts/eval_editing_scenes.py``), so tests can
exercise every check on rendered ground truth. A case is a pure function of ``(split, task, index)``: its seed is
:func:`case_seed`, the dev and report splits use disjoint seed ranges, and the same seed is the edit's noise seed.

Tasks (``TASKS``; ``family/subtask``):

- ``replace/colour|shape|pattern``: 1-3 objects; the caption names each object's colour and shape (and, for
  ``pattern``, its pattern) and leaves position, size and background to the noise; ONE object's word changes.
  :func:`check_replace`: the edited object shows the new word and keeps the source image's other attributes,
  centroid (``max_shift`` px) and side (``side_tolerance``); every other object keeps colour, shape, pattern,
  size and place; the background outside every object stays (``background_psnr``).
- ``refine/pattern|size``: one object gains a pattern word ("a red circle" -> "a red striped circle") or a size word.
  :func:`check_refine`: the word shows, colour / shape / place and the other objects are kept.
- ``reweight/pattern|size``: one object whose caption names its pattern ("striped"/"dotted") or "large"; the word's
  cross-attention is re-weighted. :func:`attribute_strength` measures it (dark fraction of the object's inner pixels,
  or its fitted side); :func:`check_reweight`: the strength rises above the unweighted image's by ``rise_margin``.
- ``consistency/place|size``: one object, a position word changes (or "small" -> "large").
  :func:`check_consistency`: the new place (or size) shows, and colour shade, pattern and (place change) size
  are kept from the source image.
- ``removal``: a rendered scene of 2-3 objects, the mask over one that touches no other (:func:`removal_mask`).
  :func:`check_removal`: PSNR inside the mask against ``scenes.render_without`` >= ``removal_psnr`` and every other
  object read in place.
- ``layout``: two objects in two boxes. :func:`check_layout`: both found with the right colour and shape, each
  centroid inside its box, nothing extra.
- ``inversion``: rendered training-split scenes with full captions, scored by reconstruction PSNR.

Thresholds (:class:`EditThresholds`) were set on rendered data (numbers: ``python -m diffattn_bench.shapes_edit``):

- ``background_psnr`` = 28 dB outside the objects (dilated by 2 px). The same background re-drawn with a new
  texture seed (same kind and colour) scores a median 20 dB on checks and stripes, 25 dB on speckles, 18-41 dB on
  gradients (the direction may flip), 41 dB on plain ones (only the 1.5-level grain differs); shifted by one pixel,
  27 dB on checks, 24-41 on stripes (along them nothing moves), 29 on speckles, 31 on horizontal gradients. 28 dB
  (RMS 10 levels) lets a background drift by a few levels and rejects every re-drawn checked, striped or speckled
  texture and most one-pixel shifts of checks and stripes (a re-drawn plain background is no visible change).
- ``removal_psnr`` = 20 dB inside the removal mask: an untouched hole scores 6-13 dB (5-95 %), the hole filled
  with the mean colour of the ring around it a median 23.5 dB (5-95 %: 14-44), filled from another texture seed
  25 dB (18-42); 20 dB (RMS 25 levels) asks for the background's colour and roughly its tone, and never accepts a
  hole left as it was.
- The scenes model's VAE (final after its 10-minute stage) round-trips rendered scenes at 19.6 / 23.2 / 26.9 dB
  (min / median / max over 16 scenes; outside the objects 25.4 / 27.0 / 33.5): a perfect removal decoded by it
  scores ~25 dB in a background hole, 5 dB above ``removal_psnr``. The replace check compares two decoded images
  (source and edit), whose VAE losses mostly agree; re-check ``background_psnr`` on the trained model's dev split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffattn_bench.grammar import COLOURS, POSITION_CENTRES, POSITIONS, SHAPES
from diffattn_bench.scene_scoring import (
    DetectedObject,
    SceneReading,
    background_psnr,
    evaluate_scene,
    read_scene,
)
from diffattn_bench.scenes import (
    HELD_OUT,
    PATTERNS,
    SCENE_SIZES,
    Background,
    Scene,
    SceneObject,
    _clamped_centre,
    _object_phrase,
    object_masks,
    render,
    render_without,
    sample_scene,
)
from diffattn_bench.scoring import _dilate

__all__ = [
    "SPLITS",
    "TASKS",
    "EditCase",
    "DEFAULT",
    "EditThresholds",
    "Verdict",
    "attribute_strength",
    "case_seed",
    "check_consistency",
    "check_layout",
    "check_refine",
    "check_removal",
    "check_replace",
    "check_reweight",
    "main",
    "make_case",
    "make_cases",
    "measure_thresholds",
    "removal_mask",
    "rise_verdict",
    "scene_caption",
    "tasks_of",
    "wilson_interval",
]

#: The seed splits: ``dev`` for tuning, ``report`` for published numbers (disjoint seed ranges).
SPLITS: tuple[str, ...] = ("dev", "report")
_SPLIT_BASE = {"dev": 0, "report": 100_000_000}
#: Every task, in report order; a case's seed is ``split base + task number * _TASK_STRIDE + index``.
TASKS: tuple[str, ...] = (
    "replace/colour",
    "replace/shape",
    "replace/pattern",
    "refine/pattern",
    "refine/size",
    "reweight/pattern",
    "reweight/size",
    "consistency/place",
    "consistency/size",
    "removal",
    "layout",
    "inversion",
)
_TASK_STRIDE = 1_000_000
_LAYOUT_TRIES = 1000


def seed_in(split: str, task: str, index: int, tasks: Sequence[str]) -> int:
    """The seed of case ``index`` of ``task`` (one of ``tasks``, in report order) in ``split``: ``split base + task
    number * _TASK_STRIDE + index``, so the dev and report seed sets never meet (ShapesEdit and ShapesEdit-Video)."""
    if split not in _SPLIT_BASE:
        raise ValueError(f"unknown split {split!r}; use 'dev' (tuning) or 'report' (published numbers)")
    if task not in tasks:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(tasks)}")
    if not 0 <= index < _TASK_STRIDE:
        raise ValueError(f"case index must be in [0, {_TASK_STRIDE}), got {index}")
    return _SPLIT_BASE[split] + list(tasks).index(task) * _TASK_STRIDE + index


def case_seed(split: str, task: str, index: int) -> int:
    """The seed of case ``index`` of ``task`` in ``split`` (its scene, captions and the edit's noise)."""
    return seed_in(split, task, index, TASKS)


def select_tasks(names: Sequence[str], tasks: Sequence[str]) -> tuple[str, ...]:
    """Of ``tasks`` ("family/name" or "family"), those named by ``names`` (full names, families or ``all``), in the
    order of ``tasks``; an unknown name raises with the choices."""
    chosen = set()
    for name in names:
        matched = [t for t in tasks if name in (t, t.split("/")[0], "all")]
        if not matched:
            families = sorted({t.split("/")[0] for t in tasks})
            raise ValueError(f"unknown task {name!r}; use all, a family ({', '.join(families)}) or one of {tasks}")
        chosen.update(matched)
    return tuple(t for t in tasks if t in chosen)


def json_option(text: str, name: str) -> dict[str, Any]:
    """A command-line option ``--name`` given as a JSON object of keyword arguments; anything else exits with an
    example."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise SystemExit(f"--{name}: not JSON ({error}); e.g. --{name} '{{\"start_step\": 4}}'") from None
    if not isinstance(value, dict):
        raise SystemExit(f"--{name}: give a JSON object of keyword arguments, got {text!r}")
    return value


def tasks_of(names: Sequence[str]) -> tuple[str, ...]:
    """Task names from families or full names (``replace`` -> its three sub-tasks; ``all``), in report order."""
    return select_tasks(names, TASKS)


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditCase:
    """One seeded case. ``scene`` is the scene the source caption was made from (for rendered tasks the truth;
    for generated ones the noise decides what the caption leaves open); ``index`` the edited / removed object
    (-1: none); ``attribute`` the changed attribute, ``old`` -> ``new`` its words (``old`` None when a word is
    added); ``word`` the re-weighted word (``reweight``); ``subjects`` the layout's ((words, box), ...) with boxes
    (x0, y0, x1, y1) as fractions of the image."""

    task: str
    split: str
    seed: int
    scene: Scene
    source: str
    target: str
    index: int = -1
    attribute: str = ""
    old: str | None = None
    new: str | None = None
    word: str | None = None
    subjects: tuple[tuple[str, tuple[float, float, float, float]], ...] = ()

    def record(self) -> dict[str, object]:
        """What a result file keeps of the case (enough to re-run it: split, task, seed)."""
        out: dict[str, object] = {"task": self.task, "split": self.split, "seed": self.seed, "source": self.source}
        if self.target != self.source:
            out["target"] = self.target
        for name in ("attribute", "old", "new", "word"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        if self.subjects:
            out["subjects"] = [[w, list(b)] for w, b in self.subjects]
        return out


_NONE = {"position": False, "size": False, "pattern": False}


def scene_caption(scene: Scene, named: Sequence[Mapping[str, bool]] | None = None, background: bool = False) -> str:
    """The caption of ``scene`` naming, per object, what ``named[i]`` says (position / size / pattern; colour and
    shape always), in the grammar of :func:`diffattn_bench.scenes.caption`; ``named=None`` names nothing more."""
    named = [_NONE] * len(scene.objects) if named is None else list(named)
    if len(named) != len(scene.objects):
        raise ValueError(f"named has {len(named)} entries for {len(scene.objects)} objects; give one per object")
    phrases = [_object_phrase(o, {**_NONE, **n}) for o, n in zip(scene.objects, named)]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return text + (" " + scene.background.phrase if background else "")


def _with(scene: Scene, index: int, **changes: object) -> Scene:
    objects = list(scene.objects)
    objects[index] = dataclasses.replace(objects[index], **changes)
    return Scene(tuple(objects), scene.background)


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    if not options:
        raise ValueError("no option left to pick from")
    return str(options[int(rng.integers(len(options)))])


def _replace_case(task: str, split: str, seed: int, rng: np.random.Generator) -> EditCase:
    attribute = task.split("/")[1]
    scene = sample_scene(rng, "train")
    index = int(rng.integers(len(scene.objects)))
    obj = scene.objects[index]
    if attribute == "colour":
        used = {o.colour for o in scene.objects}
        pool = [c for c in COLOURS if c not in used]
    elif attribute == "shape":
        pool = [s for s in SHAPES if s != obj.shape]
    else:
        pool = [p for p in PATTERNS if p != obj.pattern]
    # a pattern the caption names must not make a combination the model never saw (scenes.HELD_OUT)
    pool = [v for v in pool if attribute != "pattern" or (obj.colour, obj.shape, v) not in HELD_OUT]
    new = _pick(rng, pool)
    named = [{"pattern": attribute == "pattern"}] * len(scene.objects)
    target = _with(scene, index, **{attribute: new})
    return EditCase(
        task,
        split,
        seed,
        scene,
        scene_caption(scene, named),
        scene_caption(target, named),
        index,
        attribute,
        getattr(obj, attribute),
        new,
    )


def _refine_case(task: str, split: str, seed: int, rng: np.random.Generator) -> EditCase:
    attribute = task.split("/")[1]
    scene = sample_scene(rng, "train")
    index = int(rng.integers(len(scene.objects)))
    obj = scene.objects[index]
    if attribute == "pattern":
        pool = [p for p in ("striped", "dotted") if (obj.colour, obj.shape, p) not in HELD_OUT]
    else:
        pool = list(SCENE_SIZES)
    new = _pick(rng, pool)
    target = _with(scene, index, **{attribute: new})
    named = [{attribute: i == index} for i in range(len(scene.objects))]
    return EditCase(
        task, split, seed, scene, scene_caption(scene), scene_caption(target, named), index, attribute, None, new
    )


def _reweight_case(task: str, split: str, seed: int, rng: np.random.Generator) -> EditCase:
    attribute = task.split("/")[1]
    scene = sample_scene(rng, "train", objects=1)
    obj = scene.objects[0]
    if attribute == "pattern":
        pool = [p for p in ("striped", "dotted") if (obj.colour, obj.shape, p) not in HELD_OUT]
        word = _pick(rng, pool)
    else:
        word = "large"
    scene = _with(scene, 0, **{attribute: word})
    text = scene_caption(scene, [{attribute: True}])
    return EditCase(task, split, seed, scene, text, text, 0, attribute, None, word, word)


def _consistency_case(task: str, split: str, seed: int, rng: np.random.Generator) -> EditCase:
    attribute = "position" if task.endswith("place") else "size"
    scene = sample_scene(rng, "train", objects=1)
    obj = scene.objects[0]
    if attribute == "position":
        new = _pick(rng, [p for p in POSITIONS if p != obj.position])
        target = _with(scene, 0, centre=POSITION_CENTRES[new])
        named = [{"position": True}]
        old = obj.position
    else:
        scene = _with(scene, 0, size="small")
        target = _with(scene, 0, size="large")
        named, old, new = [{"size": True}], "small", "large"
    return EditCase(
        task, split, seed, scene, scene_caption(scene, named), scene_caption(target, named), 0, attribute, old, new
    )


def _apart(a: np.ndarray, b: np.ndarray) -> bool:
    return not (_dilate(a, 2) & b).any()


def _removal_case(task: str, split: str, seed: int, rng: np.random.Generator) -> EditCase:
    for _ in range(_LAYOUT_TRIES):
        scene = sample_scene(rng, "train", objects=int(rng.choice((2, 3))))
        masks = object_masks(scene)
        free = [i for i, m in enumerate(masks) if all(_apart(m, o) for j, o in enumerate(masks) if j != i)]
        if free:
            index = free[int(rng.integers(len(free)))]
            full = scene_caption(scene, [{"position": True, "size": True, "pattern": True}] * len(scene.objects))
            kept = scene_caption(scene.without(index), [{"position": True}] * (len(scene.objects) - 1))
            return EditCase(task, split, seed, scene, full, kept, index, "removal")
    raise ValueError(f"seed {seed}: no scene with an object apart from the others in {_LAYOUT_TRIES} tries")


def _layout_case(task: str, split: str, seed: int, rng: np.random.Generator) -> EditCase:
    """Two small objects (0.22 of the image), each in its own box (side 0.26-0.34, boxes 0.05 apart). The caption
    names size, colour and shape only: the scenes model learnt to place objects without position words, so the
    prompt alone leaves the place to the noise, and the boxes alone decide it under bounded attention (a position
    word's cell could not hold a box off its nominal centre: cells are 0.3 wide)."""
    background = Background("flat", "black", int(rng.integers(2**31)))
    for _ in range(_LAYOUT_TRIES):
        sides = rng.uniform(0.26, 0.34, 2)
        centres = [rng.uniform(s / 2, 1 - s / 2, 2) for s in sides]
        boxes = [
            tuple(round(float(v), 4) for v in (c[0] - s / 2, c[1] - s / 2, c[0] + s / 2, c[1] + s / 2))
            for c, s in zip(centres, sides)
        ]
        a, b = boxes
        if not (a[2] + 0.05 <= b[0] or b[2] + 0.05 <= a[0] or a[3] + 0.05 <= b[1] or b[3] + 0.05 <= a[1]):
            continue
        colours = rng.choice(list(COLOURS), 2, replace=False)
        objects = []
        for j in range(2):
            shape = _pick(rng, SHAPES)
            pattern = _pick(rng, [p for p in PATTERNS if (str(colours[j]), shape, p) not in HELD_OUT])
            centre = _clamped_centre(shape, SCENE_SIZES["small"], float(centres[j][0]), float(centres[j][1]))
            objects.append(SceneObject(str(colours[j]), shape, "small", pattern, centre))
        scene = Scene(tuple(objects), background)
        text = scene_caption(scene, [{"size": True}] * 2)
        subjects = tuple((f"{o.colour} {o.shape}", box) for o, box in zip(objects, boxes))
        return EditCase(task, split, seed, scene, text, text, subjects=subjects)
    raise ValueError(f"seed {seed}: found no two apart boxes in {_LAYOUT_TRIES} tries")


def _inversion_case(task: str, split: str, seed: int, rng: np.random.Generator) -> EditCase:
    scene = sample_scene(rng, "train")
    text = scene_caption(scene, [{"position": True, "size": True, "pattern": True}] * len(scene.objects), True)
    return EditCase(task, split, seed, scene, text, text)


_MAKERS = {
    "replace": _replace_case,
    "refine": _refine_case,
    "reweight": _reweight_case,
    "consistency": _consistency_case,
    "removal": _removal_case,
    "layout": _layout_case,
    "inversion": _inversion_case,
}


def make_case(task: str, split: str, index: int) -> EditCase:
    """Case ``index`` of ``task`` in ``split`` (deterministic: a function of its seed only)."""
    seed = case_seed(split, task, index)
    return _MAKERS[task.split("/")[0]](task, split, seed, np.random.default_rng(seed))


def make_cases(task: str, split: str, count: int) -> list[EditCase]:
    """The first ``count`` cases of ``task`` in ``split``."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    return [make_case(task, split, i) for i in range(count)]


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditThresholds:
    """Pixel thresholds of the checks (64 x 64 images; see the module docstring for how they were set).

    - ``max_shift``: largest centroid move (px) of an object that should stay in place.
    - ``side_tolerance``: largest relative change of a kept object's fitted side.
    - ``background_psnr``: least PSNR (dB) between source and edit outside every object (dilated by ``rim`` px).
    - ``removal_psnr``: least PSNR (dB) inside the removal mask against the scene rendered without the object.
    - ``colour_tolerance``: largest per-channel difference (levels) of a kept object's bright colour.
    - ``rise_margin``: how much a re-weighted attribute's strength must exceed the unweighted image's (dark
      fraction of the object's inner pixels; fitted side as a fraction of the image).
    """

    max_shift: float = 3.0
    side_tolerance: float = 0.2
    background_psnr: float = 28.0
    removal_psnr: float = 20.0
    colour_tolerance: float = 24.0
    rim: int = 2
    rise_margin: Mapping[str, float] = field(
        default_factory=lambda: {"pattern": 0.03, "size": 0.01}, hash=False, compare=False
    )


DEFAULT = EditThresholds()


@dataclass(frozen=True)
class Verdict:
    """A check's outcome: ``ok`` and, when not, the reasons (short words, counted in the result file)."""

    failures: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.failures

    def __bool__(self) -> bool:
        return self.ok


def _shift(a: DetectedObject, b: DetectedObject, size: int) -> float:
    return math.hypot(a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]) * size


def _same_side(a: DetectedObject, b: DetectedObject, t: EditThresholds) -> bool:
    return a.size == b.size and abs(a.side - b.side) <= t.side_tolerance * a.side


def _found(reading: SceneReading, colour: str, shape: str | None = None) -> DetectedObject | None:
    found = reading.of_colour(colour)
    if shape is not None:
        found = [o for o in found if o.shape == shape] or found
    return found[0] if found else None


def _outside_psnr(source: np.ndarray, target: np.ndarray, readings: Sequence[SceneReading], rim: int) -> float:
    objects = np.zeros(source.shape[:2], bool)
    for r in readings:
        objects |= r.labels != 0
    keep = ~_dilate(objects, rim)
    return background_psnr(target, source, keep) if keep.any() else math.inf


def _read_pair(source: np.ndarray, target: np.ndarray, case: EditCase) -> tuple[SceneReading, SceneReading, list]:
    src, tgt = read_scene(source), read_scene(target)
    src_result = evaluate_scene(source, case.source, reading=src)
    return src, tgt, [o.found for o in src_result.objects]


def _others_kept(case: EditCase, tgt: SceneReading, found: Sequence, size: int, t: EditThresholds) -> list[str]:
    failures = []
    for i, before in enumerate(found):
        if i == case.index or before is None:
            continue
        after = _found(tgt, before.colour, before.shape)
        if after is None:
            failures.append("other_missing")
        elif after.shape != before.shape or after.pattern != before.pattern or not _same_side(before, after, t):
            failures.append("other_changed")
        elif _shift(before, after, size) > t.max_shift:
            failures.append("other_moved")
    return failures


def check_replace(
    source: np.ndarray, target: np.ndarray, case: EditCase, thresholds: EditThresholds = DEFAULT
) -> Verdict:
    """A word swap: the edited object shows the new word and keeps the source image's other attributes, centroid
    and side; the other objects keep colour, shape, pattern, side and place; the background outside all objects
    keeps ``background_psnr`` (see :class:`EditThresholds`)."""
    t = thresholds
    src, tgt, found = _read_pair(source, target, case)
    if any(f is None for f in found):
        return Verdict(("source_unreadable",))
    before = found[case.index]
    colour = case.new if case.attribute == "colour" else before.colour
    shape = case.new if case.attribute == "shape" else None
    after = _found(tgt, colour, shape)
    if after is None:
        return Verdict(("edited_missing",))
    failures = []
    want = {a: getattr(before, a) for a in ("shape", "pattern")}
    if case.attribute in want:
        want[case.attribute] = case.new
    if any(getattr(after, a) != v for a, v in want.items()):
        failures.append("edited_wrong")
    if not _same_side(before, after, t):
        failures.append("edited_resized")
    if _shift(before, after, source.shape[1]) > t.max_shift:
        failures.append("edited_moved")
    failures += _others_kept(case, tgt, found, source.shape[1], t)
    if _outside_psnr(source, target, (src, tgt), t.rim) < t.background_psnr:
        failures.append("background_changed")
    return Verdict(tuple(dict.fromkeys(failures)))


def check_refine(
    source: np.ndarray, target: np.ndarray, case: EditCase, thresholds: EditThresholds = DEFAULT
) -> Verdict:
    """An added word: the edited object shows it (its pattern, or its size word) and keeps colour, shape and place
    (centroid within ``max_shift`` px, plus half the side's growth for a size word); other objects are kept."""
    t = thresholds
    src, tgt, found = _read_pair(source, target, case)
    if any(f is None for f in found):
        return Verdict(("source_unreadable",))
    before = found[case.index]
    after = _found(tgt, before.colour, before.shape)
    if after is None:
        return Verdict(("edited_missing",))
    failures = []
    if getattr(after, case.attribute) != case.new:
        failures.append("word_missing")
    if after.shape != before.shape:
        failures.append("edited_wrong")
    size = source.shape[1]
    slack = t.max_shift + (abs(after.side - before.side) * size / 2 if case.attribute == "size" else 0.0)
    if _shift(before, after, size) > slack:
        failures.append("edited_moved")
    if case.attribute == "pattern" and not _same_side(before, after, t):
        failures.append("edited_resized")
    failures += _others_kept(case, tgt, found, size, t)
    return Verdict(tuple(dict.fromkeys(failures)))


def attribute_strength(image: np.ndarray, colour: str, attribute: str) -> float:
    """How strongly the object of ``colour`` shows ``attribute``: ``pattern`` -> the dark fraction of its inner
    pixels (0 for solid, ~0.3 for the renderer's stripes), ``size`` -> its fitted side (fraction of the image).
    nan when no object of that colour is read."""
    obj = _found(read_scene(image), colour)
    if obj is None:
        return math.nan
    if attribute == "pattern":
        return float(obj.pattern_features["dark_fraction"])
    if attribute == "size":
        return float(obj.side)
    raise ValueError(f"attribute_strength measures 'pattern' or 'size', got {attribute!r}")


def rise_verdict(before: float, after: float, attribute: str, thresholds: EditThresholds = DEFAULT) -> Verdict:
    """``after`` exceeds ``before`` (two :func:`attribute_strength` values) by the attribute's ``rise_margin``."""
    if math.isnan(before) or math.isnan(after):
        return Verdict(("unreadable",))
    return Verdict(() if after > before + thresholds.rise_margin[attribute] else ("no_rise",))


def check_reweight(
    unweighted: np.ndarray, weighted: np.ndarray, case: EditCase, thresholds: EditThresholds = DEFAULT
) -> Verdict:
    """The re-weighted attribute is stronger in ``weighted`` than in ``unweighted`` (the same noise and prompt) by
    ``rise_margin``; the object must be readable in both."""
    colour = case.scene.objects[case.index].colour
    before = attribute_strength(unweighted, colour, case.attribute)
    return rise_verdict(before, attribute_strength(weighted, colour, case.attribute), case.attribute, thresholds)


def _bright_colour(image: np.ndarray, obj: DetectedObject) -> np.ndarray:
    """The median RGB of the brightest quarter of the object's inner pixels (1 px in from its rim, where the
    background mixes in): its colour, not its pattern's dark tone, which can cover half of a small striped object."""
    inner = _dilate(~obj.mask, 1)
    inner = obj.mask & ~inner if (obj.mask & ~inner).sum() >= 8 else obj.mask
    pixels = np.asarray(image, np.float64)[inner]
    bright = pixels.sum(axis=1)
    return np.median(pixels[bright >= np.percentile(bright, 75)], axis=0)


def check_consistency(
    source: np.ndarray, target: np.ndarray, case: EditCase, thresholds: EditThresholds = DEFAULT
) -> Verdict:
    """The object at its new place (or new size) with the source image's pattern, colour shade (within
    ``colour_tolerance``) and, for a place change, size (word and side within ``side_tolerance``)."""
    t = thresholds
    src = evaluate_scene(source, case.source)
    tgt = evaluate_scene(target, case.target)
    before, after = src.objects[0].found, tgt.objects[0].found
    if before is None:
        return Verdict(("source_unreadable",))
    if after is None:
        return Verdict(("missing",))
    failures = []
    if not tgt.objects[0].checks().get(case.attribute, False):
        failures.append("place" if case.attribute == "position" else "size")
    if after.pattern != before.pattern:
        failures.append("pattern")
    if np.abs(_bright_colour(source, before) - _bright_colour(target, after)).max() > t.colour_tolerance:
        failures.append("colour")
    if case.attribute == "position" and not _same_side(before, after, t):
        failures.append("size_changed")
    return Verdict(tuple(failures))


def removal_mask(case: EditCase, rim: int = 1) -> np.ndarray:
    """The removal case's mask: the removed object's pixels dilated by ``rim`` px (it touches no other object)."""
    return _dilate(object_masks(case.scene)[case.index], rim)


def check_removal(
    output: np.ndarray, case: EditCase, thresholds: EditThresholds = DEFAULT, mask: np.ndarray | None = None
) -> Verdict:
    """PSNR inside the mask against the scene rendered without the object >= ``removal_psnr``, and every other
    object read with its colour and shape within ``max_shift`` px of its true centre."""
    t = thresholds
    mask = removal_mask(case) if mask is None else mask
    failures = []
    if background_psnr(output, render_without(case.scene, case.index), mask) < t.removal_psnr:
        failures.append("hole")
    reading = read_scene(output)
    size = output.shape[1]
    for i, obj in enumerate(case.scene.objects):
        if i == case.index:
            continue
        found = _found(reading, obj.colour, obj.shape)
        if found is None or found.shape != obj.shape:
            failures.append("other_missing")
        elif math.hypot(found.centre[0] - obj.centre[0], found.centre[1] - obj.centre[1]) * size > t.max_shift:
            failures.append("other_moved")
    return Verdict(tuple(dict.fromkeys(failures)))


def check_layout(image: np.ndarray, case: EditCase) -> Verdict:
    """Both objects found with their colour and shape, each centroid inside its box, no extra object."""
    result = evaluate_scene(image, case.source)
    failures = []
    for obj, (_, (x0, y0, x1, y1)) in zip(result.objects, case.subjects):
        if obj.found is None:
            failures.append("missing")
        elif not obj.shape_correct:
            failures.append("shape")
        elif not (x0 <= obj.found.centre[0] <= x1 and y0 <= obj.found.centre[1] <= y1):
            failures.append("outside_box")
    if result.extra:
        failures.append("extra")
    return Verdict(tuple(dict.fromkeys(failures)))


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (low, high) of a success rate (z = 1.96: 95 %); (0, 1) for n = 0."""
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


# --------------------------------------------------------------------------------------------
# Threshold measurements on rendered data
# --------------------------------------------------------------------------------------------


def _percentiles(values: Sequence[float]) -> str:
    return " ".join(f"{v:5.1f}" for v in np.percentile(values, [5, 25, 50, 75, 95]))


def measure_thresholds(n: int = 200) -> dict[str, dict[str, list[float]]]:
    """PSNR (dB) on rendered scenes behind ``background_psnr`` and ``removal_psnr``: per background kind, a
    re-drawn texture (same kind and colour, another seed) and the same one shifted by 1 px, over the background
    outside the objects; inside removal masks, the hole left untouched, filled with the surrounding ring's mean
    colour, and filled from another texture seed."""
    out: dict[str, dict[str, list[float]]] = {"outside": {}, "hole": {"untouched": [], "ring_mean": [], "reseed": []}}
    for s in range(n):
        scene = sample_scene(np.random.default_rng(s), objects=2)
        image = render(scene)
        outside = ~_dilate(np.logical_or.reduce(object_masks(scene)), 2)
        redrawn = render(dataclasses.replace(scene, background=dataclasses.replace(scene.background, seed=s + 1)))
        kind = out["outside"].setdefault(scene.background.kind, [])
        kind.append(background_psnr(redrawn, image, outside))
        out["outside"].setdefault(f"{scene.background.kind} shifted", []).append(
            background_psnr(np.roll(image, 1, axis=1), image, outside)
        )
        mask = _dilate(object_masks(scene)[0], 1)
        clean = render_without(scene, 0)
        ring = _dilate(mask, 2) & ~mask
        fill = image.copy()
        fill[mask] = np.rint(image[ring].mean(axis=0)).astype(np.uint8)
        out["hole"]["untouched"].append(background_psnr(image, clean, mask))
        out["hole"]["ring_mean"].append(background_psnr(fill, clean, mask))
        out["hole"]["reseed"].append(
            background_psnr(
                render_without(
                    dataclasses.replace(scene, background=dataclasses.replace(scene.background, seed=s + 1)), 0
                ),
                clean,
                mask,
            )
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m diffattn_bench.shapes_edit [--n N]``: the rendered-data PSNR behind the thresholds."""
    parser = argparse.ArgumentParser(prog="python -m diffattn_bench.shapes_edit", description=main.__doc__)
    parser.add_argument("--n", type=int, default=200, help="rendered scenes (default 200)")
    args = parser.parse_args(argv)
    report = measure_thresholds(args.n)
    sys.stdout.write(f"PSNR dB percentiles 5 25 50 75 95 over {args.n} rendered scenes\n")
    for group, rows in report.items():
        for name, values in sorted(rows.items()):
            sys.stdout.write(f"  {group:8s} {name:20s} {_percentiles(values)}  (n={len(values)})\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
