"""Set-prediction losses of Conditional DETR (sigmoid focal) and DETR (softmax + no-object), with aux losses.

Each decoder layer is matched on its own (Hungarian) and scored with a class loss, L1 and GIoU box losses, all
normalised by the number of target boxes averaged over ranks (so DDP's gradient mean equals the global loss).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from conddetr.models.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from conddetr.models.matcher import HungarianMatcher, MatchIndices

VARIANTS = ("conditional", "detr")


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, num_boxes: float, alpha: float, gamma: float = 2.0) -> Tensor:
    """Focal loss (Lin et al. 2017) summed over queries and classes, divided by num_boxes (Deformable DETR).

    logits, targets: `[B, Q, C]`, targets one-hot in {0, 1}; alpha < 0 disables the class balancing.
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # [B, Q, C]
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.sum() / num_boxes


def global_num_boxes(targets: list[dict], device: torch.device) -> float:
    """Target boxes per rank averaged over the process group (at least 1): with DDP averaging gradients, a loss
    normalised by this equals the loss of the whole global batch normalised by its total box count."""
    num_boxes = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_boxes)
        num_boxes = num_boxes / dist.get_world_size()
    return num_boxes.clamp(min=1).item()


class SetCriterion(nn.Module):
    """Hungarian-matched losses `loss_ce`, `loss_bbox`, `loss_giou` (+ `_{i}` per aux layer) and logging-only
    `class_error` (last layer) and `cardinality_error`. `weight_dict` names the weighted keys."""

    def __init__(
        self,
        variant: str,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        focal_alpha: float = 0.25,
        eos_coef: float = 0.1,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"criterion variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        # conditional: logits = classes (no no-object class); detr: logits = num_classes + 1, last = no-object.
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.focal_alpha = focal_alpha
        self.eos_coef = eos_coef
        if variant == "detr":
            empty_weight = torch.ones(num_classes + 1)
            empty_weight[-1] = eos_coef
            self.register_buffer("empty_weight", empty_weight)

    def weighted_total(self, losses: dict[str, Tensor]) -> Tensor:
        """Sum of the weighted loss terms (the keys of weight_dict): the scalar to back-propagate."""
        missing = [k for k in self.weight_dict if k not in losses]
        if missing:
            raise KeyError(f"losses lack weighted keys {missing}: does the model return one aux output per layer?")
        return sum(losses[k] * w for k, w in self.weight_dict.items())

    def loss_labels(self, outputs: dict, targets: list[dict], indices: list[MatchIndices], num_boxes: float) -> dict:
        logits = outputs["pred_logits"].float()  # [B, Q, C] (detr: C + 1)
        batch_idx, query_idx = _matched_positions(indices, logits.device)
        matched_labels = _matched_targets(targets, indices, "labels").to(logits.device)  # [K]
        if self.variant == "conditional":
            onehot = torch.zeros_like(logits)  # [B, Q, C]; unmatched queries are all-negative
            onehot[batch_idx, query_idx, matched_labels] = 1
            loss_ce = sigmoid_focal_loss(logits, onehot, num_boxes, self.focal_alpha)
        else:
            target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
            target_classes[batch_idx, query_idx] = matched_labels  # [B, Q]; the rest is no-object
            loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)
        return {"loss_ce": loss_ce}

    @torch.no_grad()
    def class_error(self, outputs: dict, targets: list[dict], indices: list[MatchIndices]) -> Tensor:
        """100 - top-1 accuracy (%) of the matched queries; 100 when nothing is matched (as published)."""
        logits = outputs["pred_logits"]
        batch_idx, query_idx = _matched_positions(indices, logits.device)
        matched_labels = _matched_targets(targets, indices, "labels").to(logits.device)  # [K]
        if matched_labels.numel() == 0:
            return torch.tensor(100.0, device=logits.device)
        correct = logits[batch_idx, query_idx].argmax(-1) == matched_labels
        return 100.0 - 100.0 * correct.float().mean()

    @torch.no_grad()
    def cardinality_error(self, outputs: dict, targets: list[dict]) -> Tensor:
        """Mean |#predicted objects - #targets| per image. As in both published criteria a query counts as an
        object when its argmax is not the last logit, even for the sigmoid model; for logging only."""
        logits = outputs["pred_logits"]
        num_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()  # [B]
        num_tgt = torch.tensor([float(len(t["labels"])) for t in targets], device=logits.device)  # [B]
        return F.l1_loss(num_pred, num_tgt)

    def loss_boxes(self, outputs: dict, targets: list[dict], indices: list[MatchIndices], num_boxes: float) -> dict:
        boxes = outputs["pred_boxes"].float()  # [B, Q, 4]
        batch_idx, query_idx = _matched_positions(indices, boxes.device)
        src_boxes = boxes[batch_idx, query_idx]  # [K, 4]
        tgt_boxes = _matched_targets(targets, indices, "boxes").to(boxes)  # [K, 4]
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_boxes
        giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes))
        return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}

    def _layer_losses(
        self, outputs: dict, targets: list[dict], num_boxes: float, suffix: str, log: bool
    ) -> tuple[dict[str, Tensor], list[MatchIndices]]:
        indices = self.matcher(outputs, targets)
        losses = {
            **self.loss_labels(outputs, targets, indices, num_boxes),
            **self.loss_boxes(outputs, targets, indices, num_boxes),
            "cardinality_error": self.cardinality_error(outputs, targets),
        }
        if log:
            losses["class_error"] = self.class_error(outputs, targets, indices)
        return {k + suffix: v for k, v in losses.items()}, indices

    def forward(self, outputs: dict, targets: list[dict], return_indices: bool = False):
        """outputs: model outputs (`pred_logits`, `pred_boxes`, optional `aux_outputs`); targets: per image
        `labels [N]`, `boxes [N, 4]` normalised cxcywh. Returns the loss dict, and with return_indices also
        `{"last": indices, "aux": [indices per aux layer]}` (the matcher's assignments)."""
        _check_inputs(outputs, targets, self.variant, self.num_classes)
        num_boxes = global_num_boxes(targets, outputs["pred_logits"].device)
        # Losses in float32 even under bf16/fp16 autocast: focal loss and GIoU are unstable in low precision.
        with torch.autocast(device_type=outputs["pred_logits"].device.type, enabled=False):
            losses, last = self._layer_losses(outputs, targets, num_boxes, "", log=True)
            aux_indices = []
            for i, aux in enumerate(outputs.get("aux_outputs", [])):
                aux_losses, idx = self._layer_losses(aux, targets, num_boxes, f"_{i}", log=False)
                losses.update(aux_losses)
                aux_indices.append(idx)
        if return_indices:
            return losses, {"last": last, "aux": aux_indices}
        return losses


