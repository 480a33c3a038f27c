"""ShapesEdit-Video: seeded editing cases on the embedded video model (:mod:`diffattn_bench.shapes_video`) and their
pixel checks, read frame by frame with ShapesBench (:func:`diffattn_bench.scoring.evaluate_video`).

The cases and the checks live here (the model runs in ``scripts/eval_editing_video.py``), so tests exercise every
check on rendered clips (:func:`diffattn_bench.render.render_video`). A case is a pure function of ``(split, task,
index)``: its seed is :func:`case_seed`, the dev and report splits use disjoint seed ranges, and the same seed is the
edit's noise seed. Captions are the video model's (``"a red circle on the left moving up and ..."``; no size words,
as in its training data, so the noise decides each object's size).

Tasks (``TASKS``):

- ``replace/colour``, ``replace/shape``: two moving objects; ONE object's colour (to a colour neither object has) or
  shape word changes. :func:`check_replace`, per clip: the edited object shows the new colour (found in at least
  ``frame_share`` of the frames; a colour edit must also keep the source's shape, :func:`shape_gap` within
  ``shape_margin``, and leave the old colour in fewer than ``1 - frame_share`` of them) or the new shape (classified so
  in ``frame_share`` of the
  frames); its centroid path stays within ``max_shift`` of the source clip's (mean over frames); the other object is
  found in ``frame_share`` of the frames with the source's shape (``shape_margin``) and within ``max_shift`` of its
  source path. A shape edit counts only when the source shows the old shape (in ``frame_share`` of the frames, else
  ``source_shape_wrong`` for both arms): the model draws most prompted triangles and squares of a 32 px frame as
  round blobs, and an edit from a blob read as a circle to "circle" would pass without changing anything.
- ``consistency/motion``: one object whose motion word changes ("moving up" -> "moving right"; the position word, so
  the mean place, stays). MasaCtrl's use: a new motion, the same object. :func:`check_consistency`: the target
  follows its new motion (ShapesBench trajectory error below ``trajectory_error`` and its position right) and keeps
  the source's shape (``shape_margin``), size (side within ``side_tolerance``) and colour
  shade (within ``colour_tolerance`` levels). The grammar has no other attribute to keep: colour and shape are
  named by the prompt, size is not (so it is the noise's, and the edit must keep it).

Every case fits a clip of 8 frames at 32 x 32 px (:func:`diffattn_bench.render.video_problem`), and so every larger
frame (objects and motions scale with the frame); :func:`case_problem` says whether it fits another clip.
Thresholds (:class:`VideoEditThresholds`) and why: ``python -m diffattn_bench.video_edit`` prints the rendered-data
numbers behind them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from diffattn_bench.grammar import COLOURS, MOTION_DIRECTIONS, SHAPES, Motion, Scene, caption
from diffattn_bench.render import random_video_scene, render_video, video_problem
from diffattn_bench.scoring import Component, VideoResult, evaluate_video
from diffattn_bench.shapes_edit import Verdict, seed_in, select_tasks, wilson_interval

__all__ = [
    "CASE_CLIP",
    "DEFAULT",
    "SPLITS",
    "TASKS",
    "VideoEditCase",
    "VideoEditThresholds",
    "Verdict",
    "case_problem",
    "check",
    "case_seed",
    "check_consistency",
    "check_replace",
    "main",
    "make_case",
    "make_cases",
    "measure_thresholds",
    "object_track",
    "shape_gap",
    "shape_scores",
    "render_case",
    "tasks_of",
    "wilson_interval",
]

#: The seed splits: ``dev`` for tuning, ``report`` for published numbers (disjoint seed ranges).
SPLITS: tuple[str, ...] = ("dev", "report")
#: Every task, in report order; a case's seed is :func:`~diffattn_bench.shapes_edit.seed_in`'s.
TASKS: tuple[str, ...] = ("replace/colour", "replace/shape", "consistency/motion")
#: The clip every case fits: (frames, height, width).
CASE_CLIP: tuple[int, int, int] = (8, 32, 32)
_TRIES = 200
#: See VideoEditThresholds.shape_margin.
SHAPE_MARGIN = 0.05


def case_seed(split: str, task: str, index: int) -> int:
    """The seed of case ``index`` of ``task`` in ``split`` (its scene, motions, the edit and the edit's noise)."""
    return seed_in(split, task, index, TASKS)


def tasks_of(names: Sequence[str]) -> tuple[str, ...]:
    """Task names from families or full names (``replace`` -> both replace tasks; ``all``), in report order."""
    return select_tasks(names, TASKS)


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoEditCase:
    """One seeded case: the source clip's ``scene`` and ``motions`` (one per object), the target's
    (``target_scene``, ``target_motions``: the edit's truth), their captions, the edited object ``index``, the
    changed ``attribute`` (``colour`` / ``shape`` / ``motion``) and its words ``old`` -> ``new``."""

    task: str
    split: str
    seed: int
    scene: Scene
    motions: tuple[Motion | None, ...]
    target_scene: Scene
    target_motions: tuple[Motion | None, ...]
    source: str
    target: str
    index: int
    attribute: str
    old: str
    new: str

    def record(self) -> dict[str, object]:
        """What a result file keeps of the case (enough to re-run it: split, task, seed)."""
        return {
            "task": self.task,
            "split": self.split,
            "seed": self.seed,
            "source": self.source,
            "target": self.target,
            "index": self.index,
            "attribute": self.attribute,
            "old": self.old,
            "new": self.new,
        }


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    if not options:
        raise ValueError("no option left to pick from")
    return str(options[int(rng.integers(len(options)))])


def _with(scene: Scene, index: int, **changes: str) -> Scene:
    objects = list(scene.objects)
    objects[index] = dataclasses.replace(objects[index], **changes)
    return Scene(tuple(objects), scene.background)


def _motion_word(motion: Motion | None) -> str:
    return "still" if motion is None else motion.phrase.removeprefix("moving ")


def _all_motions() -> tuple[Motion, ...]:
    return (*(Motion("linear", d) for d in MOTION_DIRECTIONS), Motion("circular"))


def _fits(scene: Scene, motions: Sequence[Motion | None]) -> bool:
    frames, height, width = CASE_CLIP
    return video_problem(scene, motions, frames, (height, width)) is None


def _replace_case(task: str, split: str, seed: int, rng: np.random.Generator) -> VideoEditCase:
    attribute = task.split("/")[1]
    frames, height, width = CASE_CLIP
    for _ in range(_TRIES):
        scene, motions = random_video_scene(rng, 2, min_objects=2, frames=frames, size=(height, width))
        index = int(rng.integers(2))
        obj = scene.objects[index]
        if attribute == "colour":
            pool = [c for c in COLOURS if c not in {o.colour for o in scene.objects}]
        else:
            pool = [s for s in SHAPES if s != obj.shape]
        new = _pick(rng, pool)
        target = _with(scene, index, **{attribute: new})
        if _fits(target, motions):  # a new shape has another extent (a triangle's centroid is low in its box)
            old = getattr(obj, attribute)
            return VideoEditCase(
                task,
                split,
                seed,
                scene,
                motions,
                target,
                motions,
                caption(scene, motions=motions),
                caption(target, motions=motions),
                index,
                attribute,
                old,
                new,
            )
    raise ValueError(f"seed {seed}: no {task} edit that fits a {CASE_CLIP} clip in {_TRIES} tries")


def _consistency_case(task: str, split: str, seed: int, rng: np.random.Generator) -> VideoEditCase:
    frames, height, width = CASE_CLIP
    for _ in range(_TRIES):
        scene, motions = random_video_scene(rng, 1, frames=frames, size=(height, width))
        pool = [m for m in _all_motions() if m != motions[0] and _fits(scene, (m,))]
        if not pool:
            continue
        new = pool[int(rng.integers(len(pool)))]
        return VideoEditCase(
            task,
            split,
            seed,
            scene,
            motions,
            scene,
            (new,),
            caption(scene, motions=motions),
            caption(scene, motions=(new,)),
            0,
            "motion",
            _motion_word(motions[0]),
            _motion_word(new),
        )
    raise ValueError(f"seed {seed}: no motion change that fits a {CASE_CLIP} clip in {_TRIES} tries")


_MAKERS = {"replace": _replace_case, "consistency": _consistency_case}


def make_case(task: str, split: str, index: int) -> VideoEditCase:
    """Case ``index`` of ``task`` in ``split`` (deterministic: a function of its seed only)."""
    seed = case_seed(split, task, index)
    return _MAKERS[task.split("/")[0]](task, split, seed, np.random.default_rng(seed))


def make_cases(task: str, split: str, count: int, start: int = 0) -> list[VideoEditCase]:
    """Cases ``start .. start + count - 1`` of ``task`` in ``split``."""
    if count < 1 or start < 0:
        raise ValueError(f"need count >= 1 and start >= 0, got {count} and {start}")
    return [make_case(task, split, start + i) for i in range(count)]


def case_problem(case: VideoEditCase, frames: int, height: int, width: int) -> str | None:
    """Why the case's source or target clip does not fit ``frames`` x ``height`` x ``width`` (None: it fits)."""
    for name, scene, motions in (
        ("source", case.scene, case.motions),
        ("target", case.target_scene, case.target_motions),
    ):
        problem = video_problem(scene, motions, frames, (height, width))
        if problem:
            return f"the {name} clip of {case.task} seed {case.seed}: {problem}"
    return None


def render_case(
    case: VideoEditCase, frames: int = CASE_CLIP[0], size: int = CASE_CLIP[1], seed: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The case's source and target clips rendered from their truth with the same renderer seed (same background,
    colour jitter and object offsets): a perfect edit, what the checks must accept."""
    seed = case.seed if seed is None else seed
    source, _ = render_video(case.scene, case.motions, frames, size, rng=seed)
    target, _ = render_video(case.target_scene, case.target_motions, frames, size, rng=seed)
    return source, target


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoEditThresholds:
    """Pixel thresholds of the checks (clips of any frame size; see :func:`measure_thresholds` for the numbers).

    - ``frame_share``: least share of frames in which an object must be found (and show what it must show); 0.75 is
      6 of 8 frames, so a clip may lose an object or misread its shape in 2.
    - ``max_shift``: largest mean distance (fraction of the frame side) between an object's centroid in the edit and
      in the source, frame by frame. Measured on 8 x 32 x 32 clips (``--n 100``): rendered again with an independent
      offset (the renderer's jitter, up to 0.04 per axis) an object moves a median 0.039 (5-95 %: 0.012-0.072);
      with its linear motion reversed 0.136-0.138. 0.06 (2 px at 32 px, 4 at 64) keeps a path an edit left in place
      and rejects a reversed one and most independent re-placements (a third of them stay within it).
    - ``side_tolerance``: largest relative change of an object's side (root of its mean area over the frames). The
      same size re-rendered: median 0.017 (95 %: 0.074); the next size word: 0.132-0.240 (5-95 %).
    - ``shape_margin``: a kept shape is one that fits the edited clip's object within this much of its best fit
      (:func:`shape_gap`: clip means of ShapesBench's template IoU). Whole-clip fits rather than a per-frame vote:
      the model's objects are blobs between a circle and a square whose per-frame reading flickers, in the source
      and its edit alike (the dev run's colour edits failed a 75 %-of-frames vote on visibly unchanged blobs).
      Rendered again, an object's gap is 0 (every case); drawn with another shape, 0.136-0.304 (5-95 %).
    - ``trajectory_error``: ShapesBench's pass bar for following a prompted motion (the model card's).
    - ``colour_tolerance``: largest per-channel difference (levels) of an object's median colour (the renderer's
      jitter is +-8 per channel, so two renders differ by <= 16 plus rim pixels).
    """

    frame_share: float = 0.75
    max_shift: float = 0.06
    shape_margin: float = SHAPE_MARGIN
    side_tolerance: float = 0.1
    trajectory_error: float = 0.04
    colour_tolerance: float = 24.0

    def __post_init__(self) -> None:
        if not 0.0 < self.frame_share <= 1.0:
            raise ValueError(f"frame_share is a share of frames in (0, 1], got {self.frame_share}")
        for name in ("max_shift", "side_tolerance", "trajectory_error", "colour_tolerance"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


DEFAULT = VideoEditThresholds()

Track = tuple[Component | None, ...]


def object_track(result: VideoResult, index: int) -> Track:
    """Object ``index`` of the prompt per frame: the component ShapesBench matched to it (None: not found)."""
    return tuple(frame.objects[index].component for frame in result.frames)


def _share(flags: Sequence[bool]) -> float:
    return float(np.mean(flags)) if len(flags) else 0.0


def _found(track: Track) -> float:
    return _share([c is not None for c in track])


def _both(a: Track, b: Track) -> list[tuple[Component, Component]]:
    return [(x, y) for x, y in zip(a, b) if x is not None and y is not None]


def _mean_shift(a: Track, b: Track, shape: tuple[int, int]) -> float:
    """Mean centroid distance over the frames where both tracks have the object, in fractions of the shorter side."""
    h, w = shape
    pairs = _both(a, b)
    if not pairs:
        return math.inf
    px = [math.hypot((x.centroid[0] - y.centroid[0]) * w, (x.centroid[1] - y.centroid[1]) * h) for x, y in pairs]
    return float(np.mean(px)) / min(h, w)


def shape_scores(track: Track) -> dict[str, float]:
    """The object's fit to each shape over the clip: ShapesBench's per-frame template IoU (``Component.shape_iou``)
    averaged over the frames where it is found."""
    found = [c for c in track if c is not None]
    if not found:
        raise ValueError("shape_scores: the object is found in no frame")
    return {s: float(np.mean([c.shape_iou[s] for c in found])) for s in SHAPES}


def shape_gap(before: Track, after: Track) -> float:
    """How much worse the source's shape (its best fit over the clip) fits the object in ``after`` than the shape
    that fits it best there (0: the same shape reads best in both)."""
    kept = max((scores := shape_scores(before)), key=scores.__getitem__)
    scores = shape_scores(after)
    return max(scores.values()) - scores[kept]


def _side(track: Track) -> float:
    areas = [c.area for c in track if c is not None]
    return math.sqrt(float(np.mean(areas))) if areas else math.nan


def _median_colour(clip: np.ndarray, track: Track) -> np.ndarray:
    pixels = np.concatenate([frame[c.mask] for frame, c in zip(clip, track) if c is not None])
    return np.median(pixels.astype(np.float64), axis=0)


def _read(clip: np.ndarray, prompt: str) -> VideoResult:
    clip = np.asarray(clip)
    if clip.ndim != 4 or clip.dtype != np.uint8:
        raise ValueError(f"a clip is a T x H x W x 3 uint8 array, got {clip.dtype} {clip.shape}")
    return evaluate_video(clip, prompt)


def check_replace(
    source: np.ndarray, target: np.ndarray, case: VideoEditCase, thresholds: VideoEditThresholds = DEFAULT
) -> Verdict:
    """A colour or shape swap on one of two moving objects (see the module docstring): the edited object shows the
    new word in ``frame_share`` of the frames and keeps its path; the other object keeps shape and path."""
    t = thresholds
    shape = source.shape[1:3]
    src, tgt = _read(source, case.source), _read(target, case.target)
    before = [object_track(src, i) for i in range(len(case.scene.objects))]
    if any(_found(tr) < t.frame_share for tr in before):
        return Verdict(("source_unreadable",))
    old_shown = _share([c is not None and c.shape == case.old for c in before[case.index]])
    if case.attribute == "shape" and old_shown < t.frame_share:
        return Verdict(("source_shape_wrong",))  # the edit would change nothing, or pass without changing anything
    after = [object_track(tgt, i) for i in range(len(case.scene.objects))]
    failures = []
    edited, kept = after[case.index], before[case.index]
    if _found(edited) < t.frame_share:
        failures.append("edited_missing")
    else:
        shown = _share([c is not None and c.shape == case.new for c in edited])
        if case.attribute == "shape" and shown < t.frame_share:
            failures.append("edited_wrong")
        if case.attribute == "colour" and shape_gap(kept, edited) > t.shape_margin:
            failures.append("edited_reshaped")
        if _mean_shift(kept, edited, shape) > t.max_shift:
            failures.append("edited_moved")
    if case.attribute == "colour" and _share([case.old in f.extra for f in tgt.frames]) > 1 - t.frame_share:
        failures.append("old_colour_left")
    for i, (a, b) in enumerate(zip(before, after)):
        if i == case.index:
            continue
        if _found(b) < t.frame_share:
            failures.append("other_missing")
        elif shape_gap(a, b) > t.shape_margin:
            failures.append("other_changed")
        elif _mean_shift(a, b, shape) > t.max_shift:
            failures.append("other_moved")
    return Verdict(tuple(dict.fromkeys(failures)))


def check_consistency(
    source: np.ndarray, target: np.ndarray, case: VideoEditCase, thresholds: VideoEditThresholds = DEFAULT
) -> Verdict:
    """A new motion for the same object: the target follows it (trajectory error below ``trajectory_error``, its
    position right) with the source's shape (per frame), side and colour shade."""
    t = thresholds
    src, tgt = _read(source, case.source), _read(target, case.target)
    before, after = object_track(src, case.index), object_track(tgt, case.index)
    if _found(before) < t.frame_share:
        return Verdict(("source_unreadable",))
    if _found(after) < t.frame_share:
        return Verdict(("missing",))
    failures = []
    error = tgt.object_errors[case.index]
    if not (error < t.trajectory_error and tgt.positions_correct[case.index]):
        failures.append("motion")
    if shape_gap(before, after) > t.shape_margin:
        failures.append("shape_changed")
    if abs(_side(after) / _side(before) - 1.0) > t.side_tolerance:
        failures.append("size_changed")
    if np.abs(_median_colour(source, before) - _median_colour(target, after)).max() > t.colour_tolerance:
        failures.append("colour_changed")
    return Verdict(tuple(failures))


CHECKS = {"replace": check_replace, "consistency": check_consistency}


def check(
    source: np.ndarray, target: np.ndarray, case: VideoEditCase, thresholds: VideoEditThresholds = DEFAULT
) -> Verdict:
    """The case's task's check."""
    return CHECKS[case.task.split("/")[0]](source, target, case, thresholds)


# --------------------------------------------------------------------------------------------
# Threshold measurements on rendered data
# --------------------------------------------------------------------------------------------


def measure_thresholds(n: int = 100, frames: int = CASE_CLIP[0], size: int = CASE_CLIP[1]) -> dict[str, list[float]]:
    """Rendered-clip numbers behind :class:`VideoEditThresholds`, over the first ``n`` dev cases of each replace task
    and of the consistency task: an object's mean centroid shift when the clip is rendered again with another seed
    (another jitter offset) and when the edited object's linear motion is reversed; its relative side change when
    rendered again, and when its size word is the next one."""
    out: dict[str, list[float]] = {
        "shift_rerendered": [],
        "shift_reversed": [],
        "side_rerendered": [],
        "side_next": [],
        "shape_gap_rerendered": [],
        "shape_gap_other_shape": [],
    }
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    bigger = {"small": "medium", "medium": "large", "large": "medium"}
    for i in range(n):
        case = make_case("replace/colour", "dev", i)
        first, _ = render_video(case.scene, case.motions, frames, size, rng=(i, 1))
        again, _ = render_video(case.scene, case.motions, frames, size, rng=(i, 2))
        a, b = _read(first, case.source), _read(again, case.source)
        for k in range(len(case.scene.objects)):
            out["shift_rerendered"].append(_mean_shift(object_track(a, k), object_track(b, k), first.shape[1:3]))
        motion = case.motions[case.index]
        if motion is not None and motion.kind == "linear":
            reversed_ = list(case.motions)
            reversed_[case.index] = Motion("linear", opposite[motion.direction])
            if video_problem(case.scene, reversed_, frames, size) is None:
                moved, _ = render_video(case.scene, reversed_, frames, size, rng=(i, 1))
                c = _read(moved, caption(case.scene, motions=tuple(reversed_)))
                out["shift_reversed"].append(
                    _mean_shift(object_track(a, case.index), object_track(c, case.index), first.shape[1:3])
                )
        one = make_case("consistency/motion", "dev", i)
        x, _ = render_video(one.scene, one.motions, frames, size, rng=(i, 1))
        y, _ = render_video(one.scene, one.motions, frames, size, rng=(i, 2))
        first_track, again_track = object_track(_read(x, one.source), 0), object_track(_read(y, one.source), 0)
        side = _side(first_track)
        out["side_rerendered"].append(abs(_side(again_track) / side - 1))
        out["shape_gap_rerendered"].append(shape_gap(first_track, again_track))
        for other in SHAPES:
            reshaped = _with(one.scene, 0, shape=other)
            if other != one.scene.objects[0].shape and video_problem(reshaped, one.motions, frames, size) is None:
                w, _ = render_video(reshaped, one.motions, frames, size, rng=(i, 1))
                out["shape_gap_other_shape"].append(shape_gap(first_track, object_track(_read(w, one.source), 0)))
        grown = _with(one.scene, 0, size=bigger[one.scene.objects[0].size])
        if video_problem(grown, one.motions, frames, size) is None:
            z, _ = render_video(grown, one.motions, frames, size, rng=(i, 1))
            out["side_next"].append(abs(_side(object_track(_read(z, one.source), 0)) / side - 1))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m diffattn_bench.video_edit [--n N]``: the rendered-clip numbers behind the thresholds."""
    parser = argparse.ArgumentParser(prog="python -m diffattn_bench.video_edit", description=main.__doc__)
    parser.add_argument("--n", type=int, default=100, help="cases per measurement (default 100)")
    parser.add_argument("--frames", type=int, default=CASE_CLIP[0])
    parser.add_argument("--size", type=int, default=CASE_CLIP[1])
    args = parser.parse_args(argv)
    report = measure_thresholds(args.n, args.frames, args.size)
    sys.stdout.write(f"percentiles 5 25 50 75 95 over rendered {args.frames} x {args.size} x {args.size} clips\n")
    for name, values in report.items():
        finite = [v for v in values if math.isfinite(v)]
        cells = " ".join(f"{v:6.3f}" for v in np.percentile(finite, [5, 25, 50, 75, 95])) if finite else "-"
        sys.stdout.write(f"  {name:18s} {cells}  (n={len(finite)}, not found {len(values) - len(finite)})\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
