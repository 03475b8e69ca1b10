"""AdamW with a separate backbone learning rate, the step-decay schedule, and gradient-accumulation loss weights.

Published recipe (DETR / Conditional DETR main.py): two parameter groups, lr 1e-4 / backbone 1e-5, weight decay 1e-4,
StepLR dividing the lr by 10 after `lr_drop_epoch` epochs.
"""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, lr: float, lr_backbone: float) -> list[dict]:
    """Trainable parameters split as published: names containing "backbone" train at `lr_backbone`."""
    backbone, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (backbone if "backbone" in name else rest).append(p)
    groups = [{"params": rest, "lr": lr, "name": "transformer"}]
    if backbone:  # lr_backbone = 0 freezes the backbone in the model, leaving this group empty
        groups.append({"params": backbone, "lr": lr_backbone, "name": "backbone"})
    return groups


def build_optimizer(model: nn.Module, *, lr: float, lr_backbone: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused (one kernel per parameter instead of a dozen; same update rule) where torch has that kernel for
    every parameter's device: CUDA and, from torch 2.4, the CPU."""
    groups = param_groups(model, lr, lr_backbone)
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = devices <= {"cpu", "cuda"} and all(p.is_floating_point() for g in groups for p in g["params"])
    try:
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)
    except RuntimeError:  # an older torch without the CPU kernel
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, *, lr_drop_epoch: int) -> torch.optim.lr_scheduler.StepLR:
    """Stepped once per epoch: lr x 0.1 after `lr_drop_epoch` epochs (a drop beyond the last epoch never happens)."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(lr_drop_epoch, 1), gamma=0.1)


def box_normalised_terms(variant: str) -> tuple[str, ...]:
    """Loss-term prefixes the criterion divides by the number of target boxes (the rest are per-query means).

    Conditional DETR's focal loss is a sum over queries and classes divided by the box count (Deformable DETR
    convention); DETR's softmax cross-entropy is a weighted mean over queries.
    """
    return ("loss_ce", "loss_bbox", "loss_giou") if variant == "conditional" else ("loss_bbox", "loss_giou")


def accumulation_weights(box_counts: list[float], world_size: int) -> tuple[list[float], float]:
    """Per-micro-batch weights that make accumulated gradients equal those of one big batch.

    `box_counts[m]` is the number of target boxes of micro-batch m summed over all ranks. The criterion divides a
    box-normalised term by c_m = max(n_m / world_size, 1) (published convention: DDP then averages over ranks), the
    big batch would divide by C = max(sum(n) / world_size, 1); weighting micro-batch m by c_m / C therefore gives
    exactly sum(S_m) / C. Per-query mean terms get 1 / accum_steps, which equals the big-batch mean when every
    micro-batch has the same size (DETR's weighted cross-entropy: only approximately, its no-object weights vary).
    Returns (box-term weights, mean-term weight).
    """
    if not box_counts:
        raise ValueError("accumulation_weights needs at least one micro-batch")
    total = max(sum(box_counts) / world_size, 1.0)
    return [max(n / world_size, 1.0) / total for n in box_counts], 1.0 / len(box_counts)


def grad_global_norm(parameters: list[nn.Parameter]) -> torch.Tensor:
    """L2 norm over all gradients (what clip_grad_norm_ reports), used for logging when clipping is off."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
