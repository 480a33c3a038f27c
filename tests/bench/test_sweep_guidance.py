"""The pure parts of scripts/sweep_guidance.py: the configuration grid, the items, the intervals, the paired
difference, the resume logic and the UNet's attention blocks."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "sweep_guidance.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("sweep_guidance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


# ----------------------------------------------------------------------------------------------------------------
# grid and items
# ----------------------------------------------------------------------------------------------------------------
def test_grid_puts_each_cfgs_baseline_first_and_crosses_the_rest(sweep):
    grid = sweep.config_grid([1, 2], ["none", "PAG", "SEG"], ["mid_block", "up_blocks.1"], [1, 3])
    assert len(grid) == 2 * (1 + 2 * 2 * 2)
    assert [c.method for c in grid[:2]] == ["none", "PAG"] and grid[9].method == "none" and grid[9].cfg == 2.0
    for c in grid:
        assert c.key.startswith(f"cfg{c.cfg:g}/") and c.baseline_key == f"cfg{c.cfg:g}/none/-/0"
    assert len({c.key for c in grid}) == len(grid)
    assert {(c.method, c.layer, c.scale) for c in grid if c.cfg == 1.0 and c.method != "none"} == {
        (m, layer, s) for m in ("PAG", "SEG") for layer in ("mid_block", "up_blocks.1") for s in (1.0, 3.0)
    }


def test_grid_drops_duplicates_and_refuses_what_it_cannot_run(sweep):
    assert len(sweep.config_grid([1, 1.0], ["PAG", "PAG"], ["mid_block"] * 2, [3, 3.0])) == 2
    with pytest.raises(ValueError, match="unknown method"):
        sweep.config_grid([1], ["PAGX"], ["mid_block"], [3])
    with pytest.raises(ValueError, match="scale > 0"):
        sweep.config_grid([1], ["PAG"], ["mid_block"], [0])
    with pytest.raises(ValueError, match="cfg must be >= 1"):
        sweep.config_grid([0.5], ["PAG"], ["mid_block"], [3])
    with pytest.raises(ValueError, match="at least one layer"):
        sweep.config_grid([1], ["PAG"], [], [3])


def test_pending_keeps_grid_order_and_skips_finished(sweep):
    grid = sweep.config_grid([1], ["PAG"], ["down_blocks.0", "mid_block"], [1, 2])
    done = {grid[0].key, grid[2].key}
    left = sweep.pending(grid, done)
    assert left == [grid[1], grid[3], grid[4]]
    assert sweep.pending(grid, {c.key for c in grid}) == []


def test_items_are_seeded_split_and_parseable(sweep):
    from diffattn_bench.scenes import HELD_OUT, parse_caption

    items = sweep.make_items(4, 3, base_seed=7)
    assert items == sweep.make_items(4, 3, base_seed=7)
    assert items != sweep.make_items(4, 3, base_seed=8)
    assert len(items) == 2 * 4 * 3 and [i.split for i in items[:12]] == ["train"] * 12
    assert len({i.noise for i in items}) == len(items)  # every item its own noise
    held = [i for i in items if i.split == "held_out"]
    for item in held[::3]:
        objects, _ = parse_caption(item.caption)
        named = [(o.colour, o.shape) for o in objects]
        # the held-out object is named by colour and shape at least (its pattern may be left open)
        assert any((c, s) in {(k[0], k[1]) for k in HELD_OUT} for c, s in named), item.caption
    with pytest.raises(ValueError, match="unknown split"):
        sweep.make_items(1, 1, splits=["test"])


# ----------------------------------------------------------------------------------------------------------------
# intervals
# ----------------------------------------------------------------------------------------------------------------
def test_wilson_matches_its_closed_form_values(sweep):
    lo, hi = sweep.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = sweep.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = sweep.wilson(81, 263)
    assert lo == pytest.approx(0.2553, abs=1e-4) and hi == pytest.approx(0.3662, abs=1e-4)
    from scipy.stats import binomtest

    for k, n in [(1, 7), (13, 40), (39, 40), (200, 211)]:
        ci = binomtest(k, n).proportion_ci(method="wilson")
        assert sweep.wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)
    assert all(math.isnan(x) for x in sweep.wilson(0, 0))
    with pytest.raises(ValueError):
        sweep.wilson(11, 10)


def test_mcnemar_exact_p(sweep):
    assert sweep.mcnemar_exact_p(0, 6) == pytest.approx(2 / 64)
    assert sweep.mcnemar_exact_p(3, 3) == 1.0 and sweep.mcnemar_exact_p(0, 0) == 1.0
    assert sweep.mcnemar_exact_p(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)


def test_paired_difference_counts_and_point_estimate(sweep):
    method = [True, True, False, True, False, True]
    base = [True, False, False, False, True, False]
    p = sweep.paired_difference(method, base)
    assert (p.n, p.gained, p.lost) == (6, 3, 1)
    assert p.difference == pytest.approx(4 / 6 - 2 / 6)
    assert p.low < p.difference < p.high
    with pytest.raises(ValueError, match="differ in length"):
        sweep.paired_difference([True], [True, False])


def _pairs(rng, n: int, p_base: float, gain: float, loss: float) -> tuple[list[bool], list[bool]]:
    base = rng.random(n) < p_base
    u = rng.random(n)
    method = np.where(base, u >= loss, u < gain)
    return method.tolist(), base.tolist()


def test_paired_interval_agrees_with_the_bootstrap_and_gains_from_pairing(sweep):
    rng = np.random.default_rng(0)
    method, base = _pairs(rng, 400, 0.4, 0.3, 0.05)  # correlated: most pairs concordant
    p = sweep.paired_difference(method, base)
    lo, hi = sweep.paired_bootstrap(method, base, draws=4000)
    assert p.low == pytest.approx(lo, abs=0.015) and p.high == pytest.approx(hi, abs=0.015)
    # unpaired (independent samples) interval of the same rates is wider
    k1, k2, n = sum(method), sum(base), len(method)
    l1, u1 = sweep.wilson(k1, n)
    l2, u2 = sweep.wilson(k2, n)
    d = (k1 - k2) / n
    unpaired = (d - math.hypot(k1 / n - l1, u2 - k2 / n), d + math.hypot(u1 - k1 / n, k2 / n - l2))
    assert p.high - p.low < 0.8 * (unpaired[1] - unpaired[0])


def test_paired_interval_covers_the_true_difference_about_95_percent(sweep):
    rng = np.random.default_rng(1)
    p_base, gain, loss, n = 0.35, 0.25, 0.1, 60
    truth = (1 - p_base) * gain - p_base * loss
    covered = 0
    runs = 1500
    for _ in range(runs):
        p = sweep.paired_difference(*_pairs(rng, n, p_base, gain, loss))
        covered += p.low <= truth <= p.high
    assert 0.93 <= covered / runs <= 0.98, covered / runs


# ----------------------------------------------------------------------------------------------------------------
# resume
# ----------------------------------------------------------------------------------------------------------------
def _meta(sweep, **changes):
    items = [sweep.Item("train", 0, "a red circle", 0, 11), sweep.Item("held_out", 0, "a cyan circle", 0, 12)]
    meta = {"model": "m", "fingerprint": "f", "steps": 4, "batch": 2, "prompts": 1, "seeds": 1}
    meta["items"] = [vars(i) for i in items]
    meta.update(changes)
    return meta


def _records(flags):
    return [{"all": f, "checks": {"colour": [f], "count": [True]}, "change": 3.0 * f} for f in flags]


def test_store_resumes_only_the_same_sweep_and_skips_finished_configs(sweep, tmp_path):
    path = tmp_path / "sweep.json"
    grid = sweep.config_grid([1], ["none", "PAG"], ["mid_block"], [2, 3])
    store = sweep.SweepStore(path, _meta(sweep), resume=False)
    store.add(grid[0], _records([False, True]), 1.0)
    store.add(grid[1], _records([True, True]), 2.0)
    with pytest.raises(FileExistsError, match="--resume"):
        sweep.SweepStore(path, _meta(sweep), resume=False)
    with pytest.raises(ValueError, match="steps: saved 4, now 8"):
        sweep.SweepStore(path, _meta(sweep, steps=8), resume=True)
    again = sweep.SweepStore(path, _meta(sweep), resume=True)
    again.commands.append("python scripts/sweep_guidance.py --quick")
    assert sweep.pending(grid, again.done) == [grid[2]]
    saved = json.loads(path.read_text())
    summary = saved["summary"][grid[1].key]
    assert summary["train"]["paired"]["gained"] == 1 and summary["held_out"]["paired"]["gained"] == 0
    assert summary["seconds_per_image"] == 1.0 and summary["train"]["change"] == 3.0
    table = sweep.markdown_table(again, "python scripts/sweep_guidance.py --quick")
    assert "`python scripts/sweep_guidance.py --quick`" in table and "mid_block" in table


def test_best_layer_ranks_by_the_lower_bound_at_the_lowest_cfg(sweep, tmp_path):
    store = sweep.SweepStore(tmp_path / "sweep.json", _meta(sweep), resume=False)
    base, a, b, high_cfg = (
        sweep.Config(1.0, "none", None, 0.0),
        sweep.Config(1.0, "PAG", "mid_block", 3.0),
        sweep.Config(1.0, "PAG", "up_blocks.1", 3.0),
        sweep.Config(2.0, "PAG", "down_blocks.0", 3.0),
    )
    store.add(base, _records([False, False]), 1.0)
    store.add(a, _records([False, True]), 1.0)  # items: [train, held_out]; ranked on train
    store.add(b, _records([True, True]), 1.0)
    store.add(high_cfg, _records([True, True]), 1.0)  # no CFG-2 baseline and a higher CFG: never chosen
    best = sweep.best_layers(store, sweep.summarize(store))
    assert best["PAG"][0] == b.key


def test_attention_blocks_come_from_the_model_in_flow_order(sweep):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16, 16),
        norm_num_groups=4,
        cross_attention_dim=8,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
    )
    assert sweep.attention_blocks(unet) == ["down_blocks.0", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.2"]
