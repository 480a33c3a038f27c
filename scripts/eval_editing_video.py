"""ShapesEdit-Video: editing on the embedded video model (a Wan transformer), each method beside its plain baseline in
one run, success read from pixels frame by frame (ShapesBench), Wilson 95 % intervals.

    python scripts/eval_editing_video.py --split dev --cases 3                  # smoke run, every task
    python scripts/eval_editing_video.py --split report --cases 40 --grid outputs/eval_editing_video/grid.png
    python scripts/eval_editing_video.py --split dev --tasks replace/colour --start 7 --cases 1   # re-run a case
    python scripts/eval_editing_video.py --split dev --cases 5 --list       # the cases and seeds, no model

Cases, seeds and the pixel checks are in :mod:`diffattn_bench.video_edit` (``--split dev`` for tuning, ``--split
report`` for published numbers; disjoint seeds; a case's seed is also its noise seed). Per task, the method against
the target prompt alone from the same noise (``diffattn.editing.edit(..., method=None)``):

- ``replace/colour``, ``replace/shape``: :class:`diffattn.PromptToPrompt` word swap on one of two moving objects
  (issue #28: >= 90 % of clips). The model reads a prompted shape right in only ~58 % of object-frames (model card),
  so shape edits are bounded by the model, colour edits are not.
- ``consistency/motion``: :class:`diffattn.MutualSelfAttention` (MasaCtrl) with the object's motion word changed;
  it must keep the source's shape, size and shade.

Clips are 8 frames x 32 x 32 px by default: the size the model trained at most (the first 55 % of its training,
2,750 of its 3,512 steps) and one of its six training sizes; there it scores 0.030 trajectory error and 97 %
positions. Prompt-to-Prompt's self-attention injection acts on layers of at most ``self_max_tokens`` queries (the
authors' 16 x 16 on SD); every layer of this transformer sees the whole clip (512 tokens at 8 x 32 x 32), so the
default here raises it to 4096 to let it act.

Time: on this 2-core Xeon (AMX), one thread, an edit at 8 x 32 x 32 and 25 steps costs 3.6 s CPU with
Prompt-to-Prompt, 2.6 s with MasaCtrl and 2.4-2.6 s plain; the dev run (3 cases x 3 tasks x 2 arms, checks
included) took 55 s CPU, so the report run (40 cases) is about 12 minutes on one core. At 8 x 64 x 64 an edit costs
7-8x as much (30.6 s / 17.8 s CPU, Prompt-to-Prompt / plain) and the model still drew the dev cases' triangles as
round blobs, so 32 px stays the default.

What the dev split showed (3 cases per task; numbers, not a tuning): colour swaps keep the object's path and the
other object (the plain target prompt from the same noise moves or loses the object); every shape case failed for
both arms with ``source_shape_wrong`` (the source's triangle is read as a circle in most frames); MasaCtrl copies the
source's motion along with its look: with ``start_step`` 4, 10 and 16 the target followed the source's path in 3 of
3 cases (a target query reads the source's keys at its own place: the model's keys carry their position through the
coordinate channels), at 20 it moved in 1 of 3 but lost the shade in 2.

Writes ``OUT/eval_editing_video_<split>.json`` (settings, per task the rates, intervals, failure counts and every case
with its seed) and prints: task | method % [95 % CI] | baseline % [95 % CI] | seconds per edit (wall, and CPU time
of this process, which a busy machine does not inflate).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

import diffattn
from diffattn.editing import edit
from diffattn_bench.embedded import VIDEO_MODEL_DIR, load_video_pipeline
from diffattn_bench.shapes_edit import json_option
from diffattn_bench.video_edit import (
    DEFAULT,
    SPLITS,
    TASKS,
    VideoEditCase,
    VideoEditThresholds,
    case_problem,
    check,
    make_case,
    tasks_of,
    wilson_interval,
)

#: The benchmark's standard step count for this model, its CLI guidance scale, and the default clip.
STEPS, GUIDANCE = 25, 4.0
FRAMES, HEIGHT, WIDTH = 8, 32, 32
EXAMPLES = 2  # cases per task in the picture
OUT = Path("outputs/eval_editing_video")


@dataclass(frozen=True)
class Settings:
    """One evaluation run: the split, case indices ``start .. start + cases - 1`` per task, the pipeline call (steps,
    guidance, clip size; given to every call) and the methods' options."""

    split: str
    cases: int
    start: int = 0
    steps: int = STEPS
    guidance: float = GUIDANCE
    frames: int = FRAMES
    height: int = HEIGHT
    width: int = WIDTH
    p2p: Mapping[str, Any] = field(
        default_factory=lambda: {"cross_replace": 0.8, "self_replace": 0.4, "self_max_tokens": 4096}
    )
    masactrl: Mapping[str, Any] = field(default_factory=lambda: {"start_step": 4})
    thresholds: VideoEditThresholds = DEFAULT

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}; use 'dev' (tuning) or 'report' (published numbers)")
        if self.cases < 1 or self.start < 0 or self.steps < 1 or self.frames < 2:
            raise ValueError(
                f"need cases >= 1, start >= 0, steps >= 1, frames >= 2; got {self.cases}, {self.start}, "
                f"{self.steps}, {self.frames}"
            )

    def call(self) -> dict[str, Any]:
        """The pipeline call's keyword arguments every clip shares."""
        return {
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance,
            "num_frames": self.frames,
            "height": self.height,
            "width": self.width,
        }

    def method(self, task: str) -> Any:
        if task.startswith("consistency"):
            return diffattn.MutualSelfAttention(**self.masactrl)
        return diffattn.PromptToPrompt(**self.p2p)

    def record(self) -> dict[str, Any]:
        return asdict(self)


