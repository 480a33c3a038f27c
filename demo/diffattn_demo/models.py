"""The demo's models: loading the image and video pipelines (the embedded ones, or local diffusers folders, offline),
the :class:`Models` holder that gives one call at a time each model, what the tabs read off an image pipeline, and
per image model what the page says about it and the Guidance tab's defaults (:data:`IMAGE_MODELS`, the one place
they are set)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffattn_bench.grammar import VOCABULARY
from diffattn_bench.scenes import SCENE_VOCABULARY

__all__ = [
    "CFG",
    "DEFAULT_IMAGE_MODEL",
    "EditExample",
    "GuidanceDefaults",
    "IMAGE_MODELS",
    "ImageModel",
    "LOCAL_IMAGE_MODEL",
    "ModelStructure",
    "Models",
    "TabPrompts",
    "image_size",
    "structure_of",
]

CFG = 4.0  # classifier-free guidance of every image call (the embedded model's evaluation setting)

logger = logging.getLogger("diffattn.demo")


@dataclass(frozen=True)
class ModelStructure:
    """What the page is built from, read off an image pipeline by :func:`structure_of`: ``size`` (height, width) in
    pixels, ``self_attention_layers`` (how many layers MasaCtrl counts, its start-layer choices) and
    ``guidance_blocks`` (the top-level blocks with attention, the Guidance tab's layer choices besides "family
    default"). An embedded model declares its own in :data:`IMAGE_MODELS`, so the page is served while the model
    loads; the loaded model is checked against it."""

    size: tuple[int, int]
    self_attention_layers: int
    guidance_blocks: tuple[str, ...]


@dataclass(frozen=True)
class GuidanceDefaults:
    """What the Guidance tab shows first: ``layer`` ("family default" or a block of the UNet, as its layer picker
    lists them), ``scales`` (the columns besides 0) and ``methods`` (the rows); ``scale``, one of the scales, is the
    one meant to change the image visibly with each of ``methods`` (the demo's browser test holds it to a mean
    change of >= 8 levels on the scenes model)."""

    layer: str
    scale: float
    scales: tuple[float, ...]
    methods: tuple[str, ...] = ("PAG", "SEG")

    def __post_init__(self) -> None:
        if self.scale not in self.scales or not all(s > 0 for s in self.scales):
            raise ValueError(f"scales must be > 0 and hold the default scale {self.scale}, got {self.scales}")
        if not self.methods or not set(self.methods) <= {"PAG", "SEG", "SoftPAG"}:
            raise ValueError(f"methods must be some of PAG, SEG, SoftPAG, got {self.methods}")

    @property
    def scales_text(self) -> str:
        return ", ".join(f"{s:g}" for s in (0.0, *self.scales))


@dataclass(frozen=True)
class EditExample:
    """One entry of the Edit tab's Examples gallery: the prompts, the method and its main control."""

    source: str
    target: str
    method: str = "prompt-to-prompt"
    mode: str = "replace"
    reweight_word: str = ""
    reweight: float = 1.0
    blend_words: str = ""


@dataclass(frozen=True)
class TabPrompts:
    """The prompts each tab shows first for one image model: the Edit tab's source and target, the Layout tab's
    prompt and subject boxes (``word: x0 y0 x1 y1`` lines), the Erase tab's prompt and the Guidance tab's; and each
    tab's Examples gallery (Layout: ``(prompt, subjects)``)."""

    edit_source: str
    edit_target: str
    layout: str
    layout_subjects: str
    erase: str
    guidance: str
    edit_examples: tuple[EditExample, ...] = ()
    layout_examples: tuple[tuple[str, str], ...] = ()
    erase_examples: tuple[str, ...] = ()
    guidance_examples: tuple[str, ...] = ()

    def all(self) -> tuple[str, ...]:
        """Every prompt (not the subject lines), the examples' included."""
        return (
            self.edit_source,
            self.edit_target,
            self.layout,
            self.erase,
            self.guidance,
            *(p for e in self.edit_examples for p in (e.source, e.target)),
            *(p for p, _ in self.layout_examples),
            *self.erase_examples,
            *self.guidance_examples,
        )


@dataclass(frozen=True)
class ImageModel:
    """An image model the demo can serve: its name on the page, how to load it (``load(folder)``; ``None`` = its
    embedded folder), the words its tokenizer knows (``None``: any, a local folder), the Guidance tab's defaults,
    the tabs' first prompts and, when known before loading, its :class:`ModelStructure` (``None``: read off the
    loaded model, which then loads before the page is built)."""

    name: str
    load: Callable[[Path | None], Any] = field(repr=False, compare=False)
    vocabulary: tuple[str, ...] | None
    guidance: GuidanceDefaults
    prompts: TabPrompts
    structure: ModelStructure | None = None

    def words(self) -> str:
        """The sentence the tabs show about the model's words."""
        if self.vocabulary is None:
            return f"Model: {self.name} (a local folder: any prompt its tokenizer reads)."
        return f"Model: {self.name}; the words it knows: {' '.join(f'`{w}`' for w in self.vocabulary)}"


def _embedded_image(path: Path | None) -> Any:
    from diffattn_bench import embedded

    return embedded.load_image_pipeline(path)


def _embedded_scenes(path: Path | None) -> Any:
    from diffattn_bench import embedded

    return embedded.load_scenes_pipeline(path)


def _local_folder(path: Path | None) -> Any:
    if path is None:
        raise ValueError("a local image model needs its folder (--image-model PATH)")
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(_model_folder(path), local_files_only=True)


#: The first prompts of shapes-image, whose captions name every object's colour, shape and place (and of a local
#: folder).
_SHAPES_PROMPTS = TabPrompts(
    edit_source="a red circle on the left",
    edit_target="a blue circle on the left",
    layout="a red circle and a blue square",
    layout_subjects="circle: 0.0 0.0 0.5 0.5\nsquare: 0.5 0.5 1.0 1.0",
    erase="a red circle on the left and a blue square on the right",
    guidance="a red circle on the left and a blue square on the right",
    edit_examples=(
        EditExample("a red circle on the left", "a blue circle on the left"),
        EditExample("a green square on the right", "a green triangle on the right"),
        EditExample("a red circle on the left", "a small red circle on the left", mode="refine"),
        EditExample("a yellow square at the top", "a yellow square at the top", reweight_word="square", reweight=3.0),
        EditExample("a small cyan triangle on the left", "a large cyan triangle on the right", method="MasaCtrl"),
    ),
    layout_examples=(
        ("a red circle and a blue square", "circle: 0.0 0.0 0.5 0.5\nsquare: 0.5 0.5 1.0 1.0"),
        ("a green triangle and a yellow circle", "triangle: 0.5 0.0 1.0 0.5\ncircle: 0.0 0.5 0.5 1.0"),
    ),
    erase_examples=(
        "a red circle on the left and a blue square on the right",
        "a green triangle at the top and a yellow circle at the bottom",
    ),
    guidance_examples=("a red circle on the left and a blue square on the right", "a large green triangle"),
)

#: The structures of the embedded image models (``structure_of`` on the shipped weights; the demo checks the loaded
#: model against them and ``tests/demo/test_demo_logic.py`` checks both).
_UNET_BLOCKS = tuple(f"down_blocks.{i}" for i in range(3)) + tuple(f"up_blocks.{i}" for i in (1, 2, 3)) + ("mid_block",)
_SCENES_STRUCTURE = ModelStructure((64, 64), 10, _UNET_BLOCKS)
_IMAGE_STRUCTURE = ModelStructure((32, 32), 10, _UNET_BLOCKS)

#: The embedded image models the demo can serve (``--embedded-image NAME``); :data:`DEFAULT_IMAGE_MODEL` by default.
#: The Guidance defaults of shapes-scenes come from ``scripts/sweep_guidance.py`` on the shipped model (stage 1,
#: CFG 1, scale 3, 96 items; docs/results.md): ``up_blocks.2`` is the block where PAG and SEG both move the image
#: visibly (mean change 22 and 14 levels) without lowering ShapesBench (paired differences within +-4 points,
#: intervals across 0); ``up_blocks.3`` moves it as much but loses 4-6 points, ``mid_block`` (a 2 x 2 latent) moves
#: it by < 1 level. Its sweep shows scales 0, 3 and 5 (5 images; 1.5 too made 7, which took 13-16 s on the 2-core
#: AMD EPYC in CI, over the 15 s a default run may take). Its Edit prompts leave place, size and background open:
#: what prompt-to-prompt keeps from the source and a plain target prompt would draw anew (ShapesEdit v2, README).
IMAGE_MODELS: dict[str, ImageModel] = {
    "shapes-scenes": ImageModel(
        "shapes-scenes",
        _embedded_scenes,
        tuple(SCENE_VOCABULARY),
        GuidanceDefaults(layer="up_blocks.2", scale=3.0, scales=(3.0, 5.0)),
        structure=_SCENES_STRUCTURE,
        prompts=TabPrompts(
            edit_source="a red striped circle",
            edit_target="a blue striped circle",
            layout="a red circle and a blue square",
            layout_subjects="circle: 0.0 0.0 0.5 0.5\nsquare: 0.5 0.5 1.0 1.0",
            erase="a red circle and a blue square on a beige striped background",
            guidance="a red striped circle on the left and a blue square on a black checked background",
            edit_examples=(
                EditExample("a red striped circle", "a blue striped circle"),
                EditExample("a red circle on a black checked background", "a red square on a black checked background"),
                EditExample("a red circle", "a red striped circle", mode="refine"),
                EditExample(
                    "a yellow dotted square and a blue circle",
                    "a green dotted square and a blue circle",
                    blend_words="square",
                ),
                EditExample("a red striped circle", "a red striped circle", reweight_word="striped", reweight=3.0),
                EditExample("a small green triangle on the left", "a large green triangle on the right", "MasaCtrl"),
            ),
            layout_examples=(
                ("a red circle and a blue square", "circle: 0.0 0.0 0.5 0.5\nsquare: 0.5 0.5 1.0 1.0"),
                (
                    "a green triangle and a yellow circle on a white plain background",
                    "triangle: 0.5 0.0 1.0 0.5\ncircle: 0.0 0.5 0.5 1.0",
                ),
            ),
            erase_examples=(
                "a red circle and a blue square on a beige striped background",
                "a green dotted triangle on a black checked background",
            ),
            guidance_examples=(
                "a red striped circle on the left and a blue square on a black checked background",
                "a large yellow dotted triangle on a white vertical gradient background",
            ),
        ),
    ),
    "shapes-image": ImageModel(
        "shapes-image",
        _embedded_image,
        tuple(VOCABULARY),
        GuidanceDefaults(layer="family default", scale=3.0, scales=(1.5, 3.0, 5.0)),
        _SHAPES_PROMPTS,
        _IMAGE_STRUCTURE,
    ),
}
DEFAULT_IMAGE_MODEL = "shapes-scenes"
#: A local diffusers folder (``--image-model PATH`` alone): the family-default guidance layer.
LOCAL_IMAGE_MODEL = ImageModel(
    "local folder",
    _local_folder,
    None,
    GuidanceDefaults(layer="family default", scale=3.0, scales=(1.5, 3.0, 5.0)),
    _SHAPES_PROMPTS,
)


def _load_video_model(path: Path | None) -> Any:
    from diffattn_bench import embedded

    if path is None:
        return embedded.load_video_pipeline()
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(_model_folder(path), local_files_only=True)


def _model_folder(path: Path) -> Path:
    if not (Path(path) / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a diffusers pipeline folder (no model_index.json); pass the folder "
            "that from_pretrained would load"
        )
    return Path(path)


@dataclass
class Models:
    """The demo's pipelines, each loaded once (the image model at start-up by :meth:`load`, the video model on first
    use) and used by one call at a time: :meth:`image` / :meth:`video` hold that model's lock.

    The image model: ``embedded_image`` (a name in :data:`IMAGE_MODELS`) from its embedded folder, or from
    ``image_path`` when both are given (e.g. a copy of a training export); ``image_path`` alone is any local
    diffusers folder; neither is :data:`DEFAULT_IMAGE_MODEL`."""

    image_path: Path | None = None
    video_path: Path | None = None
    embedded_image: str | None = None
    _image: Any = field(default=None, repr=False)
    _video: Any = field(default=None, repr=False)
    _structure: ModelStructure | None = field(default=None, repr=False)
    _image_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _video_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.embedded_image is not None and self.embedded_image not in IMAGE_MODELS:
            raise ValueError(
                f"unknown embedded image model {self.embedded_image!r}; use one of {', '.join(IMAGE_MODELS)}"
            )

    @property
    def image_info(self) -> ImageModel:
        """What the page says about the image model and the Guidance tab's defaults for it."""
        if self.embedded_image is None and self.image_path is not None:
            return LOCAL_IMAGE_MODEL
        return IMAGE_MODELS[self.embedded_image or DEFAULT_IMAGE_MODEL]

    @property
    def image_label(self) -> str:
        info = self.image_info
        if self.image_path is None:
            return f"embedded {info.name}"
        return str(self.image_path) if info is LOCAL_IMAGE_MODEL else f"{info.name} from {self.image_path}"

    def inversion_threshold(self) -> float | None:
        """The reconstruction PSNR (dB) below which an uploaded image is out of the image model's domain: measured
        for the embedded shapes-image model only; unknown (``None``) for shapes-scenes (its in-domain and
        out-of-domain PSNRs overlap, README "Real images") and for a model loaded from a folder."""
        if self.image_path is not None or (self.embedded_image or DEFAULT_IMAGE_MODEL) != "shapes-image":
            return None
        from diffattn_bench.embedded import IMAGE_INVERSION_PSNR

        return IMAGE_INVERSION_PSNR

    def load(self) -> Models:
        """Load the image model now (the caller waits)."""
        with self._image_lock:
            self._image_pipe()
        return self

    def load_after(self, ready: threading.Event, before: Callable[[], None] = lambda: None) -> Models:
        """Load the image model in a thread of its own once ``ready`` is set (the demo sets it when its server
        listens, so the page is built and served first), running ``before`` there first (e.g. setting torch's
        threads); calls wait for the model from now on. Only for a model whose structure is declared (the page is
        built from it); the loaded model is checked against it."""
        if self.image_info.structure is None:
            raise ValueError(
                f"the image model {self.image_label} declares no structure: the page is built from the loaded "
                "model, so load() it first"
            )
        self._image_lock.acquire()  # held from here, so no call starts before the model is in
        threading.Thread(
            target=self._load_and_release, args=(ready, before), name="diffattn-demo-image-model", daemon=True
        ).start()
        return self

    def _load_and_release(self, ready: threading.Event, before: Callable[[], None]) -> None:
        try:
            ready.wait()
            start = time.perf_counter()
            before()
            self._image_pipe()
        except Exception:  # the first call loads again and shows the error to the user
            logger.exception("diffattn demo: loading the image model %s failed", self.image_label)
        else:
            print(f"diffattn demo: image model loaded ({time.perf_counter() - start:.1f} s)", flush=True)
        finally:
            self._image_lock.release()

    def structure(self) -> ModelStructure:
        """The image model's :class:`ModelStructure`: the declared one of an embedded model (checked against the
        model when it loads), else read off the loaded model."""
        declared = self.image_info.structure
        if declared is not None:
            return declared
        with self.image():
            assert self._structure is not None
            return self._structure

    def _image_pipe(self) -> Any:
        if self._image is None:
            pipe = self.image_info.load(self.image_path)
            declared, found = self.image_info.structure, structure_of(pipe)
            if declared is not None and found != declared:
                raise ValueError(
                    f"the image model {self.image_label} does not have the structure the demo declares for "
                    f"{self.image_info.name}: declared {declared}, found {found}. Serve the folder as a local "
                    "model (--image-model PATH without --embedded-image), or fix the declaration in "
                    "diffattn_demo.models.IMAGE_MODELS"
                )
            pipe.set_progress_bar_config(leave=False, desc="denoising")
            self._image, self._structure = pipe, found
        return self._image

    @contextlib.contextmanager
    def image(self, progress: Callable[[float, str], None] | None = None) -> Iterator[Any]:
        """The image pipeline, for one call at a time; ``progress(fraction, text)`` is told when the call waits for
        the model to load (the first call right after start-up)."""
        if progress is not None and self._image is None and self._image_lock.locked():
            progress(0.0, "waiting for the image model to load (once, after start-up)")
        with self._image_lock:
            yield self._image_pipe()

    @contextlib.contextmanager
    def video(self) -> Iterator[Any]:
        with self._video_lock:
            if self._video is None:
                pipe = _load_video_model(self.video_path)
                pipe.set_progress_bar_config(leave=False, desc="denoising")
                self._video = pipe
            yield self._video


def structure_of(pipe: Any) -> ModelStructure:
    """An image pipeline's :class:`ModelStructure`, read off its denoiser."""
    import diffattn
    from diffattn.editing import masactrl_layers

    model = getattr(pipe, "unet", None) or pipe.transformer
    blocks: list[str] = []
    for name, _ in diffattn.attention_modules(model):
        parts = name.split(".")
        top = ("down_blocks", "up_blocks", "blocks", "transformer_blocks", "single_transformer_blocks")
        block = ".".join(parts[:2]) if parts[0] in top else parts[0]
        if block not in blocks:
            blocks.append(block)
    layers = len(masactrl_layers(model, diffattn.MutualSelfAttention(), start_layer=0))
    return ModelStructure(image_size(pipe), layers, tuple(blocks))


def image_size(pipe: Any) -> tuple[int, int]:
    """The pipeline's native image size (height, width) in pixels: a UNet's ``sample_size`` or the pipeline's
    ``default_sample_size``, times the VAE's scale factor; a pipeline without them is refused (no size is guessed)."""
    unet = getattr(pipe, "unet", None)
    sample = unet.config.sample_size if unet is not None else getattr(pipe, "default_sample_size", None)
    scale = getattr(pipe, "vae_scale_factor", None)
    if sample is None or scale is None:
        missing = "vae_scale_factor" if scale is None else "unet.config.sample_size or default_sample_size"
        raise ValueError(
            f"{type(pipe).__name__} has no {missing}, so the demo cannot tell its native image size; serve a "
            "diffusers SD1.5 / SDXL / SD3 / Flux pipeline folder, whose pipelines have both"
        )
    scale = int(scale)
    if isinstance(sample, (tuple, list)):
        return int(sample[0]) * scale, int(sample[1]) * scale
    return int(sample) * scale, int(sample) * scale
