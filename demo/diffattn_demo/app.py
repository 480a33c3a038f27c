"""diffattn's Gradio demo: editing (prompt-to-prompt, MasaCtrl, inversion), layout (bounded attention), object removal
(Attentive Eraser), perturbed-attention guidance and the sparse-attention speed comparison, on the embedded models.

    diffattn demo                        # http://127.0.0.1:7860, the embedded image and video models
    python -m diffattn_demo --port 7861 --image-model PATH/TO/SD-FOLDER --video-model PATH/TO/WAN-FOLDER
    diffattn demo --embedded-image shapes-image      # the first embedded image model (captions that name everything)

Everything stays on this machine: Gradio's analytics are off, no share link is made, the server listens on
127.0.0.1 unless ``--host`` says otherwise, and models load offline (any local diffusers SD1.5 / SDXL / SD3 / Flux
folder for the image tabs, a Wan folder for the speed tab; default: the embedded models). Uploads and Gradio's
temporary files go to a folder of the demo's own (``GRADIO_TEMP_DIR``), trimmed while it runs and removed at exit
(Ctrl+C or SIGTERM).
Calls on one model run one at a time (a Gradio queue per model, and a lock). This module serves the app; the input
rules are in ``inputs.py``, the models in ``models.py``, and each tab (its logic and its components) in ``tabs/``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .models import IMAGE_MODELS, Models
from .tabs import edit, erase, guidance, layout, speed
from .upload_check import upload_check_head

__all__ = ["DemoSettings", "prepare_environment", "build_app", "launch", "main"]

logger = logging.getLogger("diffattn.demo")

CSS = """
.pixelated img, .pixelated canvas { image-rendering: pixelated; image-rendering: crisp-edges; }
#speed-table { overflow-x: auto; }
#speed-table th, #speed-table td { word-break: normal; overflow-wrap: normal; hyphens: none; }
"""
TABS = (edit, layout, erase, guidance, speed)  # in the page's order; each module's build(models, temp) makes its tab


@dataclass(frozen=True)
class DemoSettings:
    """How the demo is served. ``image_model`` / ``video_model``: local diffusers folders (None: embedded models);
    ``threads``: torch CPU threads (None: torch's default); ``embedded_image``: which embedded image model (a name
    in ``models.IMAGE_MODELS``; with ``image_model``, that folder holds its weights)."""

    host: str = "127.0.0.1"
    port: int = 7860
    image_model: Path | None = None
    video_model: Path | None = None
    threads: int | None = None
    embedded_image: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.embedded_image is not None and self.embedded_image not in IMAGE_MODELS:
            raise ValueError(f"--embedded-image must be one of {', '.join(IMAGE_MODELS)}, got {self.embedded_image!r}")
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


def build_app(models: Models, temp: Path) -> Any:
    """The Gradio ``Blocks`` with the five tabs, each made by its module's ``build`` on ``models``; uploads and the
    Speed tab's files go under ``temp``."""
    import gradio as gr

    size = models.structure().size
    with gr.Blocks(title="diffattn demo", analytics_enabled=False, delete_cache=(300, 900)) as app:
        gr.Markdown(
            f"## diffattn: attention methods on diffusers pipelines\nImage model: "
            f"{models.image_label} ({size[1]} x {size[0]} px, shown enlarged); "
            f"video model: {models.video_path or 'embedded shapes-video'}. Everything runs on this machine."
        )
        for tab in TABS:
            tab.build(models, temp)
    app.queue(default_concurrency_limit=1)
    return app


def _serve(app: Any, settings: DemoSettings) -> None:
    """Start Gradio's server for ``app`` on loopback settings, without blocking."""
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
        head=upload_check_head(),
        pwa=False,
        enable_monitoring=False,
    )


def _use_threads(threads: int | None) -> None:
    """torch's CPU threads for every call (None: torch's default)."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)


def launch(settings: DemoSettings, *, block: bool = True) -> Any:
    """Build the app and serve it on ``settings.host:settings.port`` (never a share link), with the image model:
    an embedded one loads in the background once the page is served (a call waits for it), a local folder before
    the page is built (the page reads its structure). ``block=False`` returns the running app (call
    ``app.close()``)."""
    temp = prepare_environment()
    models = Models(settings.image_model, settings.video_model, settings.embedded_image)
    listening = threading.Event()
    if models.image_info.structure is None:  # a local folder: the page is built from the loaded model
        _use_threads(settings.threads)
        models.load()
    else:  # an embedded model declares its structure: it loads once the page is served, and calls wait for it
        models.load_after(listening, lambda: _use_threads(settings.threads))
    app = build_app(models, temp)
    try:
        _serve(app, settings)
    except BaseException:  # a stop (Ctrl+C, SIGTERM) while Gradio still starts: its server thread goes too
        with contextlib.suppress(Exception):
            app.close()
        raise
    listening.set()
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
        help="local diffusers SD1.5 / SDXL / SD3 / Flux folder (default: the embedded shapes-scenes)",
    )
    parser.add_argument(
        "--embedded-image",
        choices=list(IMAGE_MODELS),
        default=None,
        help=(
            "which embedded image model (default: shapes-scenes; shapes-image: the first one, whose captions name "
            "everything); with --image-model, that folder holds its weights"
        ),
    )
    parser.add_argument(
        "--video-model",
        type=Path,
        default=None,
        help="local diffusers Wan folder for the Speed tab (default: the embedded shapes-video)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (``kill``, a service manager) stops the demo as Ctrl+C does: a normal exit, so the server closes and
    the atexit clean-up removes the temporary folder (on a signal's default action Python runs no clean-up)."""
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = DemoSettings(
            args.host, args.port, args.image_model, args.video_model, args.threads, args.embedded_image
        )
    except ValueError as error:
        parser.error(str(error))
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    # a process started in the background by a non-interactive shell (`cmd &`, nohup) inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler: Ctrl+C / kill -INT would never stop the demo
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        launch(settings)
    except KeyboardInterrupt:  # Ctrl+C before the server blocked (loading, starting): a normal stop as well
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
