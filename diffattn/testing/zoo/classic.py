"""The seven families diffattn supported first, on odd, non-square grids (the tiny models of
:mod:`diffattn.testing.models`)."""

from __future__ import annotations

import functools

from ..inputs import tiny_inputs
from ..models import tiny_model
from . import ZooCase


def _case(model_class: str, family: str, grid: tuple[int, ...], text_len: int = 7) -> ZooCase:
    return ZooCase(
        model_class,
        functools.partial(tiny_model, family),
        functools.partial(tiny_inputs, family, grid, text_len=text_len),
        grid,
        text_len=text_len,
        name=f"{model_class}[{family}]",
    )


CASES = (
    _case("UNet2DConditionModel", "unet_sd15", (5, 7)),
    _case("UNet2DConditionModel", "unet_sdxl", (6, 10)),
    _case("SD3Transformer2DModel", "sd3", (3, 5)),
    _case("FluxTransformer2DModel", "flux", (3, 5)),
    _case("WanTransformer3DModel", "wan", (3, 3, 5)),
    _case("CogVideoXTransformer3DModel", "cogvideox", (3, 3, 5)),
    _case("HunyuanVideoTransformer3DModel", "hunyuan_video", (3, 3, 5)),
    _case("LTXVideoTransformer3DModel", "ltx_video", (3, 3, 5)),
)
