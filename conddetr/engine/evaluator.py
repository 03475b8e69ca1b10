"""COCO bbox evaluation with pycocotools: detections in original pixels -> results JSON -> COCOeval's 12 stats.

Model labels are mapped back to dataset category ids (undoing a contiguous mapping); results are gathered across
ranks when torch.distributed is initialised; pycocotools' prints go to this module's logger.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert

logger = logging.getLogger(__name__)

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@contextlib.contextmanager
def _stdout_to_log() -> Iterator[None]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    for line in buffer.getvalue().splitlines():
        if line.strip():
            logger.debug("pycocotools: %s", line)


class CocoEvaluator:
    """Accumulates per-image detections (`update`), gathers them (`synchronize`) and scores them (`summarize`)."""

    def __init__(self, coco_gt: COCO, label_to_category: dict[int, int]):
        self.coco_gt = coco_gt
        self.label_to_category = {int(k): int(v) for k, v in label_to_category.items()}
        # image_id -> COCO results entries (image_id, category_id, bbox xywh, score). Keyed by image so that an image
        # seen twice (DistributedSampler pads by repeating images) counts once.
        self.results: dict[int, list[dict]] = {}
        self.coco_eval: COCOeval | None = None

    def update(self, results_per_image: dict[int, dict[str, torch.Tensor]]) -> None:
        """`{image_id: {scores [N], labels [N], boxes [N, 4] xyxy in original pixels}}`."""
        for image_id, result in results_per_image.items():
            image_id = int(image_id)
            if image_id not in self.coco_gt.imgs:
                raise KeyError(f"image_id {image_id} is not in the ground-truth annotations")
            boxes = result["boxes"].detach().float().cpu()  # [N, 4] xyxy
            xywh = box_convert(boxes, "xyxy", "xywh").tolist()  # [N, 4] COCO results format
            scores = result["scores"].detach().float().cpu().tolist()
            labels = result["labels"].detach().cpu().tolist()
            entries = []
            for box, score, label in zip(xywh, scores, labels, strict=True):
                category = self.label_to_category.get(int(label))
                if category is None:
                    continue  # a logit with no dataset category (e.g. unused COCO ids): it can match nothing
                entries.append({"image_id": image_id, "category_id": category, "bbox": box, "score": score})
            self.results.setdefault(image_id, entries)

    @property
    def image_ids(self) -> list[int]:
        return sorted(self.results)

    @property
    def detections(self) -> list[dict]:
        return [det for image_id in self.image_ids for det in self.results[image_id]]

    def synchronize(self) -> None:
        """Gather every rank's detections onto every rank (a no-op without an initialised process group)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.results)
            merged: dict[int, list[dict]] = {}
            for rank_results in gathered:
                for image_id, entries in rank_results.items():
                    merged.setdefault(image_id, entries)
            self.results = merged

    def _results_coco(self) -> COCO:
        if self.detections:
            with _stdout_to_log():
                return self.coco_gt.loadRes(copy.deepcopy(self.detections))
        # loadRes cannot take an empty list; an empty results set scores 0 wherever there is ground truth.
        empty = COCO()
        empty.dataset = {"images": list(self.coco_gt.dataset["images"]), "annotations": []}
        empty.dataset["categories"] = copy.deepcopy(self.coco_gt.dataset["categories"])
        with _stdout_to_log():
            empty.createIndex()
        return empty

    def summarize(self) -> dict[str, float]:
        """COCOeval bbox over the evaluated images: the 12 stats by name (fractions; -1 where no ground truth)."""
        if not self.image_ids:
            raise RuntimeError("CocoEvaluator.summarize() before any update(): no images were evaluated")
        coco_dt = self._results_coco()
        coco_eval = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
        coco_eval.params.imgIds = list(self.image_ids)
        with _stdout_to_log():
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        self.coco_eval = coco_eval
        return {name: float(value) for name, value in zip(STAT_NAMES, coco_eval.stats, strict=True)}

    def write_results(self, path: str | Path) -> None:
        """COCO results JSON (dataset category ids, xywh boxes), as the COCO evaluation server expects."""
        Path(path).write_text(json.dumps(self.detections))

    def per_category_ap(self) -> dict[str, float]:
        """AP@[.5:.95] per category name (all areas, 100 detections); -1 for categories without ground truth."""
        if self.coco_eval is None:
            raise RuntimeError("per_category_ap() needs summarize() first")
        precision = self.coco_eval.eval["precision"]  # [T, R, K, A, M]: IoU, recall, category, area, max dets
        result = {}
        for k, category_id in enumerate(self.coco_eval.params.catIds):
            p = precision[:, :, k, 0, -1]
            valid = p[p > -1]
            result[self.coco_gt.cats[category_id]["name"]] = float(np.mean(valid)) if valid.size else -1.0
        return result


def format_per_category_table(ap_per_category: dict[str, float]) -> str:
    """A two-column text table of per-category AP (in %), for logs."""
    width = max((len(name) for name in ap_per_category), default=8)
    lines = [f"{'category':<{width}}  AP"]
    lines += [f"{name:<{width}}  {100 * ap:5.1f}" for name, ap in ap_per_category.items()]
    return "\n".join(lines)
