"""COCO-format reading: published target conversion, label mappings, config paths and every kind of bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conddetr.config import DataConfig
from conddetr.data import CocoDetection, DatasetError, build_datasets, resolve_coco_paths
from conddetr.data.coco import category_to_label

CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]


def _write_dataset(
    folder: Path, annotations: list[dict], image_dir: Path | None = None, ann_file: Path | None = None
) -> tuple[Path, Path]:
    """Two 40x30 JPEGs and an instances file (default folder/images, folder/instances.json)."""
    image_dir = image_dir or folder / "images"
    ann_file = ann_file or folder / "instances.json"
    image_dir.mkdir(parents=True, exist_ok=True)
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    images = [
        {"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
        {"id": 2, "file_name": "b.jpg", "width": 40, "height": 30},
    ]
    for image in images:
        pixels = np.full((image["height"], image["width"], 3), 128, dtype=np.uint8)
        Image.fromarray(pixels).save(image_dir / image["file_name"])
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return image_dir, ann_file


def _ann(ann_id: int, image_id: int, bbox: list[float], category_id: int = 3, **extra) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


def test_published_target_conversion(tmp_path, caplog):
    annotations = [
        _ann(1, 1, [5, 4, 10, 8]),  # kept: xywh -> xyxy
        _ann(2, 1, [30, 20, 20, 20], category_id=7),  # kept, clamped to the 40x30 image
        _ann(3, 1, [1, 1, 5, 5], iscrowd=1),  # crowd: dropped silently (published)
        _ann(4, 1, [10, 10, -4, 5]),  # negative width: degenerate, dropped and counted
        _ann(5, 1, [50, 5, 10, 10]),  # entirely outside: zero width after clamping, dropped and counted
    ]
    image_dir, ann_file = _write_dataset(tmp_path, annotations)
    with caplog.at_level(logging.WARNING, logger="conddetr.data.coco"):
        ds = CocoDetection(image_dir, ann_file, category_to_label(CATEGORIES, "category_id"))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dropped 2 degenerate boxes" in warnings[0].getMessage()
    assert str(ann_file) in warnings[0].getMessage()
    image, target = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 30, 40)
    torch.testing.assert_close(target["boxes"], torch.tensor([[5.0, 4, 15, 12], [30, 20, 40, 30]]))
    torch.testing.assert_close(target["labels"], torch.tensor([3, 7]))
    torch.testing.assert_close(target["orig_size"], torch.tensor([30, 40]))
    torch.testing.assert_close(target["image_id"], torch.tensor(1))
    # The image without annotations is kept, with empty targets.
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def test_label_mappings_and_num_classes(tmp_path, caplog):
    assert category_to_label(CATEGORIES, "category_id") == {3: 3, 7: 7}
    assert category_to_label(CATEGORIES, "contiguous") == {3: 0, 7: 1}
    with pytest.raises(ValueError, match="label_mapping"):
        category_to_label(CATEGORIES, "alphabetical")
    root = tmp_path / "coco"  # the standard layout: root/{split}2017 and root/annotations/instances_{split}2017.json
    for split, anns in (
        ("train", [_ann(1, 1, [5, 4, 10, 8], category_id=7)]),
        ("val", [_ann(1, 2, [1, 1, 3, 3])]),
    ):
        _write_dataset(root, anns, root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json")
    with caplog.at_level(logging.INFO, logger="conddetr.data"):
        _, val_ds, info = build_datasets(DataConfig(dataset="coco", root=str(root)))
    assert info.num_classes == 8 and info.label_to_category == {3: 3, 7: 7}
    assert any("num_classes = 8 derived from" in r.getMessage() for r in caplog.records)
    assert val_ds.coco.getImgIds() == [1, 2]
    _, _, info = build_datasets(DataConfig(dataset="coco", root=str(root), label_mapping="contiguous"))
    assert (info.num_classes, info.label_to_category, info.category_names) == (2, {0: 3, 1: 7}, {0: "cat", 1: "dog"})
    _, _, info = build_datasets(DataConfig(dataset="coco", root=str(root)), num_classes=91)
    assert info.num_classes == 91
    with pytest.raises(DatasetError, match="num_classes=5 is too small"):
        build_datasets(DataConfig(dataset="coco", root=str(root)), num_classes=5)


@pytest.mark.parametrize("layout", ["flat", "images"])
def test_coco_layouts(tmp_path, layout):
    folder = tmp_path / "train2017" if layout == "flat" else tmp_path / "images" / "train2017"
    folder.mkdir(parents=True)
    images, annotations = resolve_coco_paths(DataConfig(dataset="coco", root=str(tmp_path)), "train")
    assert images == folder and annotations == tmp_path / "annotations" / "instances_train2017.json"
    override = DataConfig(dataset="coco", root="", val_images="/x/imgs", val_annotations="/x/val.json")
    assert resolve_coco_paths(override, "val") == (Path("/x/imgs"), Path("/x/val.json"))
    with pytest.raises(DatasetError, match="no val image folder"):
        resolve_coco_paths(DataConfig(dataset="coco", root=str(tmp_path)), "val")
    with pytest.raises(DatasetError, match="data.root is empty"):
        resolve_coco_paths(DataConfig(dataset="coco"), "train")


def _corrupt(image_dir: Path, ann_file: Path, case: str) -> str:
    """Apply one kind of damage; returns the pattern the error must contain."""
    data = json.loads(ann_file.read_text())
    match case:
        case "missing_image":
            (image_dir / "b.jpg").unlink()
            return r"b\.jpg \(image id 2 in .*instances\.json\) does not exist"
        case "unknown_category":
            data["annotations"].append(_ann(9, 1, [1, 1, 4, 4], category_id=99))
        case "absent_image":
            data["annotations"].append(_ann(9, 42, [1, 1, 4, 4]))
        case "bad_bbox":
            data["annotations"].append(_ann(9, 1, [1, 1, 4]))
        case "malformed_json":
            ann_file.write_text(json.dumps(data)[:-5])
            return r"instances\.json is malformed JSON \(line 1"
        case "empty_file":
            ann_file.write_text("")
            return r"instances\.json is empty"
        case "no_images":
            data["images"] = []
    ann_file.write_text(json.dumps(data))
    return {
        "unknown_category": r"instances\.json: annotation id 9 has unknown category_id 99",
        "absent_image": r"instances\.json: annotation id 9 refers to image_id 42, not in images",
        "bad_bbox": r"instances\.json: annotation id 9 needs bbox",
        "no_images": r"instances\.json lists no images",
    }[case]


@pytest.mark.parametrize(
    "case",
    ["missing_image", "unknown_category", "absent_image", "bad_bbox", "malformed_json", "empty_file", "no_images"],
)
def test_bad_input_is_named(tmp_path, case):
    image_dir, ann_file = _write_dataset(tmp_path, [_ann(1, 1, [5, 4, 10, 8])])
    pattern = _corrupt(image_dir, ann_file, case)
    with pytest.raises(DatasetError, match=pattern):
        CocoDetection(image_dir, ann_file)


@pytest.mark.parametrize("damage", ["truncated", "not_an_image", "wrong_size"])
def test_bad_image_at_load_time_names_file_and_id(tmp_path, damage):
    image_dir, ann_file = _write_dataset(tmp_path, [_ann(1, 2, [5, 4, 10, 8])])
    ds = CocoDetection(image_dir, ann_file)
    path = image_dir / "b.jpg"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "not_an_image":
        path.write_bytes(b"this is not a jpeg")
    else:
        Image.new("RGB", (20, 20)).save(path)
    pattern = r"40x30 in" if damage == "wrong_size" else r"cannot read image"
    with pytest.raises(DatasetError, match=pattern) as info:
        ds[1]
    assert "b.jpg" in str(info.value) and "image id 2" in str(info.value)


def test_categories_must_agree_between_splits(tmp_path):
    image_dir, ann_file = _write_dataset(tmp_path / "train", [])
    val_dir, val_file = _write_dataset(tmp_path / "val", [])
    data = json.loads(val_file.read_text())
    data["categories"][0]["name"] = "lion"
    val_file.write_text(json.dumps(data))
    cfg = DataConfig(
        dataset="coco",
        train_images=str(image_dir),
        train_annotations=str(ann_file),
        val_images=str(val_dir),
        val_annotations=str(val_file),
    )
    with pytest.raises(DatasetError, match="categories differ"):
        build_datasets(cfg)
    with pytest.raises(ValueError, match="data.dataset must be"):
        build_datasets(DataConfig(dataset="voc"))


def test_bad_image_in_a_worker_names_file_and_id(tmp_path):
    from conddetr.data import build_loaders

    image_dir, ann_file = _write_dataset(tmp_path, [])  # no annotations at all: both images kept, empty targets
    ds = CocoDetection(image_dir, ann_file)
    assert [len(r.labels) for r in ds.records] == [0, 0]
    (image_dir / "a.jpg").write_bytes(b"\xff\xd8\xff garbage")
    loader, _ = build_loaders(ds, ds, batch_size=2, num_workers=1, distributed=False, seed=0)
    with pytest.raises(DatasetError, match=r"cannot read image .*a\.jpg \(image id 1\)"):
        next(iter(loader))
