"""Convergence over seeds: study folders grouped by model and seed, mean/std per epoch, speed-up per seed."""

from __future__ import annotations

import json
import math

import pytest

from conddetr.analysis import seeds
from conddetr.config import load_config, save_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(folder, variant: str, seed: int, aps: dict[int, float]) -> None:
    folder.mkdir(parents=True)
    save_config(load_config(None, [f"model.variant={variant}", f"optim.seed={seed}"]), folder)
    rows = [{"step": e, "epoch": float(e), "val/AP": ap} for e, ap in aps.items()]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def study(tmp_path):
    # DETR runs 3x longer, as the paper's 500 vs 50 epochs; Conditional DETR passes DETR's final AP early.
    write_run(tmp_path / "a", "conditional", 1, {1: 0.2, 2: 0.4, 3: 0.5})
    write_run(tmp_path / "b", "conditional", 2, {1: 0.1, 2: 0.3, 3: 0.6})
    write_run(tmp_path / "c", "detr", 1, {3: 0.1, 6: 0.2, 9: 0.3})
    write_run(tmp_path / "d", "detr", 2, {3: 0.05, 6: 0.1, 9: 0.2})
    (tmp_path / "not_started").mkdir()  # a pending array task: no metrics yet
    return tmp_path


def test_load_study_groups_by_variant_and_seed(study):
    groups = seeds.load_study(study)
    assert {v: sorted(runs) for v, runs in groups.items()} == {"conditional": [1, 2], "detr": [1, 2]}
    assert groups["detr"][2].run_dir == study / "d"


def test_aggregate_mean_and_sample_std_at_common_epochs(study):
    groups = seeds.load_study(study)
    stats = seeds.aggregate(list(groups["conditional"].values()))
    assert stats.epochs == (1.0, 2.0, 3.0) and stats.seeds == 2
    assert stats.mean == pytest.approx((0.15, 0.35, 0.55))
    assert stats.std == pytest.approx((math.sqrt(0.005),) * 3)
    one = seeds.aggregate([groups["detr"][1]])
    assert one.std == (0.0, 0.0, 0.0)


def test_speedups_per_seed(study):
    groups = seeds.load_study(study)
    per_seed = seeds.speedups_per_seed(groups["detr"], groups["conditional"])
    # seed 1: DETR's final 0.3 reached at 1.5 epochs -> 9 / 1.5 = 6x; seed 2: 0.2 at 1.333 epochs -> 6.75x
    assert per_seed[1].ratio == pytest.approx(6.0)
    assert per_seed[2].ratio == pytest.approx(9 / (1 + 0.1 / 0.2))
    with pytest.raises(ValueError, match="no seed in common"):
        seeds.speedups_per_seed({3: groups["detr"][1]}, groups["conditional"])


def test_study_errors_name_the_folder(tmp_path, study):
    with pytest.raises(FileNotFoundError, match="no study folder"):
        seeds.load_study(tmp_path / "absent")
    write_run(study / "e", "detr", 1, {3: 0.1})
    with pytest.raises(ValueError, match="both detr with optim.seed=1"):
        seeds.load_study(study)


def test_plot_seed_curves_writes_png(study, tmp_path):
    groups = seeds.load_study(study)
    fig = seeds.plot_seed_curves({"DETR": list(groups["detr"].values()), "Cond": list(groups["conditional"].values())})
    fig.savefig(tmp_path / "seeds.png")
    assert (tmp_path / "seeds.png").read_bytes()[:8] == PNG_MAGIC
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        "DETR (mean of 2 seeds)",
        "Cond (mean of 2 seeds)",
    ]
