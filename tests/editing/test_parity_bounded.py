"""Parity of bounded attention's faithful mode with the authors' code (issue #29; omer11a/bounded-attention,
``bounded_attention.py``, ``run_sd.py``, ``run_xl.py``). Each authors' rule is written out here from their
construction, never through diffattn's helpers, and compared with the option that follows it; where diffattn's
default differs, the test also shows that it does (so a rule that silently changes fails one side).

- Boxes to cells (``_convert_boxes_to_masks``): rows ``round(y0 r):round(y1 r)``, columns likewise, no minimum.
- Cross-attention masks (``_hide_other_subjects_from_tokens``): subject and filter tokens hidden from every pixel,
  each subject's tokens shown in its mask (and in the background during guidance), the EOS token alone hidden from
  the background outside guidance; the unconditional half untouched.
- Self-attention masks (``_hide_other_subjects_from_subjects``).
- Loss (``_save_loss_values``, ``_compute_loss``): masses summed over heads, pixels and context keys on the boxes,
  averaged over layers, ``(1 - fg / (fg + S bg))^2`` summed, weights 1.5 / 0.5, normalised by subjects.
- Latent update (``update_loss``): step size ``start + (end - start) / G * i``; the loss of the previous iterate
  is checked before each forward pass.
- Refinement (``_build_self_masks`` and helpers): maps averaged from the first step, rebuilt before step 15 and every
  5th step after, column-max-normalised self maps, sigmoid cross maps times the current masks, soft overlap
  assignment, empty-mask repair.
- Layers (``run_sd.py``: loss 12-19, refinement 14-19 in the order the UNet calls its attention modules).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import diffattn
from diffattn.editing.layout import _descend, _step_sizes, authors_layers
from diffattn.methods.bounded import _COLLECTOR, _REFINER, BoundedAttention, LossCollector, MaskRefiner

MIN = torch.finfo(torch.float32).min
BOXES = ((0.05, 0.1, 0.45, 0.6), (0.55, 0.4, 0.95, 0.9), (0.3, 0.0, 0.7, 0.3))  # the first and third overlap
TOKENS = ((2, 3), (6,), (9, 10))
FILTERS = (1, 4, 5, 7)
EOS = 11
TEXT = 15  # EOS at 11, padding 12-14


def authors_boxes(boxes, resolution: int) -> torch.Tensor:
    """(s, n) bool, ``_convert_boxes_to_masks``."""
    out = torch.zeros(len(boxes), resolution, resolution, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        out[i, round(y0 * resolution) : round(y1 * resolution), round(x0 * resolution) : round(x1 * resolution)] = True
    return out.flatten(1)


def authors_cross_mask(subject_masks, tokens, filters, eos, text_len, *, guidance: bool, mask_eos=True):
    """(n, text) additive mask of the conditional half (``_hide_other_subjects_from_tokens``)."""
    background = subject_masks.sum(0) == 0
    if guidance:
        subject_masks = subject_masks | background[None]
    out = torch.zeros(subject_masks.shape[1], text_len)
    for group in (*tokens, filters):
        out[:, list(group)] = MIN
    for mask, group in zip(subject_masks, tokens):
        for t in group:
            out[mask, t] = 0
    if mask_eos and not guidance:
        out[background, eos] = MIN
    return out


def authors_self_mask(subject_masks):
    """(n, n) additive mask (``_hide_other_subjects_from_subjects``, after their July 2024 fix)."""
    background = subject_masks.sum(0) == 0
    n = subject_masks.shape[1]
    out = torch.zeros(n, n)
    out[~background[None, :] & ~background[:, None]] = MIN
    for mask in subject_masks:
        rows = out[mask]
        keep = (rows == 0) | mask[None, :]
        out[mask] = torch.where(keep, 0.0, MIN)
    return out


def ctx(role: str, resolution: int, text_len: int = TEXT, roles=("cond",), layer="l", step=0, num_steps=1):
    grid = diffattn.TokenLayout((resolution, resolution))
    kv = diffattn.TokenLayout((text_len,)) if role == "cross" else grid
    return diffattn.AttentionContext(
        layer=layer,
        role=role,
        step=step,
        num_steps=num_steps,
        q_layout=grid,
        kv_layout=kv,
        batch_roles=tuple(roles),
        attn_mask=None,
        scale=None,
        enable_gqa=False,
        dense=lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v),
    )


def method(faithful: bool) -> BoundedAttention:
    return BoundedAttention(boxes=BOXES, subject_tokens=TOKENS, filter_tokens=FILTERS, eos_token=EOS, faithful=faithful)


# ------------------------------------------------------------------------------------------------- boxes to cells


@pytest.mark.parametrize("resolution", [2, 4, 7, 8, 16, 64])
def test_faithful_boxes_are_the_authors_cells(resolution):
    boxes = (*BOXES, (0.5, 0.5, 0.52, 0.52))  # thinner than half a cell below 25 cells
    got = BoundedAttention(boxes=boxes, subject_tokens=(*TOKENS, (12,)), faithful=True)
    assert torch.equal(got.box_members((resolution, resolution)).T, authors_boxes(boxes, resolution))


def test_default_boxes_keep_one_cell_where_the_authors_have_none():
    thin = ((0.5, 0.5, 0.52, 0.52),)
    assert not authors_boxes(thin, 8).any()
    assert BoundedAttention(boxes=thin, subject_tokens=((1,),)).box_members((8, 8)).sum() == 1


# ------------------------------------------------------------------------------------------------------ the masks


@pytest.mark.parametrize("resolution", [4, 8])
@pytest.mark.parametrize("guidance", [False, True])
def test_faithful_cross_masks_are_the_authors(resolution, guidance):
    bounded = method(True)
    members = bounded.box_members((resolution, resolution))
    got = bounded.cross_allowed(members, TEXT, background=guidance)
    expected = authors_cross_mask(authors_boxes(BOXES, resolution), TOKENS, FILTERS, EOS, TEXT, guidance=guidance)
    assert torch.equal(got, expected == 0)


def test_default_cross_masks_also_hide_the_padding_from_the_background():
    resolution = 8
    default = method(False)
    got = default.cross_allowed(default.box_members((resolution, resolution)), TEXT)
    expected = authors_cross_mask(authors_boxes(BOXES, resolution), TOKENS, FILTERS, EOS, TEXT, guidance=False) == 0
    background = authors_boxes(BOXES, resolution).sum(0) == 0
    assert torch.equal(got[:, : EOS + 1], expected[:, : EOS + 1])
    assert expected[background, EOS + 1 :].all() and not got[background, EOS + 1 :].any()


@pytest.mark.parametrize("faithful", [False, True])
def test_self_masks_and_the_unconditional_half_are_the_authors(faithful):
    resolution = 8
    bounded = method(faithful)
    expected_self = authors_self_mask(authors_boxes(BOXES, resolution)) == 0
    got = bounded.masks(ctx("self", resolution, roles=("uncond", "cond")), 2)
    assert torch.equal(got[0, 0], expected_self) and torch.equal(got[1, 0], expected_self)
    cross = bounded.masks(ctx("cross", resolution, roles=("uncond", "cond")), 2)
    assert cross[0].all(), "the authors' unconditional half is never masked"


# ----------------------------------------------------------------------------------------------------------- loss


def authors_loss(layers, boxes_cells, tokens, eos, cross_coef=1.5, self_coef=0.5):
    """``layers``: [(is_cross, probs (b, h, n, k) of the conditional half)]; the authors' loss and its value
    normalised by samples and subjects."""
    background = boxes_cells.sum(0) == 0
    values = {True: ([], []), False: ([], [])}
    for is_cross, attn in layers:
        contexts = [list(group) + [eos] for group in tokens] if is_cross else list(boxes_cells)
        fg, bg = [], []
        for box, context in zip(boxes_cells, contexts):
            picked = attn[..., context]
            fg.append(picked[:, :, box].sum(dim=(1, 2, 3)))
            bg.append(picked[:, :, background].sum(dim=(1, 2, 3)))
        values[is_cross][0].append(torch.stack(fg, 1))
        values[is_cross][1].append(torch.stack(bg, 1))

    def term(fgs, bgs):
        fg, bg = torch.stack(fgs).mean(0), torch.stack(bgs).mean(0)
        return (1 - fg / (fg + len(tokens) * bg)) ** 2

    cross, self_ = term(*values[True]), term(*values[False])
    loss = cross_coef * cross.sum() + self_coef * self_.sum()
    b, s = cross.shape
    return loss, loss / b / s


class FixedMasks:
    """A refiner whose masks are given (what the authors' attention masks use after refinement)."""

    def __init__(self, masks, resolution):
        self.masks, self.resolution = masks, resolution

    def members(self, grid):
        assert grid == (self.resolution, self.resolution)
        return self.masks

    def wants(self, ctx):
        return False


@pytest.mark.parametrize("refined", [False, True])
def test_faithful_loss_is_the_authors_on_the_boxes(refined):
    resolution, heads, dim = 4, 2, 8
    g = torch.Generator().manual_seed(0)
    cells = authors_boxes(BOXES, resolution)
    masks = cells.clone()
    if refined:  # refined masks move subject 0 one row down: the masks change, the loss areas stay the boxes
        masks[0] = torch.roll(cells[0].reshape(resolution, resolution), 1, 0).flatten()
    bounded = method(True)
    collector = LossCollector(["l"])
    layers = []
    token = _COLLECTOR.set(collector)
    refine_token = _REFINER.set(FixedMasks(masks.T.clone(), resolution))
    try:
        for role, keys, additive in (
            ("cross", TEXT, authors_cross_mask(masks, TOKENS, FILTERS, EOS, TEXT, guidance=True)),
            ("self", resolution**2, authors_self_mask(masks)),
            ("cross", TEXT, authors_cross_mask(masks, TOKENS, FILTERS, EOS, TEXT, guidance=True)),
        ):
            q = torch.randn(1, heads, resolution**2, dim, generator=g)
            k = torch.randn(1, heads, keys, dim, generator=g)
            v = torch.randn(1, heads, keys, dim, generator=g)
            bounded(q, k, v, ctx(role, resolution))
            probs = ((q @ k.transpose(-1, -2)) * dim**-0.5 + additive).softmax(-1)
            layers.append((role == "cross", probs))
    finally:
        _COLLECTOR.reset(token)
        _REFINER.reset(refine_token)
    loss, per_subject = collector.loss(len(BOXES), 1.5, 0.5)
    expected, normalised = authors_loss(layers, cells, TOKENS, EOS)
    assert torch.allclose(loss, expected, rtol=1e-5) and math.isclose(per_subject, float(normalised), rel_tol=1e-5)


# -------------------------------------------------------------------------------------------------- latent update


@pytest.mark.parametrize("guided", [1, 6, 15])
def test_faithful_step_sizes_are_the_authors(guided):
    start, end = 8.0, 2.0
    coef = (end - start) / guided  # their step_size_coef over max_guidance_iter
    assert _step_sizes(guided, start, end, faithful=True) == pytest.approx([start + coef * i for i in range(guided)])
    if guided > 1:  # diffattn's own schedule ends on `end`
        assert _step_sizes(guided, start, end)[-1] == pytest.approx(end)


def authors_update(loss_of, latents, size, iterations, stop):
    """``update_loss`` (one guided step): the returned latents and the number of forward passes."""
    normalized, passes = torch.tensor(10000.0), 0
    latents = latents.clone().detach().requires_grad_(True)
    for _ in range(iterations):
        if normalized < stop:
            break
        loss, normalized = loss_of(latents)
        passes += 1
        grad = torch.autograd.grad(loss, [latents])[0]
        latents = latents - size * grad
    return latents.detach(), passes


@pytest.mark.parametrize(("stop", "differs"), [(0.0, False), (0.05, False), (0.3, True), (5.0, True)])
def test_faithful_descent_is_the_authors_update_loss(stop, differs):
    """Losses 5.25, 1.89, 0.68, 0.25, 0.09 along the way: below 0.3 at the 4th pass, never below 0.05."""
    target = torch.tensor([1.0, -2.0, 0.5])
    calls = []

    def loss_of(x):
        calls.append(1)
        loss = ((x - target) ** 2).sum()
        return loss, float(loss.detach())

    start = torch.zeros(3)
    expected, passes = authors_update(loss_of, start, 0.2, 5, stop)
    calls.clear()
    got = _descend(loss_of, start, 0.2, 5, stop, faithful=True)
    assert torch.allclose(got, expected) and len(calls) == passes
    # once the loss falls below stop within the 5 iterations, the authors step once more than diffattn's default
    assert torch.allclose(_descend(loss_of, start, 0.2, 5, stop), expected) is not differs


# ----------------------------------------------------------------------------------------------------- refinement


def authors_refined_masks(mean_self, mean_cross, labels, clusters, existing, boxes_cells, thr=0.2, score_thr=0.2):
    """``_build_self_masks`` with ``_obtain_cross_masks`` and ``_fix_zero_masks`` for one sample, the k-means
    labels given (of the column-normalised self maps). Returns (s, n) bool."""
    eps = 1e-5
    maps = mean_cross / (mean_cross.max(0, keepdim=True).values + eps)
    maps = torch.sigmoid(10 * (maps - thr))
    lo, hi = maps.min(0, keepdim=True).values, maps.max(0, keepdim=True).values
    maps = ((maps - lo) / (hi - lo + eps)).T * existing.float()  # (s, n)
    cluster_masks = torch.stack([labels == c for c in range(clusters)], 1).float()  # (n, c)
    intersection = maps @ cluster_masks
    min_area = torch.minimum(maps.sum(1, keepdim=True), cluster_masks.sum(0, keepdim=True))
    score_per_cluster, subject_per_cluster = (intersection / min_area).max(0)
    subjects, scores = subject_per_cluster[labels], score_per_cluster[labels]
    out = torch.stack([subjects == j for j in range(maps.shape[0])])
    out[:, scores < score_thr] = False
    for j in range(out.shape[0]):
        if out[j].sum() == 0:
            for k in range(out.shape[0]):
                out[k] = boxes_cells[j] if k == j else out[k] & ~boxes_cells[j]
    return out


def test_faithful_refinement_is_the_authors(monkeypatch):
    import diffattn.methods.bounded as bounded_module

    resolution, n = 4, 16
    boxes = ((0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0))
    tokens = ((1,), (2,))
    bounded = BoundedAttention(boxes=boxes, subject_tokens=tokens, faithful=True)
    refiner = MaskRefiner(bounded, ["l"], {3, 5}, clusters_per_box=2, faithful=True)
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3])
    seen = []

    def fixed_kmeans(points, k, *, generator, init=None, restarts=10, iterations=30):
        seen.append((points.clone(), restarts, init))
        return labels, torch.zeros(k, points.shape[1])

    monkeypatch.setattr(bounded_module, "kmeans", fixed_kmeans)
    selfs, crosses, built = [], [], []
    cells = authors_boxes(boxes, resolution)
    existing = cells
    for step in range(6):
        sa = torch.rand(1, 2, n, n, generator=g).softmax(-1)
        ca = torch.rand(1, 2, n, 4, generator=g).softmax(-1)
        c = ctx("self", resolution, step=step, num_steps=6)
        assert refiner.wants(c), "faithful: maps from every step"
        refiner.record(sa, c, [0])
        refiner.record(ca, ctx("cross", resolution, text_len=4, step=step, num_steps=6), [0])
        selfs.append(sa[0].mean(0))
        crosses.append(ca[0].mean(0)[:, [1, 2]])
        before = refiner.refreshed
        refiner.after_step(step)
        if refiner.refreshed > before:
            built.append(step + 1)
            mean_self = torch.stack(selfs).mean(0)
            points, restarts, _ = seen[-1]
            assert torch.allclose(points, mean_self / (mean_self.max(0, keepdim=True).values + 1e-5), atol=1e-6)
            assert restarts == (100 if len(built) == 1 else 1)
            expected = authors_refined_masks(mean_self, torch.stack(crosses).mean(0), labels, 4, existing, cells)
            assert torch.equal(refiner.masks.T, expected)
            existing = expected
    assert built == [3, 5], "rebuilt before the steps given, from the maps of every step before"


