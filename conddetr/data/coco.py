"""COCO-format detection datasets: validated annotation reading, published target conversion and label mappings.

Targets follow the published DETR recipe: crowd boxes dropped, xywh -> xyxy, clamped to the image, degenerate boxes
dropped (counted in one warning per dataset), images without boxes kept.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms.v2 import functional as F

logger = logging.getLogger(__name__)

LABEL_MAPPINGS = ("category_id", "contiguous")


class DatasetError(ValueError):
    """Bad dataset input; the message names the file and the image or annotation at fault."""


@dataclass
class DatasetInfo:
    num_classes: int  # logits: max category id + 1 (category_id mapping, 91 for COCO) or K (contiguous)
    label_to_category: dict[int, int]  # model label -> dataset category id; saved with the run, undone at evaluation
    category_names: dict[int, str]  # model label -> category name
    label_mapping: str  # category_id | contiguous


@dataclass
class ImageRecord:
    image_id: int
    file_name: str
    height: int
    width: int
    boxes: np.ndarray  # [N, 4] float32 xyxy pixels, clamped to the image, non-degenerate
    labels: np.ndarray  # [N] int64 model labels


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_annotation_file(path: str | Path) -> dict:
    """Parse and validate a COCO instances file; every problem raises `DatasetError` naming the file and record."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"annotation file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"annotation file {path} is not UTF-8 text: {err}") from None
    if not text.strip():
        raise DatasetError(f"annotation file {path} is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(
            f"annotation file {path} is malformed JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None
    if not isinstance(data, dict):
        raise DatasetError(f"annotation file {path}: top level must be an object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"annotation file {path}: key '{key}' is missing or not a list")
    if not data["images"]:
        raise DatasetError(f"annotation file {path} lists no images")
    if not data["categories"]:
        raise DatasetError(f"annotation file {path} lists no categories")
    _validate_records(data, path)
    return data


def _validate_records(data: dict, path: Path) -> None:
    image_ids: set[int] = set()
    for image in data["images"]:
        ok = isinstance(image, dict) and _is_int(image.get("id")) and isinstance(image.get("file_name"), str)
        ok = ok and all(_is_int(image.get(k)) and image[k] > 0 for k in ("width", "height"))
        if not ok:
            raise DatasetError(f"{path}: image entry {image!r} needs integer id, file_name and positive width/height")
        if image["id"] in image_ids:
            raise DatasetError(f"{path}: image id {image['id']} appears twice")
        image_ids.add(image["id"])
    category_ids: set[int] = set()
    for cat in data["categories"]:
        if not (
            isinstance(cat, dict) and _is_int(cat.get("id")) and cat["id"] >= 0 and isinstance(cat.get("name"), str)
        ):
            raise DatasetError(f"{path}: category entry {cat!r} needs a non-negative integer id and a name")
        if cat["id"] in category_ids:
            raise DatasetError(f"{path}: category id {cat['id']} appears twice")
        category_ids.add(cat["id"])
    ann_ids: set[int] = set()
    for ann in data["annotations"]:
        if not (isinstance(ann, dict) and _is_int(ann.get("id"))):
            raise DatasetError(f"{path}: annotation entry {str(ann)[:200]} has no integer id")
        aid = ann["id"]
        if aid in ann_ids:
            raise DatasetError(f"{path}: annotation id {aid} appears twice")
        ann_ids.add(aid)
        if ann.get("image_id") not in image_ids:
            raise DatasetError(f"{path}: annotation id {aid} refers to image_id {ann.get('image_id')!r}, not in images")
        if ann.get("category_id") not in category_ids:
            raise DatasetError(f"{path}: annotation id {aid} has unknown category_id {ann.get('category_id')!r}")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, int | float) for v in bbox)):
            raise DatasetError(f"{path}: annotation id {aid} needs bbox [x, y, w, h] of 4 numbers, got {bbox!r}")
        if not all(math.isfinite(v) for v in bbox):
            raise DatasetError(f"{path}: annotation id {aid} has a non-finite bbox {bbox!r}")


def category_to_label(categories: list[dict], label_mapping: str) -> dict[int, int]:
    """Dataset category id -> model label: identity (published) or 0..K-1 in sorted id order."""
    ids = sorted(cat["id"] for cat in categories)
    match label_mapping:
        case "category_id":
            return {cid: cid for cid in ids}
        case "contiguous":
            return {cid: label for label, cid in enumerate(ids)}
        case _:
            raise ValueError(f"data.label_mapping must be one of {LABEL_MAPPINGS}, got {label_mapping!r}")


