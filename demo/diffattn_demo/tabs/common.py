"""What the tabs share: the progress callback their logic reports to and, for their Gradio builders, the queues (one
per model), the wrapper that turns a :class:`~diffattn_demo.inputs.DemoInputError` into a message in the page, and the
settings of the components every tab uses. Gradio is imported only inside the functions that need it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from ..inputs import LIMITS, DemoInputError

__all__ = [
    "Progress",
    "no_progress",
    "IMAGE_MODEL",
    "VIDEO_MODEL",
    "IMAGE_OUT",
    "STEPS_SLIDER",
    "SEED_BOX",
    "user_errors",
    "gradio_progress",
]

Progress = Callable[[float, str], None]


def no_progress(fraction: float, text: str) -> None:
    return None


IMAGE_MODEL = "image-model"  # Gradio concurrency ids: one queue per model, one call at a time
VIDEO_MODEL = "video-model"

# keyword arguments of the components every tab uses: a result image, the steps slider, the seed box
IMAGE_OUT = dict(type="numpy", format="png", interactive=False, elem_classes=["pixelated"], buttons=["download"])
STEPS_SLIDER = dict(minimum=LIMITS.min_steps, maximum=LIMITS.max_steps, step=1)
SEED_BOX = dict(precision=0, minimum=0, maximum=LIMITS.max_seed)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A :class:`DemoInputError` becomes a message in the page (``gr.Error``), not a traceback."""
    import gradio as gr

    try:
        yield
    except DemoInputError as error:
        raise gr.Error(str(error), title="Please check the input", print_exception=False) from None


def gradio_progress(progress: Any) -> Any:
    """The tabs' :data:`Progress` callback reporting to Gradio's ``gr.Progress``."""
    return lambda fraction, text: progress(fraction, desc=text)