def test_assignment_repairs_an_empty_subject_as_the_authors():
    from diffattn.methods.bounded import assign_clusters, fix_empty_masks

    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        labels = torch.randint(0, 6, (36,), generator=g)
        cross = torch.rand(36, 3, generator=g) ** 4
        cells = authors_boxes(BOXES, 6)
        got = fix_empty_masks(assign_clusters(labels, cross, 6, 0.2), cells.T)
        maps = cross.T  # the assignment and repair of authors_refined_masks, on these soft maps as they are
        cluster_masks = torch.stack([labels == c for c in range(6)], 1).float()
        score, subject = ((maps @ cluster_masks) / torch.minimum(maps.sum(1, keepdim=True), cluster_masks.sum(0))).max(
            0
        )
        expected = torch.stack([subject[labels] == j for j in range(3)])
        expected[:, score[labels] < 0.2] = False
        for j in range(3):
            if expected[j].sum() == 0:
                for k in range(3):
                    expected[k] = cells[j] if k == j else expected[k] & ~cells[j]
        assert torch.equal(got.T, expected)


def authors_build_steps(num_steps: int, first: int, every: int) -> list[int]:
    """Steps at whose start the authors rebuild the masks: ``cur_step >= min_clustering_step`` and (no masks yet or
    ``cur_step % delta_refine_mask_steps == 0``)."""
    out, built = [], False
    for step in range(num_steps):
        if step >= first and (not built or step % every == 0):
            out.append(step)
            built = True
    return out