def _check_inputs(outputs: dict, targets: list[dict], variant: str, num_classes: int) -> None:
    """Shapes, dtypes and label range of a batch, with errors that say what is wrong where."""
    logits = outputs["pred_logits"]
    expected = num_classes + (1 if variant == "detr" else 0)
    if logits.shape[-1] != expected:
        raise ValueError(
            f"pred_logits has {logits.shape[-1]} classes, the {variant} criterion expects {expected} "
            f"(num_classes={num_classes})"
        )
    if len(targets) != logits.shape[0]:
        raise ValueError(f"got {len(targets)} targets for a batch of {logits.shape[0]} images")
    for b, t in enumerate(targets):
        for key in ("labels", "boxes"):
            if key not in t:
                raise ValueError(f"targets[{b}] has no {key!r} key (keys: {sorted(t)})")
        if t["boxes"].ndim != 2 or t["boxes"].shape[-1] != 4 or t["labels"].shape != t["boxes"].shape[:1]:
            raise ValueError(
                f"targets[{b}]: 'boxes' must be [N, 4] and 'labels' [N], got {tuple(t['boxes'].shape)} "
                f"and {tuple(t['labels'].shape)}"
            )
        # Even when empty: torch.tensor([]) is float32, and one such image would turn the whole batch float.
        if t["labels"].is_floating_point() or t["labels"].dtype == torch.bool:
            raise ValueError(f"targets[{b}]['labels'] must be an integer tensor (int64), got {t['labels'].dtype}")
    labels = torch.cat([t["labels"] for t in targets])
    if labels.numel():
        low, high = (int(v) for v in torch.stack([labels.min(), labels.max()]).tolist())
        if low < 0 or high >= num_classes:
            raise ValueError(f"target 'labels' must lie in [0, {num_classes}), got values in [{low}, {high}]")


def _matched_positions(indices: list[MatchIndices], device: torch.device) -> tuple[Tensor, Tensor]:
    """Flatten per-image matches to (batch index [K], query index [K]) for advanced indexing."""
    batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)])
    query_idx = torch.cat([q for q, _ in indices])
    return batch_idx.to(device), query_idx.to(device)


def _matched_targets(targets: list[dict], indices: list[MatchIndices], key: str) -> Tensor:
    """Targets' `key` entries in match order, concatenated over images (`[K]` labels or `[K, 4]` boxes)."""
    return torch.cat([t[key][j] for t, (_, j) in zip(targets, indices, strict=True)])


def build_criterion(
    variant: str,
    *,
    num_classes: int,
    set_cost_class: float,
    set_cost_bbox: float,
    set_cost_giou: float,
    cls_loss_coef: float,
    bbox_loss_coef: float,
    giou_loss_coef: float,
    focal_alpha: float,
    eos_coef: float,
    aux_loss: bool,
    dec_layers: int,
) -> SetCriterion:
    """Criterion of a variant: "conditional" (focal cost and loss over num_classes logits) or "detr" (softmax
    over num_classes + 1 logits, no-object weight eos_coef). Aux keys `_{i}` for layers 0..dec_layers-2."""
    match variant:
        case "conditional":
            class_cost = "focal"
        case "detr":
            class_cost = "softmax"
        case _:
            raise ValueError(f"criterion variant must be one of {VARIANTS}, got {variant!r}")
    matcher = HungarianMatcher(class_cost, set_cost_class, set_cost_bbox, set_cost_giou, focal_alpha=focal_alpha)
    weight_dict = {"loss_ce": cls_loss_coef, "loss_bbox": bbox_loss_coef, "loss_giou": giou_loss_coef}
    if aux_loss:
        base = dict(weight_dict)
        for i in range(dec_layers - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
    return SetCriterion(variant, num_classes, matcher, weight_dict, focal_alpha=focal_alpha, eos_coef=eos_coef)
