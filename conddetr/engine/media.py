"""Validation pictures for W&B at each evaluation: a fixed set of val images with predicted and true boxes.

Plain data only (uint8 arrays and W&B's box-dict format); `Tracker.log_media` turns them into `wandb.Image`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

log = logging.getLogger(__name__)

MAX_PREDICTIONS = 30  # best-scoring boxes per image; the W&B UI filters them further by score


def media_indices(num_images: int, count: int) -> list[int]:
    """`count` val indices spread evenly over the set (first and last included), the same at every evaluation."""
    count = min(count, num_images)
    if count <= 0:
        return []
    if count == 1:
        return [0]
    return sorted({round(i * (num_images - 1) / (count - 1)) for i in range(count)})


def box_data(boxes, labels, names: Mapping[int, str], scores=None) -> list[dict]:
    """W&B box entries (pixel domain) from xyxy `boxes` [N, 4], `labels` [N] and optional `scores` [N]."""
    entries = []
    for i, ((x0, y0, x1, y1), label) in enumerate(zip(boxes, labels, strict=True)):
        label = int(label)
        caption = names.get(label, f"class {label}")
        entry = {
            "position": {"minX": float(x0), "minY": float(y0), "maxX": float(x1), "maxY": float(y1)},
            "domain": "pixel",
            "class_id": label,
        }
        if scores is not None:
            entry["scores"] = {"score": float(scores[i])}
            caption = f"{caption} {float(scores[i]):.2f}"
        entry["box_caption"] = caption
        entries.append(entry)
    return entries


@torch.no_grad()
def val_media(
    model: torch.nn.Module,
    postprocessor,
    val_ds,
    indices: Sequence[int],
    names: Mapping[int, str],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> list[dict]:
    """One W&B image item per index: the file's pixels, `predictions` and `ground_truth` boxes (model labels)."""
    from conddetr.data.batching import collate

    if not indices:
        return []
    # The val transforms draw from torch's RNG: leave the training stream exactly as it was.
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        images, mask, targets = collate([val_ds[i] for i in indices])
        was_training = model.training
        model.eval()
        try:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                outputs = model(images.to(device), mask.to(device))
        finally:
            model.train(was_training)
    outputs = {k: outputs[k].float() for k in ("pred_logits", "pred_boxes")}
    results = postprocessor(outputs, torch.stack([t["orig_size"] for t in targets]).to(device))
    class_labels = {int(k): str(v) for k, v in names.items()}
    items = []
    for index, target, result in zip(indices, targets, results, strict=True):
        best = result["scores"].argsort(descending=True)[:MAX_PREDICTIONS].cpu()
        record = val_ds.records[index]
        predictions = box_data(
            result["boxes"].cpu()[best].tolist(), result["labels"].cpu()[best].tolist(), names,
            result["scores"].cpu()[best].tolist(),
        )  # fmt: skip
        truth = box_data(record.boxes.tolist(), record.labels.tolist(), names)
        items.append(
            {
                "image": val_ds.read_image(index).permute(1, 2, 0).numpy(),  # [H, W, 3] uint8, as on disk
                "caption": f"image id {int(target['image_id'])} ({record.file_name})",
                "boxes": {
                    "predictions": {"box_data": predictions, "class_labels": class_labels},
                    "ground_truth": {"box_data": truth, "class_labels": class_labels},
                },
            }
        )
    return items


def per_category_table(stats: Mapping[str, float]) -> dict | None:
    """The per-category AP of an evaluation (`AP_per_category/<name>` stats) as a table, or None without them."""
    prefix = "AP_per_category/"
    rows = [[key[len(prefix) :], float(v)] for key, v in stats.items() if key.startswith(prefix)]
    return {"columns": ["category", "AP"], "rows": rows} if rows else None


def log_val_media(tracker, c, count: int, stats: Mapping[str, float], *, step: int, epoch: float, device, amp_dtype):
    """Log `count` fixed val images with boxes (and the per-category AP table) through `tracker` (rank 0, W&B on).

    `c` is the run's `engine.setup.Components`. Any failure here is logged and training goes on.
    """
    if not tracker.logs_media:
        return
    try:
        media: dict = {}
        indices = media_indices(len(c.val_ds), count)
        if indices:
            media["val/predictions"] = val_media(
                c.model, c.postprocessor, c.val_ds, indices, c.info.category_names, device, amp_dtype
            )
        table = per_category_table(stats)
        if table is not None:
            media["val/AP_per_category_table"] = table
        tracker.log_media(media, step=step, epoch=epoch)
    except Exception:
        log.warning("could not log validation images to W&B; training goes on", exc_info=True)