@pytest.mark.parametrize(("num_steps", "start", "every"), [(50, 0.3, 0.1), (20, 0.3, 0.1), (30, 0.25, 0.2)])
def test_faithful_refinement_steps_are_the_authors(num_steps, start, every, monkeypatch):
    layout_module = importlib.import_module("diffattn.editing.layout")  # the package's `layout` is the function
    captured = {}

    class Capture(MaskRefiner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            captured["refiner"] = self

    monkeypatch.setattr(layout_module, "MaskRefiner", Capture)
    monkeypatch.setattr(layout_module, "_run", lambda *args, **kwargs: None)
    monkeypatch.setattr(layout_module, "apply", lambda pipe, method: None)
    from diffattn.testing import tiny_pipeline

    pipe = tiny_pipeline("sd", seed=0)
    layout_module.layout(
        pipe,
        "a red circle and a blue square",
        [("circle", BOXES[0]), ("square", BOXES[1])],
        faithful=True,
        guidance_steps=0,
        refine_start=start,
        refine_every=every,
        num_inference_steps=num_steps,
    )
    refiner = captured["refiner"]
    first, delta = math.ceil(start * num_steps - 1e-9), max(1, round(every * num_steps))
    assert sorted(refiner._step_set(num_steps)) == authors_build_steps(num_steps, first, delta)
    assert refiner.faithful and refiner.method.faithful


# --------------------------------------------------------------------------------------------------------- layers


def sd15_shaped_unet():
    """SD1.5's block structure (32 attention modules) with tiny widths."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    ).eval()


def test_faithful_layers_are_the_authors_indices_on_an_sd15_unet():
    unet = sd15_shaped_unet()
    order = []
    hooks = [
        module.register_forward_pre_hook(lambda m, a, n=name: order.append(n))
        for name, module in unet.named_modules()
        if type(module).__name__ == "Attention"  # what their register_attention_editor_diffusers counts
    ]
    with torch.no_grad():
        unet(torch.randn(1, 4, 16, 16), 10, encoder_hidden_states=torch.randn(1, 5, 8))
    for hook in hooks:
        hook.remove()
    assert len(order) == 32
    loss, refine = authors_layers(unet)
    assert loss == tuple(order[12:20]) and refine == tuple(order[14:20])
    assert {n.split(".")[0] for n in loss} == {"mid_block", "up_blocks"}