def _uint8(clip: np.ndarray) -> np.ndarray:
    return (np.clip(clip, 0.0, 1.0) * 255).round().astype(np.uint8)


@dataclass
class _Run:
    """What one task collects: per arm (method / baseline) the verdicts, wall and CPU seconds and failure counts;
    the case records."""

    task: str
    method: str
    verdicts: dict[str, list[bool]] = field(default_factory=lambda: {"method": [], "baseline": []})
    seconds: dict[str, float] = field(default_factory=lambda: {"method": 0.0, "baseline": 0.0})
    cpu: dict[str, float] = field(default_factory=lambda: {"method": 0.0, "baseline": 0.0})
    failures: dict[str, Counter] = field(default_factory=lambda: {"method": Counter(), "baseline": Counter()})
    cases: list[dict[str, Any]] = field(default_factory=list)

    def edit(self, arm: str, pipe: Any, case: VideoEditCase, method: Any, settings: Settings) -> np.ndarray:
        """The ``arm``'s source and target clips as uint8, its wall and CPU seconds added to the arm's."""
        start, cpu = time.perf_counter(), time.process_time()
        out = edit(pipe, case.source, case.target, method, seed=case.seed, **settings.call())
        self.seconds[arm] += time.perf_counter() - start
        self.cpu[arm] += time.process_time() - cpu
        return np.stack([_uint8(out.source), _uint8(out.target)])

    def add(self, case: VideoEditCase, index: int, verdicts: Mapping[str, Any]) -> None:
        record: dict[str, Any] = {"index": index, **case.record()}
        for arm, verdict in verdicts.items():
            self.verdicts[arm].append(verdict.ok)
            self.failures[arm].update(verdict.failures)
            record[arm] = {"ok": verdict.ok, "failures": list(verdict.failures)}
        self.cases.append(record)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.task, "method": self.method, "cases": len(self.cases)}
        for arm, prefix in (("method", ""), ("baseline", "baseline_")):
            flags = self.verdicts[arm]
            k, n = sum(flags), len(flags)
            out[f"{prefix}success"] = k / n if n else math.nan
            out[f"{prefix}ci95"] = list(wilson_interval(k, n))
            out[f"{prefix}seconds_per_edit"] = self.seconds[arm] / n if n else math.nan
            out[f"{prefix}cpu_seconds_per_edit"] = self.cpu[arm] / n if n else math.nan
            out[f"{prefix}failures"] = dict(self.failures[arm])
        out["case_records"] = self.cases
        return out


