"""Hungarian matching between predicted queries and target boxes (DETR, Carion et al. 2020, eq. 1).

Cost = set_cost_class * class cost + set_cost_bbox * L1(cxcywh) + set_cost_giou * (-GIoU). The class cost is
either the focal-loss cost of Conditional DETR (sigmoid) or DETR's -probability (softmax).
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from conddetr.models.box_ops import AREA_EPS, box_area, box_cxcywh_to_xyxy

CLASS_COSTS = ("focal", "softmax")

# One image's matching: (query indices [K] int64 ascending, target indices [K] int64), on the CPU.
MatchIndices = tuple[Tensor, Tensor]


def focal_class_cost(logits: Tensor, target_labels: Tensor, alpha: float, gamma: float = 2.0) -> Tensor:
    """Focal class cost `[..., P, C]` logits x `[..., N]` labels -> `[..., P, N]`: the focal loss of calling the
    query positive minus that of calling it negative, as in Deformable / Conditional DETR (the 1e-8 keeps log
    finite). Only the target classes' logits are gathered and scored, not all C of them. No autograd: the
    temporaries are updated in place (same operations in the same order, so the same numbers)."""
    index = target_labels[..., None, :].expand(*logits.shape[:-1], target_labels.shape[-1])  # [..., P, N]
    prob = logits.gather(-1, index).sigmoid_()  # [..., P, N]
    neg_cost = (1 - prob).add_(1e-8).log_().neg_().mul_(prob.pow(gamma).mul_(1 - alpha))
    pos_cost = (prob + 1e-8).log_().neg_().mul_(prob.neg_().add_(1).pow_(gamma).mul_(alpha))  # prob := 1 - prob
    return pos_cost.sub_(neg_cost)


def softmax_class_cost(logits: Tensor, target_labels: Tensor) -> Tensor:
    """DETR class cost `[..., P, C+1]` logits x `[..., N]` labels -> `[..., P, N]`: minus the probability of the
    target class (the constant 1 of 1 - p is dropped, it does not change the assignment)."""
    index = target_labels[..., None, :].expand(*logits.shape[:-1], target_labels.shape[-1])  # [..., P, N]
    return logits.softmax(-1).gather(-1, index).neg_()


def giou_cost(boxes: Tensor, tgt_boxes: Tensor) -> Tensor:
    """-GIoU of cxcywh boxes `[..., P, 4]` x `[..., N, 4]` -> `[..., P, N]`: box_ops.generalized_box_iou's
    operations in its order (the same numbers), but on a few buffers reused in place; no autograd."""
    boxes, tgt_boxes = box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes)
    x0a, y0a, x1a, y1a = (c[..., :, None] for c in boxes.unbind(-1))  # [..., P, 1]
    x0b, y0b, x1b, y1b = (c[..., None, :] for c in tgt_boxes.unbind(-1))  # [..., 1, N]
    area_a, area_b = box_area(boxes)[..., :, None], box_area(tgt_boxes)[..., None, :]  # [..., P, 1], [..., 1, N]
    inter = torch.minimum(x1a, x1b).sub_(torch.maximum(x0a, x0b)).clamp_(min=0)  # [..., P, N]
    inter.mul_(torch.minimum(y1a, y1b).sub_(torch.maximum(y0a, y0b)).clamp_(min=0))
    union = (area_a + area_b).sub_(inter)
    iou = inter.div_(union.clamp(min=AREA_EPS))
    enclosing = torch.maximum(x1a, x1b).sub_(torch.minimum(x0a, x0b)).clamp_(min=0)
    enclosing.mul_(torch.maximum(y1a, y1b).sub_(torch.minimum(y0a, y0b)).clamp_(min=0)).clamp_(min=AREA_EPS)
    return enclosing.sub(union).div_(enclosing).sub_(iou)  # -(iou - (enclosing - union) / enclosing)


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
    def batch_cost(self, outputs: dict, targets: list[dict]) -> Tensor:
        """Matching cost of every image against its own targets in one pass: `[B, Q, N_max]` float32 on the
        outputs' device, image b's columns beyond its N_b targets being padding (a dummy box, class 0).

        outputs: `pred_logits [B, Q, C]`, `pred_boxes [B, Q, 4]` cxcywh; targets: per image `labels [N_b]`,
        `boxes [N_b, 4]` cxcywh. Computed in float32 with autocast off so bf16 training matches like fp32.
        Batching pads targets instead of scoring every query against the whole batch's targets (B times the work).
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        device = logits.device
        with torch.autocast(device_type=device.type, enabled=False):
            # Padding: label 0 and the box (0.5, 0.5, 0.5, 0.5) keep every padded cost finite; they are cut off later.
            labels = pad_sequence([t["labels"].to(device) for t in targets], batch_first=True)  # [B, N_max]
            tgt_boxes = pad_sequence(
                [t["boxes"].to(device=device, dtype=torch.float32) for t in targets],
                batch_first=True,
                padding_value=0.5,
            )  # [B, N_max, 4]
            out_logits, out_boxes = logits.float(), boxes.float()  # [B, Q, C], [B, Q, 4]
            if self.class_cost == "focal":
                cost_class = focal_class_cost(out_logits, labels, self.focal_alpha, self.focal_gamma)
            else:
                cost_class = softmax_class_cost(out_logits, labels)  # [B, Q, N_max]
            cost = torch.cdist(out_boxes, tgt_boxes, p=1).mul_(self.set_cost_bbox)  # [B, Q, N_max]
            cost.add_(cost_class.mul_(self.set_cost_class))
            return cost.add_(giou_cost(out_boxes, tgt_boxes).mul_(self.set_cost_giou))

    @torch.no_grad()
    def cost_matrices(self, outputs: dict, targets: list[dict]) -> list[Tensor]:
        """Matching cost per image, `[Q, N_b]` float32 on the CPU (one device->host copy for the batch)."""
        return self._per_image(self.batch_cost(outputs, targets).cpu(), targets)

    @staticmethod
    def _per_image(cost: Tensor, targets: list[dict]) -> list[Tensor]:
        return [c[:, : len(t["boxes"])] for c, t in zip(cost, targets, strict=True)]  # [Q, N_b] views

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[MatchIndices]:
        """Per image `(query_idx, target_idx)`, int64 CPU tensors of length min(Q, N_b), query_idx ascending.
        An image without boxes gives two empty int64 tensors."""
        if len(targets) != outputs["pred_logits"].shape[0]:
            raise ValueError(f"matcher got {len(targets)} targets for a batch of {outputs['pred_logits'].shape[0]}")
        cost = self.batch_cost(outputs, targets).cpu()  # [B, Q, N_max]
        if not torch.isfinite(cost).all():  # the image to name: padding columns do not count
            real = torch.arange(cost.shape[-1]) < torch.tensor([len(t["boxes"]) for t in targets])[:, None]  # [B, N]
            bad = (~torch.isfinite(cost) & real[:, None, :]).flatten(1).any(1)  # [B]
            if bad.any():
                b = int(bad.nonzero()[0])
                raise ValueError(
                    f"matching cost of image {b} is not finite: NaN/inf in pred_logits / pred_boxes or in "
                    f"targets[{b}]['boxes']"
                )
        indices = []
        for cost_b in self._per_image(cost, targets):
            rows, cols = linear_sum_assignment(cost_b.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
