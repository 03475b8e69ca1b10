"""Every transform keeps boxes on their pixels: filled boxes are transformed with the image and found again."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors
from torchvision.ops import box_convert, box_iou
from torchvision.transforms import v2

from conddetr.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomSizeCrop,
    build_train_transforms,
    build_val_transforms,
)

# Distinct saturated colours on black: after interpolation each box's pixels are still recognisable by colour.
COLOURS = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]], dtype=torch.float32)
BOXES = torch.tensor(  # xyxy, disjoint, one near each border so crops cut some and remove others
    [[4, 6, 40, 30], [70, 10, 150, 50], [20, 60, 60, 115], [94, 70, 112, 118], [130, 90, 158, 119]],
    dtype=torch.float32,
)
H, W = 120, 160


def _sample() -> tuple[tv_tensors.Image, dict]:
    image = torch.zeros(3, H, W, dtype=torch.uint8)
    for colour, (x0, y0, x1, y1) in zip(COLOURS, BOXES.long(), strict=True):
        image[:, y0:y1, x0:x1] = colour.to(torch.uint8)[:, None, None]
    target = {
        "boxes": tv_tensors.BoundingBoxes(BOXES.clone(), format="XYXY", canvas_size=(H, W)),
        "labels": torch.arange(len(BOXES)),
    }
    return tv_tensors.Image(image), target


def _painted_box(image: torch.Tensor, label: int) -> tuple[torch.Tensor | None, int]:
    """xyxy extent of the pixels close to the label's colour in a float [3, h, w] image in 0..255, and their count."""
    close = (image - COLOURS[label][:, None, None]).abs().amax(dim=0) < 100  # [h, w]: mostly covered
    ys, xs = torch.nonzero(close, as_tuple=True)
    if len(xs) == 0:
        return None, 0
    return torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32), len(xs)


def _check(image: torch.Tensor, boxes_xyxy: torch.Tensor, labels: torch.Tensor) -> None:
    for box, label in zip(boxes_xyxy, labels.tolist(), strict=True):
        painted, _ = _painted_box(image, label)
        assert painted is not None, f"box of label {label} kept but its pixels are gone"
        # Edges within 1.5 px of the painted pixels (interpolation blurs one pixel); IoU > 0.9 unless a crop left a
        # sliver, where one pixel of rounding alone costs more than 10 % IoU.
        assert (box - painted[0]).abs().max() <= 1.5, (label, box, painted)
        if min(box[2] - box[0], box[3] - box[1]) >= 15:
            assert box_iou(box[None], painted).item() > 0.9, (label, box, painted)
    for label in set(range(len(BOXES))) - set(labels.tolist()):
        # A dropped box must really be (almost) gone: at most a sliver under one pixel wide or tall.
        painted, count = _painted_box(image, label)
        assert painted is None or min(painted[0, 2] - painted[0, 0], painted[0, 3] - painted[0, 1]) <= 2, label


@pytest.mark.parametrize(
    "transform",
    [
        v2.RandomHorizontalFlip(1.0),
        v2.RandomShortestSize([80, 200], max_size=300),
        v2.Compose([RandomSizeCrop(40, 100), v2.SanitizeBoundingBoxes()]),
    ],
    ids=["flip", "resize", "crop"],
)
def test_geometric_transform_keeps_boxes_on_pixels(transform):
    torch.manual_seed(0)
    for _ in range(15):
        image, target = _sample()
        out_image, out = transform(image, target)
        assert out["boxes"].canvas_size == tuple(out_image.shape[-2:])
        _check(out_image.float(), out["boxes"].as_subclass(torch.Tensor), out["labels"])


def _unnormalise(image: torch.Tensor, boxes_cxcywh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    h, w = image.shape[-2:]
    pixels = box_convert(boxes_cxcywh, "cxcywh", "xyxy") * torch.tensor([w, h, w, h])  # [N, 4]
    return (image * std + mean) * 255, pixels


@pytest.mark.parametrize("pipeline", ["train", "train_no_crop", "val"])
def test_full_pipeline_keeps_boxes_on_pixels(pipeline):
    if pipeline.startswith("train"):
        crop = pipeline == "train"
        transform = build_train_transforms([96, 128, 160], [100, 130], 60, 110, max_size=220, random_crop=crop)
    else:
        transform = build_val_transforms(100, max_size=220)
    torch.manual_seed(1)
    dropped_any = False
    for _ in range(30):
        image, target = _sample()
        out_image, out = transform(image, target)
        boxes = out["boxes"].as_subclass(torch.Tensor)
        assert out_image.dtype == torch.float32 and ((boxes >= 0) & (boxes <= 1)).all()
        pixels_image, pixels = _unnormalise(out_image, boxes)
        _check(pixels_image, pixels, out["labels"])
        dropped_any |= len(out["labels"]) < len(BOXES)
    assert dropped_any == (pipeline == "train")  # only the crop branch removes boxes, and it did at least once


def test_empty_targets_pass_through():
    transform = build_train_transforms([96, 128], [100], 60, 90, max_size=200)
    image, _ = _sample()
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(H, W)),
        "labels": torch.zeros(0, dtype=torch.int64),
    }
    out_image, out = transform(image, target)
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)
    assert out_image.shape[0] == 3 and out_image.dtype == torch.float32


def test_random_size_crop_bounds():
    crop = RandomSizeCrop(50, 70)
    torch.manual_seed(0)
    shapes = [crop(tv_tensors.Image(torch.zeros(3, H, W))).shape[-2:] for _ in range(200)]
    heights = torch.tensor([s[0] for s in shapes])
    widths = torch.tensor([s[1] for s in shapes])
    assert heights.min() == 50 and heights.max() == 70 and widths.min() == 50 and widths.max() == 70
    # An image smaller than min_size keeps that side whole instead of failing.
    small = crop(tv_tensors.Image(torch.zeros(3, 30, 200)))
    assert small.shape[-2] == 30 and 50 <= small.shape[-1] <= 70
    with pytest.raises(ValueError, match="min_size"):
        RandomSizeCrop(80, 40)
