"""Sliding-window attention on the grids of models beyond the first seven families equals NATTEN's neighborhood
attention on the same queries, keys and values (issue #27): PixArt (image, self-attention over 3 x 5) and WanVACE
(video, 3 x 3 x 5), inside the model's real forward."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import pytest
import torch

import diffattn
from diffattn.testing.zoo import zoo_cases


@dataclass(frozen=True)
class NattenChecked(diffattn.SlidingWindowAttention):
    """SlidingWindowAttention that also runs NATTEN on each call's q, k, v (laid out on the layer's grid)."""

    gaps: list = field(default_factory=list, compare=False)

    def __call__(self, q, k, v, ctx):
        import natten

        out = super().__call__(q, k, v, ctx)
        grid = ctx.q_layout.grid
        batch, heads, tokens, dim = q.shape
        assert tokens == math.prod(grid) and ctx.role == "self"

        padded = max(8, 1 << (dim - 1).bit_length())  # NATTEN's flex backend takes power-of-two head sizes

        def on_grid(x):
            x = torch.nn.functional.pad(x, (0, padded - dim))  # zeros: q.k and the output's first dims unchanged
            return x.transpose(1, 2).reshape(batch, *grid, heads, padded)

        na = {2: natten.na2d, 3: natten.na3d}[len(grid)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = na(
                on_grid(q),
                on_grid(k),
                on_grid(v),
                kernel_size=self.window,
                scale=dim**-0.5,
                backend="flex-fna",
                attention_kwargs={"backend": "flex-fmha"},
            )
        expected = expected[..., :dim].reshape(batch, tokens, heads, dim).transpose(1, 2)
        self.gaps.append(float((out.float() - expected.float()).abs().max()))
        return out


@pytest.mark.parametrize(
    ("model_class", "window"), [("PixArtTransformer2DModel", (3, 3)), ("WanVACETransformer3DModel", (3, 3, 3))]
)
def test_sliding_window_equals_natten_on_the_models_grid(model_class, window):
    case = next(c for c in zoo_cases() if c.model_class == model_class)
    model, inputs = case.build(), case.inputs()
    method = NattenChecked(window=window)
    batch = inputs["hidden_states"].shape[0]
    with diffattn.apply(model, method) as handle, torch.no_grad():
        with diffattn.denoising_step(0, 1, batch_roles=("cond",) * batch):
            model(**inputs)
        assert handle.acted()
    assert method.gaps and max(method.gaps) < 1e-5, method.gaps
