"""What the tabs share: the progress callback their logic reports to and, for their Gradio builders, the queues (one
per model), the wrapper that turns a :class:`~diffattn_demo.inputs.DemoInputError` into a message in the page, and the
settings of the components every tab uses. Gradio is imported only inside the functions that need it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..inputs import LIMITS, NOT_AN_IMAGE, DemoInputError, vocabulary_warning
from ..models import ImageModel

__all__ = [
    "Progress",
    "no_progress",
    "IMAGE_MODEL",
    "VIDEO_MODEL",
    "IMAGE_OUT",
    "user_errors",
    "gradio_progress",
    "step_label",
    "upload_image",
    "image_editor",
    "about",
    "number_box",
    "seed_box",
    "steps_box",
    "words_text",
    "words_panel",
]

Progress = Callable[[float, str], None]


def no_progress(fraction: float, text: str) -> None:
    return None


IMAGE_MODEL = "image-model"  # Gradio concurrency ids: one queue per model, one call at a time
VIDEO_MODEL = "video-model"

# keyword arguments of a result image
IMAGE_OUT = dict(type="numpy", format="png", interactive=False, elem_classes=["pixelated"], buttons=["download"])


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A :class:`DemoInputError` becomes a message in the page (``gr.Error``), not a traceback."""
    import gradio as gr

    try:
        yield
    except DemoInputError as error:
        raise gr.Error(str(error), title="Please check the input", print_exception=False) from None


@contextlib.contextmanager
def step_label(pipe: Any, text: str) -> Iterator[None]:
    """The pipeline's denoising progress bar labelled ``text`` (e.g. "image 2 of 7: PAG scale 3") while the block
    runs: Gradio's progress (``track_tqdm``) shows that bar, with its steps and the time left."""
    config = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(**{**config, "desc": text})
    try:
        yield
    finally:
        pipe.set_progress_bar_config(**config)


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


def about(elem_id: str, what: str, words: str = "") -> Any:
    """The tab's first line: what its method does (``what``), and ``words`` after it."""
    import gradio as gr

    return gr.Markdown(f"{what} {words}".strip(), elem_id=elem_id)


def number_box(label: str, value: float, minimum: float, maximum: float, elem_id: str, step: float = 1) -> Any:
    """A number field labelled with its range that hands the value as typed to the tab's logic, whose checks refuse
    a value outside the range in the demo's words ("steps must be between 1 and 50, got 500").

    Not a ``gr.Slider``: its number box clamps a typed 500 to 50 when it loses focus, unsaid. Not Gradio's own
    preprocessing either: it refuses out-of-range values with its message ("Value 500 is greater than maximum value
    50.") and, with ``precision=0``, rounds a seed of 1.5 to 2. The bounds stay on the field for its arrows."""
    import gradio as gr

    field = gr.Number(
        value,
        label=f"{label} ({minimum:.10g} to {maximum:.10g})",
        minimum=minimum,
        maximum=maximum,
        step=step,
        elem_id=elem_id,
    )

    def as_typed(payload: Any) -> Any:
        return payload

    field.preprocess = as_typed  # on the instance (see upload_image)
    return field


def seed_box(elem_id: str) -> Any:
    return number_box("Seed", 0, 0, LIMITS.max_seed, elem_id)


def steps_box(elem_id: str, value: int, maximum: int = LIMITS.max_steps) -> Any:
    return number_box("Steps", value, LIMITS.min_steps, maximum, elem_id)


def words_text(info: ImageModel, texts: Sequence[Any]) -> str:
    """What the page says by a prompt: the words the model knows and, when ``texts`` hold others, a warning naming
    them."""
    warning = vocabulary_warning(texts, info.vocabulary)
    return info.words() + (f"\n\n{warning}" if warning else "")


def words_panel(elem_id: str, info: ImageModel, boxes: Sequence[Any]) -> Any:
    """A note under the prompt ``boxes``: the model's words, and a warning naming the unknown words typed, redrawn as
    they change."""
    import gradio as gr

    panel = gr.Markdown(words_text(info, [box.value for box in boxes]), elem_id=elem_id)

    def on_words(*texts: Any) -> str:
        return words_text(info, texts)

    for box in boxes:
        box.change(on_words, list(boxes), [panel], queue=False, show_progress="hidden", api_visibility="private")
    return panel