def cases_of(task: str, settings: Settings) -> list[VideoEditCase]:
    """The run's cases of ``task``; every one must fit the run's clip."""
    cases = [make_case(task, settings.split, settings.start + i) for i in range(settings.cases)]
    for case in cases:
        problem = case_problem(case, settings.frames, settings.height, settings.width)
        if problem:
            raise ValueError(f"{problem}; every case fits 8 x 32 x 32 and larger frames: use --height/--width >= 32")
    return cases


def run_task(
    pipe: Any, task: str, settings: Settings, examples: list | None = None, save_clips: Path | None = None
) -> dict[str, Any]:
    """Score cases ``start .. start + cases - 1`` of ``task``: the method's edit and the plain pair from the same
    noise; the first EXAMPLES go to ``examples`` as (task, case, [source, method target, baseline target]). With
    ``save_clips`` (a folder) every case's three clips go to ``clips_<split>_<task>_<start>.npz`` there (uint8,
    with the seeds), to re-score without the model."""
    method = settings.method(task)
    run = _Run(task, method.name)
    saved: dict[str, list] = {"seed": [], "source": [], "method": [], "baseline": []}
    for i, case in enumerate(tqdm(cases_of(task, settings), desc=task, leave=False)):
        clips = {arm: run.edit(arm, pipe, case, m, settings) for arm, m in (("method", method), ("baseline", None))}
        verdicts = {arm: check(src, tgt, case, settings.thresholds) for arm, (src, tgt) in clips.items()}
        run.add(case, settings.start + i, verdicts)
        shown = [clips["method"][0], clips["method"][1], clips["baseline"][1]]
        if examples is not None and i < EXAMPLES:
            examples.append((task, case, shown))
        for key, value in zip(saved, [case.seed, *shown]):
            saved[key].append(value)
    if save_clips is not None:
        save_clips.mkdir(parents=True, exist_ok=True)
        name = f"clips_{settings.split}_{task.replace('/', '-')}_{settings.start}.npz"
        np.savez_compressed(save_clips / name, **{k: np.asarray(v) for k, v in saved.items()})
    return run.summary()


def run(
    pipe: Any,
    tasks: Sequence[str],
    settings: Settings,
    examples: list | None = None,
    save_clips: Path | None = None,
) -> list[dict[str, Any]]:
    pipe.set_progress_bar_config(disable=True)
    return [run_task(pipe, task, settings, examples, save_clips) for task in tqdm(tasks_of(tasks), desc="tasks")]


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _rate(rate: float, ci: Sequence[float]) -> str:
    return f"{100 * rate:5.1f}% [{100 * ci[0]:4.1f}, {100 * ci[1]:5.1f}]"


def format_table(results: Sequence[Mapping[str, Any]]) -> str:
    """task | method % [95 % CI] | baseline % [95 % CI] | seconds per edit (method / baseline; wall, then CPU)."""
    lines = [f"{'task':20s} {'method':22s} {'method % [95% CI]':24s} {'baseline % [95% CI]':24s} s/edit (m / b)"]
    for r in results:
        lines.append(
            f"{r['task']:20s} {r['method']:22s} {_rate(r['success'], r['ci95']):24s} "
            f"{_rate(r['baseline_success'], r['baseline_ci95']):24s} "
            f"{r['seconds_per_edit']:.2f} / {r['baseline_seconds_per_edit']:.2f}"
            f" (CPU {r['cpu_seconds_per_edit']:.2f} / {r['baseline_cpu_seconds_per_edit']:.2f})"
        )
    return "\n".join(lines)


def _strip(clip: np.ndarray) -> np.ndarray:
    """A clip's frames side by side, 1 px of grey between them."""
    gap = np.full((clip.shape[1], 1, 3), 128, np.uint8)
    return np.concatenate([part for frame in clip for part in (frame, gap)][:-1], axis=1)


