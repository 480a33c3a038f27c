"""Every family: Dense is bitwise the stock model, remove restores the original processor objects, and the token
layout handed to methods is right (checked against an independent masked computation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import diffattn
from diffattn.testing import FAMILIES, VIDEO_FAMILIES, tiny_inputs

TEXT_LEN = 7
GRIDS_2D = {"square": (4, 4), "non-square": (4, 6), "odd": (5, 3)}
GRIDS_3D = {"square": (2, 4, 4), "non-square": (3, 4, 6), "odd": (2, 5, 3)}
UNET_GRIDS = {"square": (8, 8), "non-square": (8, 12), "odd": (9, 7)}

# Written independently of diffattn.adapters: where each family puts text in its joint attention calls.
JOINT_TEXT = {"sd3": "last", "flux": "first", "cogvideox": "first", "hunyuan_video": "last"}


def grids_for(family: str) -> dict[str, tuple[int, ...]]:
    if family.startswith("unet"):
        return UNET_GRIDS
    return GRIDS_3D if family in VIDEO_FAMILIES else GRIDS_2D


CASES = [(f, kind) for f in FAMILIES for kind in ("square", "non-square", "odd")]


def run(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out[0] if isinstance(out, tuple) else out.sample


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_is_bitwise_stock_and_remove_restores(family, tiny_model):
    model = tiny_model(family)
    grid = grids_for(family)["non-square"]
    inputs = tiny_inputs(family, grid, batch=2, text_len=TEXT_LEN)
    stock = run(model, inputs)
    originals = {n: m.processor for n, m in diffattn.attention_modules(model)}

    handle = diffattn.apply(model, diffattn.Dense())
    assert handle.layers, "Dense must act on some layers"
    dense = run(model, inputs)
    assert torch.equal(dense, stock)
    assert handle.acted(), "the method never acted: the hooks were bypassed"

    again = diffattn.apply(model, diffattn.Dense())  # applying twice stacks two Dense: still bitwise
    assert torch.equal(run(model, inputs), stock)
    assert again.acted() and handle.acted()
    again.remove()
    handle.remove()
    assert all(m.processor is originals[n] for n, m in diffattn.attention_modules(model)), "processors untouched"
    assert not any(
        name.startswith("diffattn")
        for _, m in model.named_modules()
        for name in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})
    )
    assert torch.equal(run(model, inputs), stock)

    diffattn.remove(model)
    assert {n: m.processor for n, m in diffattn.attention_modules(model)} == originals
    assert all(m.processor is originals[n] for n, m in diffattn.attention_modules(model))
    assert torch.equal(run(model, inputs), stock)


def hide_mask(q_idx: torch.Tensor, kv_idx: torch.Tensor, ctx: diffattn.AttentionContext) -> torch.Tensor:
    """Nobody sees text token 2 nor any visual token of grid row 1."""
    layout = ctx.kv_layout
    hidden_text = layout.text_index(kv_idx) == 2
    hidden_row = (layout.visual_coords(kv_idx)[-2] == 1) if layout.grid else torch.zeros_like(kv_idx, dtype=torch.bool)
    return ~(hidden_text | hidden_row)


class IndependentMask(TorchFunctionMode):
    """Applies the same 'hide text token 2 and visual row 1' mask by knowing each family's layout by hand."""

    def __init__(self, family: str, grid: tuple[int, ...], text_len: int) -> None:
        super().__init__()
        self.family, self.grid, self.text_len = family, grid, text_len
        self.calls = 0

    def visual_grids(self) -> list[tuple[int, ...]]:
        if not self.family.startswith("unet"):
            return [self.grid]
        grids, g = [], self.grid
        for _ in range(4):
            grids.append(g)
            g = tuple(math.ceil(n / 2) for n in g)
        return grids

    def key_mask(self, num_q: int, num_kv: int) -> np.ndarray:
        keep = np.ones(num_kv, dtype=bool)
        for grid in self.visual_grids():
            n_vis = math.prod(grid)
            if num_kv == self.text_len and num_q == n_vis:  # cross-attention: keys are text
                keep[2] = False
                return keep
            if num_kv == n_vis:  # self-attention over the visual grid
                rows = np.unravel_index(np.arange(n_vis), grid)[-2]
                keep[rows == 1] = False
                return keep
            if num_kv == n_vis + self.text_len and self.family in JOINT_TEXT:
                text_first = JOINT_TEXT[self.family] == "first"
                vis_off, text_off = (self.text_len, 0) if text_first else (0, n_vis)
                rows = np.unravel_index(np.arange(n_vis), grid)[-2]
                keep[vis_off + np.flatnonzero(rows == 1)] = False
                keep[text_off + 2] = False
                return keep
        if num_q == num_kv == self.text_len:  # text-only attention (HunyuanVideo's token refiner): untouched
            return keep
        raise AssertionError(f"{self.family}: unexpected attention call {num_q}x{num_kv}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value")
        q, k, v = (*args[:3], *(kwargs.pop(n) for n in names[len(args[:3]) :]))
        self.calls += 1
        keep = torch.from_numpy(self.key_mask(q.shape[-2], k.shape[-2]))
        mask = kwargs.pop("attn_mask", None)
        keep = keep.view(1, 1, 1, -1).expand(q.shape[0], 1, q.shape[-2], -1)
        if mask is not None and mask.dtype == torch.bool:
            keep = keep & mask
        elif mask is not None:
            mask = mask + torch.where(keep, 0.0, float("-inf")).to(mask.dtype)
            return func(q, k, v, attn_mask=mask, **kwargs)
        return func(q, k, v, attn_mask=keep, **kwargs)


@pytest.mark.parametrize("family,kind", CASES)
def test_layout_matches_independent_masked_attention(family, kind, tiny_model):
    model = tiny_model(family)
    grid = grids_for(family)[kind]
    inputs = tiny_inputs(family, grid, batch=1, text_len=TEXT_LEN)
    stock = run(model, inputs)
    mode = IndependentMask(family, grid, TEXT_LEN)
    with mode:
        expected = run(model, inputs)
    assert mode.calls > 0
    assert not torch.allclose(expected, stock, atol=1e-4), (
        "the mask must change the output for the test to mean anything"
    )

    handle = diffattn.apply(model, diffattn.Masked(hide_mask))
    got = run(model, inputs)
    handle.remove()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert {c.role for c in handle.calls if c.acted} >= ({"joint"} if family in JOINT_TEXT else {"self", "cross"})
