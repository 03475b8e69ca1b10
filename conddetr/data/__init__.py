"""Data entry point: `build_datasets(data_cfg)` for COCO 2017, any COCO-format dataset, or the synthetic one.

The synthetic dataset is generated into its cache and then read through the same COCO-format code as real data.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from conddetr.data.batching import build_loaders, collate, dc5_eval_batch_warning, set_epoch
from conddetr.data.coco import (
    CocoDetection,
    DatasetError,
    DatasetInfo,
    category_to_label,
    read_annotation_file,
)
from conddetr.data.synthetic import Difficulty, ensure_synthetic_dataset, synthetic_paths
from conddetr.data.transforms import build_train_transforms, build_val_transforms

__all__ = [
    "CocoDetection",
    "DatasetError",
    "DatasetInfo",
    "build_datasets",
    "build_loaders",
    "collate",
    "dc5_eval_batch_warning",
    "resolve_coco_paths",
    "set_epoch",
]

logger = logging.getLogger(__name__)


def resolve_coco_paths(data_cfg: Any, split: str) -> tuple[Path, Path]:
    """(image folder, annotation file) of "train" or "val": explicit config paths, else the standard COCO layout."""
    images = getattr(data_cfg, f"{split}_images")
    annotations = getattr(data_cfg, f"{split}_annotations")
    root = Path(data_cfg.root) if data_cfg.root else None
    if root is None and (images is None or annotations is None):
        raise DatasetError(
            f"data.root is empty: set data.root or both data.{split}_images and data.{split}_annotations"
        )
    if images is None:
        candidates = [root / f"{split}2017", root / "images" / f"{split}2017"]
        found = [c for c in candidates if c.is_dir()]
        if not found:
            raise DatasetError(
                f"no {split} image folder under data.root: looked for {candidates[0]} and {candidates[1]}"
            )
        images = found[0]
    if annotations is None:
        annotations = root / "annotations" / f"instances_{split}2017.json"
    return Path(images), Path(annotations)


def _dataset_info(categories: list[dict], cat_to_label: dict[int, int], mapping: str, num_classes: int | None, source):
    names = {cat["id"]: cat["name"] for cat in categories}
    label_to_category = {label: cid for cid, label in cat_to_label.items()}
    required = max(label_to_category) + 1  # logits needed so every label has one
    if num_classes is None:
        num_classes = required
        logger.info(
            "num_classes = %d derived from %s (%d categories, label_mapping=%s)", required, source, len(names), mapping
        )
    elif num_classes < required:
        raise DatasetError(
            f"model.num_classes={num_classes} is too small for {source}: label_mapping={mapping} needs {required}"
        )
    return DatasetInfo(
        num_classes=num_classes,
        label_to_category=label_to_category,
        category_names={label: names[cid] for label, cid in label_to_category.items()},
        label_mapping=mapping,
    )


def build_datasets(data_cfg: Any, num_classes: int | None = None) -> tuple[CocoDetection, CocoDetection, DatasetInfo]:
    """Train and val datasets with the published transforms, and the label space (`DatasetInfo`).

    `data_cfg` is a `DataConfig` or its OmegaConf node. `num_classes` (the model's, when set explicitly) is checked
    against the annotations; when None it is derived from them and logged.
    """
    match data_cfg.dataset:
        case "synthetic":
            syn = data_cfg.synthetic
            root = ensure_synthetic_dataset(
                syn.cache_dir,
                seed=syn.seed,
                image_size=syn.image_size,
                num_train=syn.num_train,
                num_val=syn.num_val,
                difficulty=Difficulty(syn.max_objects, syn.min_object_size, syn.class_colours, syn.min_visible),
            )
            (train_images, train_file), (val_images, val_file) = (
                synthetic_paths(root, "train"),
                synthetic_paths(root, "val"),
            )
        case "coco":
            train_images, train_file = resolve_coco_paths(data_cfg, "train")
            val_images, val_file = resolve_coco_paths(data_cfg, "val")
        case other:
            raise ValueError(f"data.dataset must be 'synthetic' or 'coco', got {other!r}")
    train_data, val_data = read_annotation_file(train_file), read_annotation_file(val_file)
    train_cats = {c["id"]: c["name"] for c in train_data["categories"]}
    val_cats = {c["id"]: c["name"] for c in val_data["categories"]}
    if train_cats != val_cats:
        raise DatasetError(f"categories differ between {train_file} and {val_file}; both splits need the same list")
    cat_to_label = category_to_label(train_data["categories"], data_cfg.label_mapping)
    info = _dataset_info(train_data["categories"], cat_to_label, data_cfg.label_mapping, num_classes, train_file)
    train_tf = build_train_transforms(
        list(data_cfg.train_scales),
        list(data_cfg.crop_resize_scales),
        data_cfg.crop_min_size,
        data_cfg.crop_max_size,
        data_cfg.max_size,
        data_cfg.random_crop,
    )
    val_tf = build_val_transforms(data_cfg.val_scale, data_cfg.max_size)
    train_ds = CocoDetection(train_images, train_file, cat_to_label, train_tf, annotations=train_data)
    val_ds = CocoDetection(val_images, val_file, cat_to_label, val_tf, annotations=val_data, keep_coco=True)
    return train_ds, val_ds, info