def save_grid(examples: Sequence[tuple[str, VideoEditCase, Sequence[np.ndarray]]], path: Path, zoom: int = 3) -> None:
    """One panel per example (task, seed, captions): rows source | method | baseline, frames left to right, pixels
    enlarged without smoothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not examples:
        raise ValueError("save_grid: no examples to draw; run at least one task")
    panels = []
    for _, _, clips in examples:
        rows = [_strip(c) for c in clips]
        sep = np.full((2, rows[0].shape[1], 3), 255, np.uint8)
        panels.append(np.concatenate([rows[0], sep, rows[1], sep, rows[2]], axis=0))
    width = panels[0].shape[1] * zoom / 80
    fig, axes = plt.subplots(len(panels), 1, figsize=(width + 3.5, 1.1 * len(panels) * zoom), squeeze=False)
    for ax, panel, (task, case, _) in zip(axes[:, 0], panels, examples):
        ax.imshow(np.kron(panel, np.ones((zoom, zoom, 1), np.uint8)), interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(
            f"{task}  seed {case.seed}\n{_wrap(case.source)}\n-> {_wrap(case.target)}\nrows: source, method, baseline",
            fontsize=6,
            rotation=0,
            ha="right",
            va="center",
        )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _wrap(text: str, width: int = 44) -> str:
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join([*lines, line])


def write_results(
    results: Sequence[Mapping[str, Any]],
    settings: Settings,
    out: Path,
    model: str,
    totals: Mapping[str, float] | None = None,
) -> Path:
    """The result file; ``totals``: the whole run's wall and CPU seconds (edits, checks and loading)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"eval_editing_video_{settings.split}.json"
    info = Path(model) / "training.json"
    training = json.loads(info.read_text()) if info.is_file() else None
    payload = {
        "model": str(model),
        "model_training": training,
        "settings": settings.record(),
        "run_seconds": dict(totals or {}),
        "results": list(results),
    }
    path.write_text(json.dumps(payload, indent=2, default=float))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=SPLITS, required=True, help="dev (tuning) or report (published numbers)")
    parser.add_argument("--cases", type=int, default=40, help="cases per task (default 40)")
    parser.add_argument("--start", type=int, default=0, help="first case index (re-run case i: --start i --cases 1)")
    parser.add_argument(
        "--tasks", nargs="+", default=["all"], help=f"families or tasks (default all): {' '.join(TASKS)}"
    )
    parser.add_argument("--model", default=str(VIDEO_MODEL_DIR), help="the video model's folder")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"denoising steps (benchmark standard {STEPS})")
    parser.add_argument("--guidance", type=float, default=GUIDANCE, help=f"CFG scale (default {GUIDANCE})")
    parser.add_argument("--frames", type=int, default=FRAMES, help=f"frames per clip (default {FRAMES})")
    parser.add_argument("--height", type=int, default=HEIGHT, help=f"frame height in px (default {HEIGHT})")
    parser.add_argument("--width", type=int, default=WIDTH, help=f"frame width in px (default {WIDTH})")
    parser.add_argument(
        "--p2p", default='{"cross_replace": 0.8, "self_replace": 0.4, "self_max_tokens": 4096}', help="PromptToPrompt"
    )
    parser.add_argument("--masactrl", default='{"start_step": 4}', help="MutualSelfAttention options as JSON")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--grid", type=Path, default=None, help="also save a picture of example edits")
    parser.add_argument("--save-clips", action="store_true", help="also keep every clip (npz in --out)")
    parser.add_argument("--list", action="store_true", help="print the cases (index, seed, prompts) and stop")
    args = parser.parse_args(argv)
    tasks = tasks_of(args.tasks)
    if args.list:
        for task in tasks:
            for i in range(args.start, args.start + args.cases):
                case = make_case(task, args.split, i)
                print(f"{task} {args.split} #{i} seed {case.seed}: {case.source} -> {case.target}")
        return 0
    settings = Settings(
        split=args.split,
        cases=args.cases,
        start=args.start,
        steps=args.steps,
        guidance=args.guidance,
        frames=args.frames,
        height=args.height,
        width=args.width,
        p2p=json_option(args.p2p, "p2p"),
        masactrl=json_option(args.masactrl, "masactrl"),
    )
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    wall, cpu = time.perf_counter(), time.process_time()
    pipe = load_video_pipeline(args.model)
    examples: list = []
    results = run(pipe, tasks, settings, examples, args.out if args.save_clips else None)
    totals = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
    if args.grid is not None:
        save_grid(examples, args.grid)
        print(f"wrote {args.grid}")
    path = write_results(results, settings, args.out, args.model, totals)
    print(format_table(results))
    print(f"whole run (loading, edits, checks): {totals['wall']:.0f} s wall, {totals['cpu']:.0f} s CPU")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