def build_records(data: dict, cat_to_label: dict[int, int]) -> tuple[list[ImageRecord], int]:
    """Published target conversion for every image; returns the records and the number of degenerate boxes dropped."""
    index_of = {image["id"]: i for i, image in enumerate(data["images"])}
    anns = [a for a in data["annotations"] if not a.get("iscrowd", 0)]
    if anns:
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64)  # [M, 4]
        owner = torch.tensor([index_of[a["image_id"]] for a in anns])  # [M]
        labels = torch.tensor([cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64)  # [M]
    else:
        xywh, owner, labels = torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.int64), torch.zeros(0)
    sizes = torch.tensor([[im["width"], im["height"]] for im in data["images"]], dtype=torch.float64)  # [I, 2] (w, h)
    xyxy = box_convert(xywh, "xywh", "xyxy")  # [M, 4]
    wh = sizes[owner].repeat(1, 2)  # [M, 4] (w, h, w, h): the clamp limits of each box's image
    xyxy = torch.minimum(xyxy.clamp(min=0), wh)
    keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    dropped = int((~keep).sum())
    xyxy, owner, labels = xyxy[keep].float(), owner[keep], labels[keep].long()
    # Group by image with one stable sort instead of a Python loop over annotations.
    order = torch.argsort(owner, stable=True)
    counts = torch.bincount(owner, minlength=len(data["images"])).tolist()
    box_groups = torch.split(xyxy[order], counts)
    label_groups = torch.split(labels[order], counts)
    records = [
        ImageRecord(im["id"], im["file_name"], im["height"], im["width"], b.numpy(), lab.numpy())
        for im, b, lab in zip(data["images"], box_groups, label_groups, strict=True)
    ]
    return records, dropped


def coco_from_dict(data: dict) -> COCO:
    """A pycocotools `COCO` built from already-parsed annotations, with its progress prints silenced."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDetection(torch.utils.data.Dataset):
    """Images of one COCO-format split with published targets; `transforms(image, target)` are torchvision v2.

    Items are `(image, target)`; with transforms from `conddetr.data.transforms` the image is normalised float and
    boxes normalised cxcywh. Without transforms the image is uint8 `[3, H, W]` and boxes xyxy pixels.
    """

    def __init__(
        self,
        images_dir: str | Path,
        annotation_file: str | Path,
        cat_to_label: dict[int, int] | None = None,
        transforms: Callable | None = None,
        annotations: dict | None = None,
        keep_coco: bool = False,
    ):
        self.images_dir = Path(images_dir)
        self.annotation_file = Path(annotation_file)
        data = annotations if annotations is not None else read_annotation_file(self.annotation_file)
        if cat_to_label is None:
            cat_to_label = category_to_label(data["categories"], "category_id")
        self.records, self.num_dropped = build_records(data, cat_to_label)
        self._check_image_files()
        if self.num_dropped:
            logger.warning(
                "%s: dropped %d degenerate boxes (zero or negative size after clamping to the image)",
                self.annotation_file,
                self.num_dropped,
            )
        self.transforms = transforms
        self.coco = coco_from_dict(data) if keep_coco else None  # the evaluator's ground truth (val split)

    def _check_image_files(self) -> None:
        if not self.images_dir.is_dir():
            raise DatasetError(f"image folder {self.images_dir} (for {self.annotation_file}) does not exist")
        listing = set(os.listdir(self.images_dir))  # one listing instead of one stat per image
        for record in self.records:
            name = record.file_name
            found = name in listing if "/" not in name else (self.images_dir / name).is_file()
            if not found:
                raise DatasetError(
                    f"image file {self.images_dir / name} (image id {record.image_id} in {self.annotation_file}) "
                    "does not exist"
                )

    def __len__(self) -> int:
        return len(self.records)

    def read_image(self, index: int) -> tv_tensors.Image:
        """uint8 `[3, H, W]`; unreadable or mis-sized files raise `DatasetError` naming the file and image id."""
        record = self.records[index]
        path = self.images_dir / record.file_name
        try:
            with Image.open(path) as pil:
                pil = pil.convert("RGB")
        except (OSError, SyntaxError, ValueError) as err:  # PIL reports broken files with all three
            raise DatasetError(f"cannot read image {path} (image id {record.image_id}): {err}") from None
        if pil.size != (record.width, record.height):
            raise DatasetError(
                f"image {path} (image id {record.image_id}) is {pil.width}x{pil.height} on disk but "
                f"{record.width}x{record.height} in {self.annotation_file}"
            )
        return tv_tensors.Image(F.pil_to_tensor(pil))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        record = self.records[index]
        image = self.read_image(index)
        size = (record.height, record.width)
        target = {
            # Copies: an in-place transform must never alter the stored annotations for later epochs.
            "boxes": tv_tensors.BoundingBoxes(torch.tensor(record.boxes), format="XYXY", canvas_size=size),
            "labels": torch.tensor(record.labels),
            "image_id": torch.tensor(record.image_id, dtype=torch.int64),
            "orig_size": torch.tensor(size, dtype=torch.int64),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        target["size"] = torch.tensor(image.shape[-2:], dtype=torch.int64)
        # Plain tensors downstream: tv_tensors metadata has no meaning for the model or the loss.
        return image.as_subclass(torch.Tensor), {k: v.as_subclass(torch.Tensor) for k, v in target.items()}
