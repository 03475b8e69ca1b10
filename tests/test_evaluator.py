"""CocoEvaluator: ground truth through the whole data path scores AP 1, known box shifts lower it as expected."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
from torchvision.ops import box_convert, box_iou

from conddetr.config import DataConfig, SyntheticConfig
from conddetr.data import build_datasets
from conddetr.engine.evaluator import STAT_NAMES, CocoEvaluator, format_per_category_table


def _data_cfg(cache_dir, label_mapping: str) -> DataConfig:
    # val_scale 96 < 128: targets come back from a resized image, so the mapping to original pixels is exercised.
    return DataConfig(
        synthetic=SyntheticConfig(cache_dir=str(cache_dir), seed=3, image_size=128, num_train=4, num_val=24),
        label_mapping=label_mapping,
        val_scale=96,
        max_size=160,
    )


@pytest.fixture(scope="module", params=["category_id", "contiguous"])
def val_set(request, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "synthetic_eval"  # shared by both mappings: generated once
    _, val_ds, info = build_datasets(_data_cfg(cache, request.param))
    return val_ds, info


def _gt_detections(val_ds, shift_fraction: float = 0.0) -> dict[int, dict[str, torch.Tensor]]:
    """Each val target as a score-1 detection in original pixels, optionally shifted right by a fraction of width."""
    results = {}
    for index in range(len(val_ds)):
        _, target = val_ds[index]
        h, w = target["orig_size"].tolist()
        boxes = box_convert(target["boxes"], "cxcywh", "xyxy") * torch.tensor([w, h, w, h])  # [N, 4] pixels
        dx = shift_fraction * (boxes[:, 2] - boxes[:, 0])  # [N]
        boxes = boxes + torch.stack([dx, torch.zeros_like(dx), dx, torch.zeros_like(dx)], dim=1)
        results[int(target["image_id"])] = {
            "boxes": boxes,
            "scores": torch.ones(len(boxes)),
            "labels": target["labels"],
        }
    return results


def _without_lookalikes(exact: dict, shifted: dict) -> dict:
    """Images where no shifted box overlaps another same-class ground truth at IoU >= 0.5 (which would match it)."""
    kept = {}
    for image_id, result in shifted.items():
        iou = box_iou(result["boxes"], exact[image_id]["boxes"])  # [N, N] shifted vs ground truth
        same_class = result["labels"][:, None] == result["labels"][None, :]
        others = same_class & ~torch.eye(len(iou), dtype=torch.bool)
        if not (iou[others] >= 0.5).any():
            kept[image_id] = result
    assert len(kept) >= len(shifted) // 2, "too few images left to test"
    return kept


def _evaluate(val_ds, info, results) -> tuple[CocoEvaluator, dict[str, float]]:
    evaluator = CocoEvaluator(val_ds.coco, info.label_to_category)
    evaluator.update(results)
    evaluator.synchronize()
    return evaluator, evaluator.summarize()


def test_ground_truth_scores_ap_one(val_set):
    val_ds, info = val_set
    _, stats = _evaluate(val_ds, info, _gt_detections(val_ds))
    assert list(stats) == list(STAT_NAMES)
    # Every size bucket occurs in the synthetic val set, so all AP / AR (except AR1) are exactly 1.
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR10", "AR100", "ARs", "ARm", "ARl"):
        assert stats[name] == pytest.approx(1.0), name


def test_shift_below_half_iou_drops_ap50_to_zero(val_set):
    val_ds, info = val_set
    # A horizontal shift by d*w gives IoU (1-d)/(1+d): d=0.34 -> 0.49 (< 0.5), d=0.30 -> 0.54 (in [0.5, 0.55)).
    exact = _gt_detections(val_ds)
    _, below = _evaluate(val_ds, info, _without_lookalikes(exact, _gt_detections(val_ds, 0.34)))
    assert below["AP50"] == pytest.approx(0.0)
    assert below["AP"] == pytest.approx(0.0)
    _, above = _evaluate(val_ds, info, _without_lookalikes(exact, _gt_detections(val_ds, 0.30)))
    assert above["AP50"] == pytest.approx(1.0)
    assert above["AP75"] == pytest.approx(0.0)
    assert above["AP"] == pytest.approx(0.1)  # only the 0.50 of the ten IoU thresholds is passed


def test_results_json_uses_dataset_category_ids(val_set, tmp_path):
    val_ds, info = val_set
    results = _gt_detections(val_ds)
    evaluator, _ = _evaluate(val_ds, info, results)
    evaluator.write_results(tmp_path / "results.json")
    written = json.loads((tmp_path / "results.json").read_text())
    assert len(written) == sum(len(r["labels"]) for r in results.values())
    gt_by_image: dict[int, list] = {}
    for ann in val_ds.coco.dataset["annotations"]:
        gt_by_image.setdefault(ann["image_id"], []).append((ann["category_id"], ann["bbox"]))
    for det in written:
        # Each detection is one ground-truth annotation back again: category id and xywh box.
        matches = [b for c, b in gt_by_image[det["image_id"]] if c == det["category_id"]]
        assert matches, det
        best = min(matches, key=lambda b: sum(abs(x - y) for x, y in zip(b, det["bbox"], strict=True)))
        torch.testing.assert_close(
            torch.tensor(det["bbox"]), torch.tensor(best, dtype=torch.float32), atol=1e-3, rtol=0
        )


def test_per_category_ap_table(val_set):
    val_ds, info = val_set
    evaluator, _ = _evaluate(val_ds, info, _gt_detections(val_ds))
    per_category = evaluator.per_category_ap()
    assert per_category == pytest.approx({name: 1.0 for name in info.category_names.values()})
    assert "star" in format_per_category_table(per_category)


def test_zero_detections_and_unknown_labels(val_set):
    val_ds, info = val_set
    empty = {
        i: {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
        for i in val_ds.coco.getImgIds()
    }
    _, stats = _evaluate(val_ds, info, empty)
    assert stats == {name: 0.0 for name in STAT_NAMES}
    # Labels with no dataset category (e.g. unused COCO ids) are ignored rather than scored as a wrong class.
    unknown = {
        i: {
            "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]),
            "scores": torch.ones(1),
            "labels": torch.tensor([info.num_classes + 5]),
        }
        for i in val_ds.coco.getImgIds()
    }
    evaluator, stats = _evaluate(val_ds, info, unknown)
    assert evaluator.detections == []
    assert stats["AP"] == 0.0


def test_repeated_image_counts_once(val_set):
    val_ds, info = val_set
    results = _gt_detections(val_ds)
    evaluator = CocoEvaluator(val_ds.coco, info.label_to_category)
    evaluator.update(results)
    evaluator.update(results)  # DistributedSampler padding repeats images
    evaluator.synchronize()
    assert len(evaluator.detections) == sum(len(r["labels"]) for r in results.values())
    assert evaluator.summarize()["AP"] == pytest.approx(1.0)


def test_summarize_without_images_raises(val_set):
    val_ds, info = val_set
    with pytest.raises(RuntimeError, match="no images"):
        CocoEvaluator(val_ds.coco, info.label_to_category).summarize()


def _gather_worker(rank: int, port: int, val_ds, info, results, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        ids = sorted(results)
        evaluator = CocoEvaluator(val_ds.coco, info.label_to_category)
        evaluator.update({i: results[i] for i in ids[rank::2]})  # each rank sees half of the images
        evaluator.synchronize()
        out[rank] = (evaluator.image_ids == ids, evaluator.summarize()["AP"])
    finally:
        dist.destroy_process_group()


def test_synchronize_gathers_across_ranks(val_set):
    val_ds, info = val_set
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp.Manager().dict()
    tmp.start_processes(
        _gather_worker, args=(port, val_ds, info, _gt_detections(val_ds), out), nprocs=2, start_method="fork"
    )
    # Each rank updated half of the images; after gathering both hold and score all of them.
    assert dict(out) == {0: (True, pytest.approx(1.0)), 1: (True, pytest.approx(1.0))}
