"""Published DETR / Conditional DETR augmentation built from torchvision.transforms.v2 primitives.

Boxes travel as `tv_tensors.BoundingBoxes`, so every geometric change is torchvision's; the last step converts them
to normalised cxcywh (the model's box space).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image as PILImage
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _image_size(flat_inputs: list[Any]) -> tuple[int, int]:
    for inpt in flat_inputs:
        if isinstance(inpt, tv_tensors.Image | PILImage.Image):
            h, w = F.get_size(inpt)
            return h, w
    raise TypeError("RandomSizeCrop needs a tv_tensors.Image or PIL image among its inputs")


class RandomSizeCrop(v2.Transform):
    """DETR's RandomSizeCrop: crop height and width drawn uniformly in [min_size, min(side, max_size)], at a uniformly
    random position. Sides shorter than `min_size` are kept whole (the published code would fail there)."""

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(f"RandomSizeCrop needs 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = _image_size(flat_inputs)
        # torch's RNG (not Python's) so DataLoader worker seeding makes the crops reproducible.
        crop_h = self._draw(height)
        crop_w = self._draw(width)
        top = int(torch.randint(0, height - crop_h + 1, ()))
        left = int(torch.randint(0, width - crop_w + 1, ()))
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def _draw(self, side: int) -> int:
        low, high = min(self.min_size, side), min(side, self.max_size)
        return int(torch.randint(low, high + 1, ()))

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.crop(inpt, **params)


class BoxesToNormalizedCxcywh(v2.Transform):
    """Final step: boxes -> cxcywh divided by the image (canvas) width and height, as the model predicts them."""

    _transformed_types = (tv_tensors.BoundingBoxes,)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        boxes = F.convert_bounding_box_format(inpt, new_format=tv_tensors.BoundingBoxFormat.CXCYWH)
        h, w = boxes.canvas_size
        scale = torch.tensor([w, h, w, h], dtype=boxes.dtype)
        return tv_tensors.wrap(boxes.as_subclass(torch.Tensor) / scale, like=boxes)


def _finish() -> list[v2.Transform]:
    return [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        BoxesToNormalizedCxcywh(),
    ]


def build_train_transforms(
    train_scales: Sequence[int],
    crop_resize_scales: Sequence[int],
    crop_min_size: int,
    crop_max_size: int,
    max_size: int,
    random_crop: bool = True,
) -> v2.Compose:
    """Flip 0.5; then 50/50 multi-scale resize, or resize -> random size crop -> multi-scale resize; normalise.

    `random_crop=False` (not published) leaves the crop branch out: every image is only flipped and resized.
    """
    scales = list(train_scales)
    if not random_crop:
        return v2.Compose([v2.RandomHorizontalFlip(0.5), v2.RandomShortestSize(scales, max_size=max_size), *_finish()])
    resize_crop_resize = v2.Compose(
        [
            v2.RandomShortestSize(list(crop_resize_scales)),
            RandomSizeCrop(crop_min_size, crop_max_size),
            # Crops may cut boxes away entirely; drop them (with their labels) before the final resize.
            v2.SanitizeBoundingBoxes(),
            v2.RandomShortestSize(scales, max_size=max_size),
        ]
    )
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(0.5),
            v2.RandomChoice([v2.RandomShortestSize(scales, max_size=max_size), resize_crop_resize]),
            *_finish(),
        ]
    )


def build_val_transforms(val_scale: int, max_size: int) -> v2.Compose:
    """Deterministic resize of the short side to `val_scale` (long side capped at `max_size`); normalise."""
    return v2.Compose([v2.RandomShortestSize(val_scale, max_size=max_size), *_finish()])
