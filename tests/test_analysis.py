"""Tests of conddetr.analysis: epochs-to-AP and speedups on hand-made curves, band scores on known maps, plots."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from conddetr.analysis import bands, convergence
from conddetr.analysis.convergence import Curve, convergence_speedup, epochs_to_reach

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def curve(points: dict[float, float]) -> Curve:
    return Curve(tuple(points), tuple(points.values()))


def test_epochs_to_reach_interpolates_between_evaluations():
    c = curve({1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4})
    assert epochs_to_reach(c, 0.25) == pytest.approx(2.5)
    assert epochs_to_reach(c, 0.3) == pytest.approx(3.0)  # an exact hit is that epoch
    assert epochs_to_reach(c, 0.05) == 1  # reached at the first evaluation: no origin is invented
    assert epochs_to_reach(c, 0.41) is None  # never reached: not extrapolated


def test_epochs_to_reach_non_monotone_takes_first_crossing():
    c = curve({1: 0.1, 2: 0.3, 3: 0.2, 4: 0.35})
    assert epochs_to_reach(c, 0.25) == pytest.approx(1.75)
    assert epochs_to_reach(c, 0.32) == pytest.approx(3.8)  # the dip after epoch 2 must not count as reached


def test_curve_rejects_unsorted_epochs_and_length_mismatch():
    with pytest.raises(ValueError, match="strictly increasing"):
        Curve((1.0, 1.0), (0.1, 0.2))
    with pytest.raises(ValueError, match="2 epochs but 1 values"):
        Curve((1.0, 2.0), (0.1,))


def test_speedup_matches_paper_style_comparison():
    detr = curve({100: 0.30, 300: 0.40, 500: 0.42})
    cond = curve({25: 0.35, 50: 0.41, 100: 0.43})
    s = convergence_speedup(detr, cond)  # target = DETR's final AP over its whole 500-epoch schedule
    assert s.target == 0.42 and s.epochs_a == 500
    assert s.epochs_b == pytest.approx(75.0)
    assert s.ratio == pytest.approx(500 / 75)
    assert "6.67x" in s.describe("DETR", "Conditional DETR")


def test_speedup_is_none_when_run_b_never_reaches_target():
    detr = curve({10: 0.30, 20: 0.42})
    slow = curve({10: 0.20, 20: 0.41})
    s = convergence_speedup(detr, slow)
    assert s.epochs_b is None and s.ratio is None and s.lower_bound is None
    assert "never reached" in s.describe()


def test_speedup_only_lower_bound_when_run_a_never_reaches_explicit_target():
    detr = curve({10: 0.30, 20: 0.35})
    cond = curve({5: 0.30, 10: 0.40})
    s = convergence_speedup(detr, cond, target=0.38)
    assert s.epochs_a is None and s.ratio is None
    assert s.epochs_b == pytest.approx(9.0)
    assert s.lower_bound == pytest.approx(20 / 9)
    assert "at least 2.22x" in s.describe()


def test_speedup_explicit_target_interpolates_both_runs():
    s = convergence_speedup(curve({10: 0.1, 20: 0.3}), curve({2: 0.1, 4: 0.3}), target=0.2)
    assert (s.epochs_a, s.epochs_b, s.ratio) == pytest.approx((15.0, 3.0, 5.0))


def test_published_table_and_speedups():
    rows = {(r.variant, r.backbone, r.epochs): r.AP for r in convergence.PUBLISHED}
    assert rows[("detr", "R50", 500)] == 42.0 and rows[("conditional", "R50", 50)] == 41.0
    speedups = convergence.published_speedups()
    # DC5: 50 Conditional epochs beat DETR's 500 -> 10x; R50 needs a longer Conditional schedule than listed here.
    assert speedups == {"R50": None, "DC5-R50": 10.0, "R101": None, "DC5-R101": 10.0}


def write_metrics(run_dir, lines):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_load_run_reads_curves_and_resumed_duplicates_keep_last(tmp_path):
    write_metrics(
        tmp_path / "run",
        [
            {"step": 5, "epoch": 0.5, "train/loss": 3.0, "train/lr": 1e-4},
            {"step": 10, "epoch": 1.0, "train/loss": 2.5},
            {"step": 10, "epoch": 1.0, "val/AP": 0.05, "val/AP50": 0.1},
            {"step": 15, "epoch": 1.5, "train/loss": 2.7},
            {"step": 15, "epoch": 1.5, "train/loss": 2.2},  # re-logged after a resume
            {"step": 20, "epoch": 2.0, "val/AP": 0.08, "val/AP50": 0.2},
        ],
    )
    run = convergence.load_run(tmp_path / "run", name="Conditional DETR")
    assert run.name == "Conditional DETR"
    assert run.ap() == Curve((1.0, 2.0), (0.05, 0.08))
    assert run.ap("AP50") == Curve((1.0, 2.0), (0.1, 0.2))
    assert run.train_loss == Curve((0.5, 1.0, 1.5), (3.0, 2.5, 2.2))
    with pytest.raises(KeyError, match="val/AP75"):
        run.ap("AP75")


def test_load_run_falls_back_to_epoch_mean_loss(tmp_path):
    write_metrics(tmp_path / "short", [{"step": 2, "epoch": 1.0, "train_epoch/loss": 4.0, "val/AP": 0.0}])
    assert convergence.load_run(tmp_path / "short").train_loss == Curve((1.0,), (4.0,))


def test_load_run_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        convergence.load_run(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1, "epoch": 0.1}\n{"step": 2, "epo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"bad/metrics.jsonl: line 2 is not valid JSON"):
        convergence.load_run(tmp_path / "bad")
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1, "val/AP": 0.1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: row 1: expected an object with a numeric 'epoch'"):
        convergence.load_run(tmp_path / "bad")


def test_load_run_leaves_out_coco_minus_one(tmp_path):
    write_metrics(tmp_path / "r", [{"step": i, "epoch": i, "val/AP": 0.1 * i, "val/APl": -1.0} for i in (1, 2)])
    run = convergence.load_run(tmp_path / "r")
    assert run.ap("AP") == Curve((1.0, 2.0), (0.1, 0.2))
    assert "APl" not in run.val


def test_convergence_plots_write_pngs_with_correct_labels(tmp_path):
    write_metrics(tmp_path / "a", [{"step": i, "epoch": i, "train/loss": 3 - i, "val/AP50": 0.1 * i} for i in (1, 2)])
    runs = [convergence.load_run(tmp_path / "a")]
    figs = {
        "ap50": convergence.plot_ap_curves(runs, metric="AP50", target=0.15),
        "loss": convergence.plot_train_loss(runs),
        "published": convergence.plot_published(),
    }
    assert figs["ap50"].axes[0].get_ylabel() == "val AP50"
    assert figs["published"].axes[0].get_ylabel() == "COCO val AP"
    for name, fig in figs.items():
        labels = [ax.get_ylabel() + ax.get_title() + ax.get_xlabel() for ax in fig.axes]
        assert not any("mAP" in s for s in labels), labels
        fig.savefig(tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG_MAGIC


# ---- bands -------------------------------------------------------------------------------------------------------


def test_region_masks_partition_the_grid():
    regions = bands.region_masks(torch.tensor([0.4, 0.6, 0.3, 0.5]), 12, 10)
    count = torch.stack(list(regions.values())).sum(0)
    torch.testing.assert_close(count, torch.ones(12, 10, dtype=torch.int64))
    assert all(regions[name].any() for name in ("left", "right", "top", "bottom", "centre", "outside"))


def test_band_stats_on_known_masses():
    box = torch.tensor([0.5, 0.5, 0.5, 0.5])  # x, y in [0.25, 0.75]; band half-width 0.125 = 2 cells of 16
    maps = torch.zeros(2, 16, 16)
    maps[0, 6:10, 4] = 0.15  # 0.6 on the column next to the left edge
    maps[0, 8, 8] = 0.3  # centre
    maps[0, 0, 0] = 0.1  # outside the box
    maps[1, 4, 5:11] = 2.0  # unnormalised mass all on the top edge: fractions still sum to one
    stats = bands.band_stats(maps, box)
    expected = {
        "left": [0.6, 0.0],
        "right": [0.0, 0.0],
        "top": [0.0, 1.0],
        "bottom": [0.0, 0.0],
        "centre": [0.3, 0.0],
        "outside": [0.1, 0.0],
        "extremity": [0.6, 1.0],
        "edge_share": [2 / 3, 1.0],
        # 16 centre cells (rows/cols 6..9); the ring is 4 bands of 4 x 12 cells minus 4 doubly counted 4 x 4 corners.
        "edge_share_flat": [128 / 144, 128 / 144],
    }
    for key, value in expected.items():
        torch.testing.assert_close(stats[key], torch.tensor(value), msg=key)


def _band_maps(h: int = 16, w: int = 16) -> torch.Tensor:
    """Hand-made maps around the box x, y in [0.25, 0.75] of a 16 x 16 grid (cells 4..11)."""
    maps = torch.full((5, h, w), 1.0)  # 0: flat
    maps[1] = 0.05
    maps[1, 4:12, 3:5] = 1.0  # 1: a band straddling the left side (cells 3 and 4)
    maps[2] = 0.05
    maps[2, 10:13, 4:12] = 1.0  # 2: a band on the bottom side
    maps[3] = 0.05
    maps[3, 7:9, 7:9] = 1.0  # 3: a blob at the centre
    maps[4] = torch.rand(h, w, generator=torch.Generator().manual_seed(0))  # 4: noise without structure
    return maps


def test_band_score_tells_a_banded_map_from_a_flat_one():
    box = torch.tensor([0.5, 0.5, 0.5, 0.5])
    stats = bands.band_stats(_band_maps(), box)
    # A flat map scores exactly 1 on every side, whatever the grid and the box.
    for side in bands.SIDES:
        torch.testing.assert_close(stats[f"contrast_{side}"][0], torch.tensor(1.0))
    score = stats["band_score"]
    assert score[1] > 2.5 and score[2] > 2.5, score  # bands: far above flat...
    assert float(stats["contrast_left"][1]) == float(score[1])  # ...on the side they hug
    assert float(stats["contrast_bottom"][2]) == float(score[2])
    assert float(stats["contrast_right"][1]) < 0.5 and float(stats["contrast_top"][2]) < 0.5
    assert score[3] < 0.7  # a centre blob lies on no side: below flat
    assert 0.8 < score[4] < 1.5  # unstructured noise stays near flat
    # The old share-of-mass measure cannot tell the flat map from a band: that is why it is not the score.
    assert stats["edge_share"][0] > 0.85 and stats["edge_share"][1] > 0.85


def test_edge_contrast_respects_the_unpadded_fraction():
    # The lower half of the grid is padding: the box (normalised to the real image) covers rows 2..5, not 4..11.
    maps = torch.full((1, 16, 16), 0.05)
    maps[0, 5:7, 4:12] = 1.0  # on the bottom side of the box in the unpadded image
    box = torch.tensor([0.5, 0.5, 0.5, 0.5])
    padded = bands.edge_contrast(maps, box, valid=(0.5, 1.0))
    assert max(padded, key=lambda s: float(padded[s])) == "bottom"
    assert float(padded["bottom"]) > 2


def test_band_stats_uses_unpadded_fraction():
    # A grid whose lower half is padding: the box (normalised to the real image) covers grid rows 0.125..0.375.
    maps = torch.zeros(1, 16, 16)
    maps[0, 5, 8] = 1.0  # v = 0.344: near the box's bottom edge on the padded grid, its top edge without padding
    box = torch.tensor([0.5, 0.5, 0.5, 0.5])
    torch.testing.assert_close(bands.band_stats(maps, box, valid=(0.5, 1.0))["bottom"], torch.tensor([1.0]))
    torch.testing.assert_close(bands.band_stats(maps, box)["top"], torch.tensor([1.0]))


def test_query_scores_per_variant():
    logits = torch.tensor([[[0.0, 2.0, 1.0], [3.0, -1.0, 0.0]]])  # [B=1, Q=2, C=3]
    torch.testing.assert_close(bands.query_scores(logits, "conditional"), torch.tensor([[2.0, 3.0]]).sigmoid())
    probs = logits.softmax(-1)
    torch.testing.assert_close(bands.query_scores(logits, "detr"), probs[..., :2].amax(-1))
    with pytest.raises(ValueError, match="variant"):
        bands.query_scores(logits, "deformable")


class FakeDetector(nn.Module):
    """Returns the documented output contract with known values, independent of the real models."""

    def __init__(self, L=2, heads=2, Q=3, C=4, h=4, w=5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.logits = torch.randn(1, Q, C, generator=g)
        self.logits[0, 2, 1] = 10.0  # query 2 is the most confident
        self.boxes = torch.rand(L, 1, Q, 4, generator=g) * 0.5 + 0.25
        self.attn = {
            k: torch.rand(L, 1, heads, Q, h * w, generator=g).softmax(-1).view(L, 1, heads, Q, h, w)
            for k in bands.KINDS
        }

    def forward(self, images, mask, return_attention=False):
        B = images.shape[0]
        out = {"pred_logits": self.logits.expand(B, -1, -1), "pred_boxes": self.boxes[-1].expand(B, -1, -1)}
        out["aux_outputs"] = [{"pred_logits": self.logits, "pred_boxes": b.expand(B, -1, -1)} for b in self.boxes[:-1]]
        if return_attention:
            out["cross_attention"] = {k: v.expand(-1, B, -1, -1, -1, -1) for k, v in self.attn.items()}
        return out


def test_query_attention_selects_best_query_and_layer_box():
    model = FakeDetector().train()
    images, mask = torch.zeros(2, 3, 64, 80), torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, 32:, :] = True  # the second image is half padding
    mask[1, :, 60:] = True
    qa = bands.query_attention(model, images, mask, "conditional", layer=0, image_index=1)
    assert model.training  # mode restored
    assert (qa.query, qa.layer, qa.valid_hw, qa.valid_frac) == (2, 0, (32, 60), (0.5, 0.75))
    torch.testing.assert_close(qa.box, model.boxes[0, 0, 2])
    for kind in bands.KINDS:
        torch.testing.assert_close(qa.maps[kind], model.attn[kind][0, 0, :, 2])
    expected = bands.band_stats(model.attn["spatial"][0, 0, :, 2], qa.box, valid=(0.5, 0.75))
    torch.testing.assert_close(qa.stats, expected)
    with pytest.raises(IndexError, match="layer 2 out of range"):
        bands.query_attention(model, images, mask, "conditional", layer=2)


def test_query_attention_rejects_model_without_attention():
    class NoAttention(FakeDetector):
        def forward(self, images, mask, return_attention=False):
            return super().forward(images, mask, return_attention=False)

    with pytest.raises(KeyError, match="cross_attention"):
        bands.query_attention(NoAttention(), torch.zeros(1, 3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool), "detr")


def test_plot_bands_writes_png(tmp_path):
    model = FakeDetector(heads=3)
    images, mask = torch.randn(1, 3, 64, 80), torch.zeros(1, 64, 80, dtype=torch.bool)
    qa = bands.query_attention(model, images, mask, "detr")
    fig = bands.plot_bands(images[0], qa)
    assert len(fig.axes) == 3 * len(bands.KINDS)
    assert [fig.axes[3 * r].get_ylabel() for r in range(3)] == list(bands.KINDS)
    fig.savefig(tmp_path / "bands.png")
    assert (tmp_path / "bands.png").read_bytes()[:8] == PNG_MAGIC
    assert math.isfinite(float(qa.stats["band_score"].sum()))


def test_report_group_is_the_one_the_compared_runs_share(tmp_path):
    from conddetr.analysis import report
    from conddetr.config import load_config, save_config

    for name, overrides in {"a": ["name=exp"], "b": ["name=exp", "optim.lr=2e-4"], "c": ["name=other"]}.items():
        (tmp_path / name).mkdir()
        save_config(load_config(None, overrides), tmp_path / name)
    assert report.shared_tracking([tmp_path / "a", tmp_path / "b"]) == {"project": "conddetr", "group": "exp"}
    assert report.shared_tracking([tmp_path / "a", tmp_path / "c"]) == {"project": "conddetr", "group": None}
    assert report.shared_tracking([tmp_path / "a", tmp_path / "none"]) == {"project": None, "group": None}
    s = convergence.Speedup(0.3, 8.0, 2.0, 8.0, 4.0, 4.0, None)
    table = report.speedup_table({"Conditional DETR": s}, "DETR", published=False)
    assert table == {
        "columns": report.SPEEDUP_COLUMNS,
        "rows": [["Conditional DETR", "DETR", "AP", 30.0, 2.0, 8.0, 4.0, None, "these runs"]],
    }
    assert report.log_report(tmp_path / "off", {}, {}, mode="disabled") is None
