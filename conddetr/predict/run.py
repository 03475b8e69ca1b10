"""The predict loop: read, resize as at evaluation, detect, draw a PNG per image, one COCO results JSON for all.

`--attention` adds per-head cross-attention figures of the top detections, made by `conddetr.analysis.bands` (the
library behind the attention notebook). Results gathered so far are written even when the loop stops early.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from conddetr.predict.draw import Drawn, draw_detections
from conddetr.predict.inputs import InputImage, UnreadableImage, read_image
from conddetr.predict.loading import Predictor

log = logging.getLogger(__name__)

RESULTS_NAME = "detections.json"  # COCO results: [{"image_id", "category_id", "bbox" xywh, "score"}]
IMAGES_NAME = "images.json"  # COCO-format image list + categories: COCO(images.json).loadRes(detections.json)


@dataclass
class AttentionOptions:
    top: int = 3  # detections per image whose maps are drawn
    layer: int = -1  # decoder layer (negative counts from the last)


@dataclass
class Summary:
    images: int = 0
    detections: int = 0
    skipped: list[str] = field(default_factory=list)  # one message per unreadable input
    seconds: float = 0.0  # wall time of the whole loop
    model_seconds: float = 0.0  # forward passes and post-processing only
    written: list[Path] = field(default_factory=list)  # drawn PNGs


@torch.no_grad()
def detect(predictor: Predictor, pils: list, threshold: float, attention: bool = False):
    """Detections per image (score >= threshold, best first) as (label, score, xyxy in file pixels); and, with
    `attention`, (images, mask, outputs, cross-attention maps) for the figures."""
    from conddetr.analysis import bands
    from conddetr.data.batching import collate
    from conddetr.data.transforms import build_val_transforms
    from conddetr.models import build_postprocessor

    transform = build_val_transforms(predictor.val_scale, predictor.max_size)
    tensors = [transform(tv_tensors.Image(F.pil_to_tensor(p))).as_subclass(torch.Tensor) for p in pils]
    images, mask, _ = collate([(t, {}) for t in tensors])  # [B, 3, H, W], [B, H, W]
    images, mask = images.to(predictor.device), mask.to(predictor.device)
    if attention:
        outputs, attn = bands.cross_attention(predictor.model, images, mask)
    else:
        outputs, attn = predictor.model(images, mask), None
    sizes = torch.tensor([[p.height, p.width] for p in pils], device=predictor.device)  # [B, 2] (h, w) on disk
    results = build_postprocessor(predictor.variant)(outputs, sizes)
    per_image = []
    for result in results:
        order = result["scores"].argsort(descending=True, stable=True).cpu()  # ties keep top-k order
        scores, labels, boxes = (result[k].cpu()[order] for k in ("scores", "labels", "boxes"))
        known = predictor.label_to_category
        keep = [i for i in range(len(scores)) if scores[i] >= threshold and int(labels[i]) in known]
        per_image.append([(int(labels[i]), float(scores[i]), boxes[i].tolist()) for i in keep])
    return per_image, ((images, mask, outputs, attn) if attention else None)


def attention_figures(predictor: Predictor, extras, index: int, threshold: float, options: AttentionOptions):
    """(rank, figure) of the `options.top` best queries of image `index` scoring >= threshold."""
    from conddetr.analysis import bands

    images, mask, outputs, attn = extras
    scores = bands.query_scores(outputs["pred_logits"][index], predictor.variant)  # [Q]
    figures = []
    for rank, query in enumerate(scores.argsort(descending=True)[: options.top].tolist(), start=1):
        if scores[query] < threshold:
            break
        qa = bands.attention_of_query(outputs, attn, mask, predictor.variant, options.layer, index, query)
        logits = outputs["pred_logits"][index, query]
        label = int((logits if predictor.variant == "conditional" else logits[:-1]).argmax())
        title = f"{predictor.label_name(label)} {qa.score:.2f}: query {query}, decoder layer {qa.layer}"
        figures.append((rank, bands.plot_bands(images[index], qa, title=title)))
    return figures


def _unique_name(stem: str, used: set[str]) -> str:
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}_{n}"
    used.add(name)
    return name


def predict(
    predictor: Predictor,
    inputs: list[InputImage],
    out_dir: Path,
    *,
    threshold: float = 0.5,
    batch_size: int = 1,
    attention: AttentionOptions | None = None,
    show_progress: bool = False,
) -> Summary:
    """Predict every input; unreadable ones are logged and skipped. Writes PNGs, detections.json and images.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary, results, images, used = Summary(), [], [], set()
    start = time.perf_counter()
    bar = tqdm(total=len(inputs), unit="img", desc="predict", disable=not show_progress, dynamic_ncols=True)
    try:
        for first in range(0, len(inputs), batch_size):
            batch = []
            for item in inputs[first : first + batch_size]:
                try:
                    batch.append((item, read_image(item)))
                except UnreadableImage as err:
                    log.warning("skipping: %s", err)
                    summary.skipped.append(str(err))
                    bar.update(1)
            if not batch:
                continue
            t0 = time.perf_counter()
            per_image, extras = detect(predictor, [pil for _, pil in batch], threshold, attention is not None)
            summary.model_seconds += time.perf_counter() - t0
            for index, ((item, pil), found) in enumerate(zip(batch, per_image, strict=True)):
                name = _unique_name(item.path.stem, used)
                drawn = [Drawn(box, f"{predictor.label_name(label)} {score:.2f}", predictor.label_to_category[label])
                         for label, score, box in reversed(found)]  # fmt: skip
                draw_detections(pil, drawn).save(out_dir / f"{name}.png")
                summary.written.append(out_dir / f"{name}.png")
                for label, score, (x0, y0, x1, y1) in found:
                    box = [round(v, 3) for v in (x0, y0, x1 - x0, y1 - y0)]
                    category = predictor.label_to_category[label]
                    results.append({"image_id": item.image_id, "category_id": category, "bbox": box, "score": score})
                images.append({"id": item.image_id, "file_name": str(item.path), "width": pil.width,
                               "height": pil.height, "drawn": f"{name}.png"})  # fmt: skip
                summary.images += 1
                summary.detections += len(found)
                if attention is not None:
                    (out_dir / "attention").mkdir(exist_ok=True)
                    for rank, fig in attention_figures(predictor, extras, index, threshold, attention):
                        fig.savefig(out_dir / "attention" / f"{name}_top{rank}.png", dpi=100)
                bar.update(1)
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - start
        _write_json(out_dir, predictor, results, images)
    return summary


def _write_json(out_dir: Path, predictor: Predictor, results: list[dict], images: list[dict]) -> None:
    (out_dir / RESULTS_NAME).write_text(json.dumps(results))
    ids = sorted(set(predictor.label_to_category.values()))
    categories = [{"id": cid, "name": predictor.category_names.get(cid, f"class {cid}")} for cid in ids]
    coco = {"images": images, "annotations": [], "categories": categories}
    (out_dir / IMAGES_NAME).write_text(json.dumps(coco, indent=1))
