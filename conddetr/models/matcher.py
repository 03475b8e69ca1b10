"""Hungarian matching between predicted queries and target boxes (DETR, Carion et al. 2020, eq. 1).

Cost = set_cost_class * class cost + set_cost_bbox * L1(cxcywh) + set_cost_giou * (-GIoU). The class cost is
either the focal-loss cost of Conditional DETR (sigmoid) or DETR's -probability (softmax).
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from conddetr.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

CLASS_COSTS = ("focal", "softmax")

# One image's matching: (query indices [K] int64 ascending, target indices [K] int64), on the CPU.
MatchIndices = tuple[Tensor, Tensor]


def focal_class_cost(logits: Tensor, target_labels: Tensor, alpha: float, gamma: float = 2.0) -> Tensor:
    """Focal class cost `[P, C]` logits x `[N]` labels -> `[P, N]`: the focal loss of calling the query positive
    minus that of calling it negative, as in Deformable / Conditional DETR (the 1e-8 keeps log finite)."""
    prob = logits.sigmoid()  # [P, C]
    neg_cost = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()  # [P, C]
    pos_cost = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()  # [P, C]
    return pos_cost[:, target_labels] - neg_cost[:, target_labels]


def softmax_class_cost(logits: Tensor, target_labels: Tensor) -> Tensor:
    """DETR class cost `[P, C+1]` logits x `[N]` labels -> `[P, N]`: minus the probability of the target class
    (the constant 1 of 1 - p is dropped, it does not change the assignment)."""
    return -logits.softmax(-1)[:, target_labels]


class HungarianMatcher(nn.Module):
    """One-to-one assignment of targets to queries minimising the weighted matching cost per image."""

    def __init__(
        self,
        class_cost: str,
        set_cost_class: float = 1.0,
        set_cost_bbox: float = 1.0,
        set_cost_giou: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        if class_cost not in CLASS_COSTS:
            raise ValueError(f"class_cost must be one of {CLASS_COSTS}, got {class_cost!r}")
        if set_cost_class == 0 and set_cost_bbox == 0 and set_cost_giou == 0:
            raise ValueError("matcher costs set_cost_class, set_cost_bbox and set_cost_giou cannot all be 0")
        self.class_cost = class_cost
        self.set_cost_class = set_cost_class
        self.set_cost_bbox = set_cost_bbox
        self.set_cost_giou = set_cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def cost_matrices(self, outputs: dict, targets: list[dict]) -> list[Tensor]:
        """Matching cost per image, `[Q, N_b]` float32 on the CPU.

        outputs: `pred_logits [B, Q, C]`, `pred_boxes [B, Q, 4]` cxcywh; targets: per image `labels [N_b]`,
        `boxes [N_b, 4]` cxcywh. Computed in float32 with autocast off so bf16 training matches like fp32.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        batch_size, num_queries = logits.shape[:2]
        with torch.autocast(device_type=logits.device.type, enabled=False):
            # All images at once, split per image afterwards: one device->host copy per call.
            out_logits = logits.flatten(0, 1).float()  # [B*Q, C]
            out_boxes = boxes.flatten(0, 1).float()  # [B*Q, 4]
            tgt_labels = torch.cat([t["labels"] for t in targets]).to(logits.device)  # [N]
            tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(device=logits.device, dtype=torch.float32)

            if self.class_cost == "focal":
                cost_class = focal_class_cost(out_logits, tgt_labels, self.focal_alpha, self.focal_gamma)
            else:
                cost_class = softmax_class_cost(out_logits, tgt_labels)  # [B*Q, N]
            cost_bbox = torch.cdist(out_boxes, tgt_boxes, p=1)  # [B*Q, N]
            cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_boxes), box_cxcywh_to_xyxy(tgt_boxes))
            cost = self.set_cost_bbox * cost_bbox + self.set_cost_class * cost_class + self.set_cost_giou * cost_giou

        cost = cost.view(batch_size, num_queries, -1).cpu()  # [B, Q, N]
        sizes = [len(t["boxes"]) for t in targets]
        return [c[b] for b, c in enumerate(cost.split(sizes, dim=-1))]

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[MatchIndices]:
        """Per image `(query_idx, target_idx)`, int64 CPU tensors of length min(Q, N_b), query_idx ascending.
        An image without boxes gives two empty int64 tensors."""
        if len(targets) != outputs["pred_logits"].shape[0]:
            raise ValueError(f"matcher got {len(targets)} targets for a batch of {outputs['pred_logits'].shape[0]}")
        indices = []
        for b, cost in enumerate(self.cost_matrices(outputs, targets)):
            if not torch.isfinite(cost).all():
                raise ValueError(
                    f"matching cost of image {b} is not finite: NaN/inf in pred_logits / pred_boxes or in "
                    f"targets[{b}]['boxes']"
                )
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
