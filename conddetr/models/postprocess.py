"""Turn model outputs into detections in image pixels, the format COCO evaluation consumes.

Conditional DETR: sigmoid scores, top-k over queries x classes (a query may give several detections).
DETR: softmax, no-object column dropped, the best class per query.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from conddetr.models.box_ops import box_cxcywh_to_xyxy


def _scale_boxes(boxes: Tensor, target_sizes: Tensor) -> Tensor:
    """Normalised cxcywh `[B, K, 4]` -> xyxy pixels, target_sizes `[B, 2]` as (h, w)."""
    img_h, img_w = target_sizes.float().unbind(1)  # [B], [B]
    scale = torch.stack([img_w, img_h, img_w, img_h], dim=1)  # [B, 4]
    return box_cxcywh_to_xyxy(boxes) * scale[:, None, :]


class PostProcess(nn.Module):
    """`post(outputs, target_sizes [B, 2] (h, w)) -> [{scores [K], labels [K] int64, boxes [K, 4] xyxy}]`."""

    def __init__(self, variant: str, num_select: int = 100):
        super().__init__()
        if variant not in ("conditional", "detr"):
            raise ValueError(f"postprocess variant must be 'conditional' or 'detr', got {variant!r}")
        if num_select < 1:
            raise ValueError(f"num_select must be >= 1, got {num_select}")
        self.variant = variant
        self.num_select = num_select  # Conditional DETR only: detections kept per image (published: 100)

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        logits = outputs["pred_logits"].float()  # [B, Q, C]
        boxes = outputs["pred_boxes"].float()  # [B, Q, 4]
        if target_sizes.ndim != 2 or target_sizes.shape != (logits.shape[0], 2):
            raise ValueError(
                f"target_sizes must be [B, 2] (h, w) with B = {logits.shape[0]}, got {tuple(target_sizes.shape)}"
            )
        target_sizes = target_sizes.to(logits.device)
        if self.variant == "conditional":
            batch_size, num_queries, num_classes = logits.shape
            prob = logits.sigmoid().flatten(1)  # [B, Q*C]
            # Fewer than num_select candidates only happens in toy settings; keep all of them then.
            k = min(self.num_select, num_queries * num_classes)
            scores, flat_idx = prob.topk(k, dim=1)  # [B, K]
            query_idx = flat_idx // num_classes  # [B, K]
            labels = flat_idx % num_classes  # [B, K]
            boxes = torch.gather(boxes, 1, query_idx[..., None].expand(-1, -1, 4))  # [B, K, 4]
        else:
            scores, labels = logits.softmax(-1)[..., :-1].max(-1)  # [B, Q], [B, Q]
        boxes = _scale_boxes(boxes, target_sizes)
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes, strict=True)]


def build_postprocessor(variant: str, num_select: int = 100) -> PostProcess:
    """Post-processor of a variant ("conditional" | "detr"); num_select is the top-k of Conditional DETR."""
    return PostProcess(variant, num_select)
