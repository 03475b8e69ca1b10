"""Box conversions and (generalised) IoU for DETR-style set prediction.

Boxes are `(cx, cy, w, h)` or `(x0, y0, x1, y1)` in the last dimension. The IoU functions stay finite for
zero-size boxes: empty unions and empty enclosing boxes are clamped to a small epsilon instead of giving NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Smallest union / enclosing area used as a divisor. Normalised COCO boxes of one pixel in a 1333-pixel image
# have an area near 5e-7, so real boxes never hit the clamp; it only matters for degenerate boxes.
AREA_EPS = 1e-7


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """`[..., 4]` (cx, cy, w, h) -> `[..., 4]` (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """`[..., 4]` (x0, y0, x1, y1) -> `[..., 4]` (cx, cy, w, h)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of xyxy boxes `[..., 4]` -> `[...]`; boxes with x1 < x0 or y1 < y0 count as empty."""
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)  # [..., 2]
    return wh[..., 0] * wh[..., 1]


def _overlap(lo1: Tensor, hi1: Tensor, lo2: Tensor, hi2: Tensor) -> Tensor:
    """Length of the intersection of the intervals [lo1, hi1] and [lo2, hi2], 0 when they are apart."""
    return (torch.minimum(hi1, hi2) - torch.maximum(lo1, lo2)).clamp(min=0)


def _iou_and_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """IoU and union of xyxy boxes that broadcast against each other (`[..., 4]` each)."""
    # One coordinate at a time: ops on (x, y) pairs would run pairwise grids with a 2-long innermost loop.
    x0a, y0a, x1a, y1a = boxes1.unbind(-1)
    x0b, y0b, x1b, y1b = boxes2.unbind(-1)
    inter = _overlap(x0a, x1a, x0b, x1b) * _overlap(y0a, y1a, y0b, y1b)  # [...]
    union = box_area(boxes1) + box_area(boxes2) - inter  # [...]
    return inter / union.clamp(min=AREA_EPS), union


def _generalized_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU (Rezatofighi et al. 2019) of xyxy boxes that broadcast against each other."""
    iou, union = _iou_and_union(boxes1, boxes2)
    x0a, y0a, x1a, y1a = boxes1.unbind(-1)
    x0b, y0b, x1b, y1b = boxes2.unbind(-1)
    width = (torch.maximum(x1a, x1b) - torch.minimum(x0a, x0b)).clamp(min=0)  # [...] enclosing box
    height = (torch.maximum(y1a, y1b) - torch.minimum(y0a, y0b)).clamp(min=0)
    enclosing = (width * height).clamp(min=AREA_EPS)
    return iou - (enclosing - union) / enclosing


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU and union of xyxy boxes `[N, 4]` x `[M, 4]` -> (`[N, M]`, `[N, M]`)."""
    return _iou_and_union(boxes1[:, None, :], boxes2[None, :, :])


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalised IoU of xyxy boxes `[..., N, 4]` x `[..., M, 4]` -> `[..., N, M]`, in [-1, 1]; leading
    dims (e.g. a batch of images) pair up."""
    return _generalized_iou(boxes1[..., :, None, :], boxes2[..., None, :, :])


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalised IoU of aligned xyxy boxes `[N, 4]` and `[N, 4]` -> `[N]` (the diagonal of the pairwise one)."""
    if boxes1.shape != boxes2.shape:
        raise ValueError(
            f"elementwise GIoU needs boxes of equal shape, got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}"
        )
    return _generalized_iou(boxes1, boxes2)
