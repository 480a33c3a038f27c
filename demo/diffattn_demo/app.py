"""diffattn's Gradio demo: editing (prompt-to-prompt, MasaCtrl, inversion), layout (bounded attention), object removal
(Attentive Eraser), perturbed-attention guidance and the sparse-attention speed comparison, on the embedded models.

    diffattn demo                        # http://127.0.0.1:7860, the embedded image and video models
    python -m diffattn_demo --port 7861 --image-model PATH/TO/SD-FOLDER --video-model PATH/TO/WAN-FOLDER

Everything stays on this machine: Gradio's analytics are off, no share link is made, the server listens on
127.0.0.1 unless ``--host`` says otherwise, and models load offline (any local diffusers SD1.5 / SDXL / SD3 / Flux
folder for the image tabs, a Wan folder for the speed tab; default: the embedded models). Uploads and Gradio's
temporary files go to a folder of the demo's own (``GRADIO_TEMP_DIR``), trimmed while it runs and removed at exit.
Calls on one model run one at a time (a Gradio queue per model, and a lock); the tabs' logic is in ``logic.py``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import logic

__all__ = ["DemoSettings", "prepare_environment", "build_app", "launch", "main", "logic"]

logger = logging.getLogger("diffattn.demo")

CSS = """
.pixelated img, .pixelated canvas { image-rendering: pixelated; image-rendering: crisp-edges; }
"""
IMAGE_MODEL = "image-model"  # Gradio concurrency ids: one queue per model, one call at a time
VIDEO_MODEL = "video-model"


@dataclass(frozen=True)
class DemoSettings:
    """How the demo is served. ``image_model`` / ``video_model``: local diffusers folders (None: embedded models);
    ``threads``: torch CPU threads (None: torch's default)."""

    host: str = "127.0.0.1"
    port: int = 7860
    image_model: Path | None = None
    video_model: Path | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        for name in ("image_model", "video_model"):
            path = getattr(self, name)
            if path is not None and not (Path(path) / "model_index.json").is_file():
                raise ValueError(
                    f"--{name.replace('_', '-')} {path}: not a diffusers pipeline folder (no "
                    "model_index.json); pass the folder that from_pretrained loads"
                )


_TEMP: Path | None = None


def prepare_environment() -> Path:
    """Before Gradio is imported: analytics off, Hugging Face Hub offline, and a new demo-owned temporary folder as
    ``GRADIO_TEMP_DIR`` (removed at exit). Returns that folder; calling it again returns the same one."""
    global _TEMP
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    if _TEMP is None or not _TEMP.is_dir():
        _TEMP = Path(tempfile.mkdtemp(prefix="diffattn-demo-")).resolve()
        atexit.register(shutil.rmtree, _TEMP, True)
    os.environ["GRADIO_TEMP_DIR"] = str(_TEMP)
    if "gradio" in sys.modules:
        from gradio.utils import get_upload_folder

        assert Path(get_upload_folder()).resolve() == _TEMP
    return _TEMP


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """A :class:`logic.DemoInputError` becomes a message in the page (``gr.Error``), not a traceback."""
    import gradio as gr

    try:
        yield
    except logic.DemoInputError as error:
        raise gr.Error(str(error), title="Please check the input", print_exception=False) from None


def _progress(progress: Any) -> Any:
    return lambda fraction, text: progress(fraction, desc=text)


def build_app(models: Any, temp: Path) -> Any:
    """The Gradio ``Blocks`` with the five tabs, calling ``logic`` on ``models`` (a :class:`logic.Models`)."""
    import gradio as gr

    from diffattn_bench.compare import default_methods

    with models.image() as pipe:
        layer_choices = logic.guidance_layer_choices(pipe)
        size = logic.image_size(pipe)
    speed_methods = list(default_methods((8, 8, 16)))
    image_out = dict(type="numpy", format="png", interactive=False, elem_classes=["pixelated"], buttons=["download"])
    steps_slider = dict(minimum=logic.LIMITS.min_steps, maximum=logic.LIMITS.max_steps, step=1)
    seed_box = dict(precision=0, minimum=0, maximum=logic.LIMITS.max_seed)

    with gr.Blocks(title="diffattn demo", analytics_enabled=False, delete_cache=(300, 900)) as app:
        gr.Markdown(
            f"## diffattn: attention methods on diffusers pipelines\nImage model: "
            f"{models.image_path or 'embedded shapes-image'} ({size[1]} x {size[0]} px, shown enlarged); "
            f"video model: {models.video_path or 'embedded shapes-video'}. Everything runs on this machine."
        )
        with gr.Tab("Edit", id="edit"):
            with gr.Row():
                with gr.Column():
                    e_source = gr.Textbox("a red circle on the left", label="Source prompt", elem_id="edit-source")
                    e_target = gr.Textbox(
                        "a blue circle on the left", label="Target prompt (empty: the source)", elem_id="edit-target"
                    )
                    with gr.Row():
                        e_swap = gr.Textbox("", label="Swap word (in the target)", elem_id="edit-swap")
                        e_swap_to = gr.Textbox("", label="... for", elem_id="edit-swap-to")
                    with gr.Row():
                        e_word = gr.Textbox("", label="Re-weight word (prompt-to-prompt)", elem_id="edit-word")
                        e_weight = gr.Slider(0.0, 5.0, value=1.0, step=0.1, label="weight", elem_id="edit-weight")
                    e_method = gr.Radio(
                        list(logic.EDIT_METHODS), value="prompt-to-prompt", label="Method", elem_id="edit-method"
                    )
                    with gr.Row():
                        e_seed = gr.Number(0, label="Seed", elem_id="edit-seed", **seed_box)
                        e_steps = gr.Slider(value=20, label="Steps", elem_id="edit-steps", **steps_slider)
                    e_upload = gr.Image(
                        type="filepath",
                        sources=["upload"],
                        format="png",
                        label=("Optional: an image to invert and edit (PNG / JPEG / WebP, <= 10 MB, <= 2048 px)"),
                        elem_id="edit-upload",
                        elem_classes=["pixelated"],
                    )
                    e_run = gr.Button("Edit", variant="primary", elem_id="edit-run")
                with gr.Column():
                    with gr.Row():
                        e_out_source = gr.Image(label="Source", elem_id="edit-out-source", **image_out)
                        e_out_target = gr.Image(label="Edited", elem_id="edit-out-target", **image_out)
                        e_out_diff = gr.Image(label="Difference", elem_id="edit-out-diff", **image_out)
                    e_note = gr.Markdown(elem_id="edit-note")

            def on_edit(
                source: str,
                target: str,
                swap: str,
                swap_to: str,
                word: str,
                weight: float,
                method: str,
                seed: Any,
                steps: Any,
                upload: Any,
                progress: Any = gr.Progress(track_tqdm=True),
            ) -> tuple:
                with _user_errors():
                    out = logic.run_edit(
                        models,
                        source,
                        target,
                        method,
                        seed,
                        steps,
                        swap_word=swap,
                        swap_to=swap_to,
                        reweight_word=word,
                        reweight=weight,
                        upload=upload,
                        upload_folder=temp,
                        progress=_progress(progress),
                    )
                return out.source, out.target, out.difference, out.note

            e_run.click(
                on_edit,
                [e_source, e_target, e_swap, e_swap_to, e_word, e_weight, e_method, e_seed, e_steps, e_upload],
                [e_out_source, e_out_target, e_out_diff, e_note],
                api_name="edit",
                concurrency_limit=1,
                concurrency_id=IMAGE_MODEL,
            )

        with gr.Tab("Layout", id="layout"):
            with gr.Row():
                with gr.Column():
                    l_prompt = gr.Textbox("a red circle and a blue square", label="Prompt", elem_id="layout-prompt")
                    l_subjects = gr.Textbox(
                        "circle: 0.0 0.0 0.5 0.5\nsquare: 0.5 0.5 1.0 1.0",
                        lines=4,
                        label="Subjects, one per line: word: x0 y0 x1 y1 (fractions, origin top-left)",
                        elem_id="layout-subjects",
                    )
                    with gr.Row():
                        l_seed = gr.Number(0, label="Seed", elem_id="layout-seed", **seed_box)
                        l_steps = gr.Slider(value=20, label="Steps", elem_id="layout-steps", **steps_slider)
                    l_run = gr.Button("Generate both", variant="primary", elem_id="layout-run")
                with gr.Column():
                    with gr.Row():
                        l_boxes = gr.Image(label="Boxes", elem_id="layout-boxes", **image_out)
                        l_plain = gr.Image(label="Plain prompt", elem_id="layout-plain", **image_out)
                        l_bounded = gr.Image(label="Bounded attention", elem_id="layout-bounded", **image_out)
                    l_note = gr.Markdown(elem_id="layout-note")

            def on_boxes(text: str) -> Any:
                try:
                    return logic.draw_boxes(logic.parse_subjects(text))
                except logic.DemoInputError:
                    return None  # half-typed lines: the Generate button reports what is wrong

            l_subjects.change(on_boxes, [l_subjects], [l_boxes], queue=False, show_progress="hidden")

            def on_layout(
                prompt: str, subjects: str, seed: Any, steps: Any, progress: Any = gr.Progress(track_tqdm=True)
            ) -> tuple:
                with _user_errors():
                    out = logic.run_layout(models, prompt, subjects, seed, steps, progress=_progress(progress))
                return out.boxes, out.plain, out.bounded, out.note

            l_run.click(
                on_layout,
                [l_prompt, l_subjects, l_seed, l_steps],
                [l_boxes, l_plain, l_bounded, l_note],
                api_name="layout",
                concurrency_limit=1,
                concurrency_id=IMAGE_MODEL,
            )

        with gr.Tab("Erase", id="erase"):
            with gr.Row():
                with gr.Column():
                    with gr.Row():
                        r_prompt = gr.Textbox(
                            "a red circle on the left and a blue square on the right",
                            label="Generate an image (or upload one in the canvas)",
                            elem_id="erase-prompt",
                            scale=3,
                        )
                        r_generate = gr.Button("Generate", elem_id="erase-generate", scale=1)
                    r_editor = gr.ImageEditor(
                        type="numpy",
                        format="png",
                        sources=["upload"],
                        label=("Paint over the object to remove"),
                        elem_id="erase-editor",
                        elem_classes=["pixelated"],
                        brush=gr.Brush(default_size=40, colors=["#ff00ff"], color_mode="fixed"),
                        eraser=gr.Eraser(default_size=40),
                        transforms=(),
                        layers=False,
                        canvas_size=(256, 256),
                    )
                    with gr.Row():
                        r_seed = gr.Number(0, label="Seed", elem_id="erase-seed", **seed_box)
                        r_steps = gr.Slider(value=10, label="Steps", elem_id="erase-steps", **steps_slider)
                    r_run = gr.Button("Remove", variant="primary", elem_id="erase-run")
                with gr.Column():
                    with gr.Row():
                        r_source = gr.Image(label="Image", elem_id="erase-out-source", **image_out)
                        r_mask = gr.Image(label="Mask", elem_id="erase-out-mask", **image_out)
                        r_erased = gr.Image(label="Erased", elem_id="erase-out-erased", **image_out)
                    r_note = gr.Markdown(elem_id="erase-note")

            def on_generate(prompt: str, seed: Any, steps: Any) -> tuple:
                with _user_errors():
                    image, note = logic.generate_image(models, prompt, seed, steps)
                return {"background": image, "layers": [], "composite": image}, note

            r_generate.click(
                on_generate,
                [r_prompt, r_seed, r_steps],
                [r_editor, r_note],
                api_name="generate",
                concurrency_limit=1,
                concurrency_id=IMAGE_MODEL,
            )

            def on_erase(editor: Any, seed: Any, steps: Any, progress: Any = gr.Progress(track_tqdm=True)) -> tuple:
                with _user_errors():
                    out = logic.run_erase(models, editor, seed, steps, progress=_progress(progress))
                return out.source, out.mask, out.erased, out.note

            r_run.click(
                on_erase,
                [r_editor, r_seed, r_steps],
                [r_source, r_mask, r_erased, r_note],
                api_name="erase",
                concurrency_limit=1,
                concurrency_id=IMAGE_MODEL,
            )

        with gr.Tab("Guidance", id="guidance"):
            with gr.Row():
                with gr.Column():
                    g_prompt = gr.Textbox(
                        "a red circle on the left and a blue square on the right",
                        label="Prompt",
                        elem_id="guidance-prompt",
                    )
                    g_methods = gr.CheckboxGroup(
                        list(logic.GUIDANCE_METHODS),
                        value=["PAG", "SEG"],
                        label="Methods (rows)",
                        elem_id="guidance-methods",
                    )
                    g_scales = gr.Textbox(
                        "0, 1.5, 3, 5", label="Scales (columns; 0 = no guidance)", elem_id="guidance-scales"
                    )
                    g_layers = gr.Dropdown(
                        layer_choices, value="family default", label="Layers", elem_id="guidance-layers"
                    )
                    with gr.Row():
                        g_seed = gr.Number(0, label="Seed", elem_id="guidance-seed", **seed_box)
                        g_steps = gr.Slider(value=20, label="Steps", elem_id="guidance-steps", **steps_slider)
                    g_run = gr.Button("Sweep", variant="primary", elem_id="guidance-run")
                with gr.Column():
                    g_grid = gr.Image(
                        label="Rows: methods; columns: scales (same seed)", elem_id="guidance-grid", **image_out
                    )
                    g_table = gr.Markdown(elem_id="guidance-table")

            def on_guidance(
                prompt: str,
                methods: list,
                scales: str,
                layers: str,
                seed: Any,
                steps: Any,
                progress: Any = gr.Progress(track_tqdm=True),
            ) -> tuple:
                with _user_errors():
                    out = logic.run_guidance(
                        models, prompt, methods, scales, seed, steps, layers, progress=_progress(progress)
                    )
                return out.grid, out.table

            g_run.click(
                on_guidance,
                [g_prompt, g_methods, g_scales, g_layers, g_seed, g_steps],
                [g_grid, g_table],
                api_name="guidance",
                concurrency_limit=1,
                concurrency_id=IMAGE_MODEL,
            )

        with gr.Tab("Speed", id="speed"):
            with gr.Row():
                with gr.Column(scale=1):
                    s_methods = gr.CheckboxGroup(
                        speed_methods,
                        value=["sliding tile", "radial"],
                        label="Sparse methods (against dense attention)",
                        elem_id="speed-methods",
                    )
                    s_size = gr.Dropdown(
                        list(logic.SPEED_SIZES),
                        value=list(logic.SPEED_SIZES)[1],
                        label="Video size (frames x height x width)",
                        elem_id="speed-size",
                    )
                    s_steps = gr.Slider(
                        1,
                        logic.SPEED_MAX_STEPS,
                        value=logic.SPEED_MAX_STEPS,
                        step=1,
                        label="Steps (fewer: faster, but the clips are unfinished)",
                        elem_id="speed-steps",
                    )
                    s_run = gr.Button("Compare", variant="primary", elem_id="speed-run")
                with gr.Column(scale=2):
                    s_table = gr.Markdown(elem_id="speed-table")
                    s_plot = gr.Image(label="Speed", elem_id="speed-plot", **image_out)
                    s_frames = gr.Image(label="Frames", elem_id="speed-frames", **image_out)

            speed_folder = temp / "speed"  # a fixed folder of the demo's own: no input names a path

            def on_speed(methods: list, size: str, steps: Any, progress: Any = gr.Progress(track_tqdm=True)) -> tuple:
                with _user_errors():
                    out = logic.run_speed(models, methods, size, steps, speed_folder, progress=_progress(progress))
                return out.table, out.plot, out.frames

            s_run.click(
                on_speed,
                [s_methods, s_size, s_steps],
                [s_table, s_plot, s_frames],
                api_name="speed",
                concurrency_limit=1,
                concurrency_id=VIDEO_MODEL,
            )
    app.queue(default_concurrency_limit=1)
    return app


def launch(settings: DemoSettings, *, block: bool = True) -> Any:
    """Load the models, build the app and serve it on ``settings.host:settings.port`` (never a share link).
    ``block=False`` returns the running app (call ``app.close()``)."""
    temp = prepare_environment()
    import torch

    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    models = logic.Models(settings.image_model, settings.video_model).load()
    app = build_app(models, temp)
    app.launch(
        server_name=settings.host,
        server_port=settings.port,
        share=False,
        prevent_thread_lock=True,
        quiet=True,
        show_error=True,
        max_file_size="10mb",
        ssr_mode=False,
        css=CSS,
        pwa=False,
        enable_monitoring=False,
    )
    print(f"diffattn demo: http://{settings.host}:{settings.port} (Ctrl+C stops it)", flush=True)
    if not block:
        return app
    try:
        app.block_thread()
    finally:
        app.close()
    return app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffattn demo",
        description=(
            "Serve the Gradio demo of diffattn (edit, layout, erase, guidance, speed) on this machine, offline."
        ),
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--image-model",
        type=Path,
        default=None,
        help="local diffusers SD1.5 / SDXL / SD3 / Flux folder (default: the embedded shapes-image)",
    )
    parser.add_argument(
        "--video-model",
        type=Path,
        default=None,
        help="local diffusers Wan folder for the Speed tab (default: the embedded shapes-video)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = DemoSettings(args.host, args.port, args.image_model, args.video_model, args.threads)
    except ValueError as error:
        parser.error(str(error))
    launch(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
