"""What the tabs share: the progress callback their logic reports to and, for their Gradio builders, the queues (one
per model), the wrapper that turns a :class:`~diffattn_demo.inputs.DemoInputError` into a message in the page, and the
settings of the components every tab uses. Gradio is imported only inside the functions that need it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from ..inputs import LIMITS, NOT_AN_IMAGE, DemoInputError

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
    "upload_image",
    "image_editor",
    "about",
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


def upload_image(**kwargs: Any) -> Any:
    """A ``gr.Image`` upload field whose file reaches the tab's logic even when it is not an image: Gradio's own
    preprocessing opens it first and would show PIL's error, with the server's path in it; the logic's
    :func:`~diffattn_demo.inputs.load_upload` checks the file and says what is wrong. Needs ``type="filepath"``."""
    import gradio as gr

    if kwargs.get("type") != "filepath":
        raise ValueError("upload_image hands the logic a file: pass type='filepath'")
    field = gr.Image(**kwargs)
    preprocess = field.preprocess

    def checked_by_the_logic(payload: Any) -> Any:
        try:
            return preprocess(payload)
        except Exception:
            path = getattr(payload, "path", None)
            if path:  # the file Gradio stored; the logic reads it and says what is wrong
                return str(path)
            raise gr.Error(NOT_AN_IMAGE, title="Please check the input", print_exception=False) from None

    # on the instance, not a subclass: Gradio writes a .pyi stub beside the source of every component class defined
    field.preprocess = checked_by_the_logic
    return field


def image_editor(**kwargs: Any) -> Any:
    """A ``gr.ImageEditor`` whose background or layer that is not an image gets the demo's message, not PIL's error
    with the server's path."""
    import gradio as gr

    editor = gr.ImageEditor(**kwargs)
    preprocess = editor.preprocess

    def refusing_non_images(payload: Any) -> Any:
        try:
            return preprocess(payload)
        except Exception:
            raise gr.Error(NOT_AN_IMAGE, title="Please check the input", print_exception=False) from None

    editor.preprocess = refusing_non_images
    return editor


def about(elem_id: str, what: str, words: str) -> Any:
    """The tab's first line: what its method does (``what``) and the words the model knows (``words``)."""
    import gradio as gr

    return gr.Markdown(f"{what} {words}", elem_id=elem_id)
