"""Value checks after layering: allowed strings, ranges, and rules across keys; errors name each key's source."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from conddetr.config.schema import ConfigError

# Allowed values of the string "enum" fields (kept as str so published argparse names map one to one).
CHOICES: dict[str, tuple[str, ...]] = {
    "model.variant": ("conditional", "detr"),
    "model.backbone": ("resnet18", "resnet34", "resnet50", "resnet101"),
    "model.position_embedding": ("sine", "learned"),
    "model.backbone_norm": ("frozen_bn", "batch_norm"),
    "data.dataset": ("synthetic", "coco"),
    "data.label_mapping": ("category_id", "contiguous"),
    "optim.amp": ("none", "bf16", "fp16"),
    "tracking.wandb_mode": ("online", "offline", "disabled"),
    "device": ("auto", "cpu", "cuda"),  # "cuda:N" is accepted too
}


def _positive(v: Any) -> bool:
    return v >= 1


def _non_negative(v: Any) -> bool:
    return v >= 0


def _scales(v: Any) -> bool:
    return len(v) > 0 and all(s >= 1 for s in v)


# Range checks: key -> (predicate, what the value must be).
_RULES: dict[str, tuple[Any, str]] = {
    "model.hidden_dim": (
        lambda v: v >= 2 and v % 2 == 0,
        "an even integer >= 2 (sine embedding uses hidden_dim/2 per axis)",
    ),
    "model.nheads": (_positive, ">= 1"),
    "model.backbone_stage": (lambda v: v in (2, 3, 4), "2, 3 or 4 (the ResNet stage whose output is used)"),
    "model.enc_layers": (_non_negative, ">= 0"),
    "model.dec_layers": (_positive, ">= 1"),
    "model.dim_feedforward": (_positive, ">= 1"),
    "model.num_queries": (_positive, ">= 1"),
    "model.num_classes": (lambda v: v is None or v >= 1, "null (derive from the data) or >= 1"),
    "model.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    **{f"loss.{k}": (_non_negative, ">= 0") for k in ("set_cost_class", "set_cost_bbox", "set_cost_giou")},
    **{f"loss.{k}": (_non_negative, ">= 0") for k in ("cls_loss_coef", "bbox_loss_coef", "giou_loss_coef")},
    "loss.focal_alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "loss.eos_coef": (_non_negative, ">= 0"),
    "data.synthetic.image_size": (lambda v: v >= 16, ">= 16 pixels"),
    "data.synthetic.num_train": (_positive, ">= 1"),
    "data.synthetic.num_val": (_positive, ">= 1"),
    "data.synthetic.min_visible": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "data.train_scales": (_scales, "a non-empty list of sizes >= 1"),
    "data.crop_resize_scales": (_scales, "a non-empty list of sizes >= 1"),
    "data.crop_min_size": (_positive, ">= 1"),
    "data.crop_max_size": (_positive, ">= 1"),
    "data.max_size": (_positive, ">= 1"),
    "data.val_scale": (_positive, ">= 1"),
    "data.batch_size": (_positive, ">= 1"),
    "data.num_workers": (_non_negative, ">= 0"),
    **{f"optim.{k}": (_non_negative, ">= 0") for k in ("lr", "lr_backbone", "weight_decay", "clip_max_norm")},
    "optim.epochs": (_non_negative, ">= 0"),
    "optim.lr_drop_epoch": (_non_negative, ">= 0"),
    "optim.accum_steps": (_positive, ">= 1"),
    "eval.every_epochs": (_positive, ">= 1"),
    "tracking.log_every_steps": (_positive, ">= 1"),
    "tracking.log_images": (_non_negative, ">= 0 (0: no images)"),
    "checkpoint_every_epochs": (_non_negative, ">= 0 (0: only the rolling latest checkpoint)"),
    "checkpoint_every_steps": (_non_negative, ">= 0 (0: checkpoints only at epoch ends and on a stop signal)"),
    **{f"launch.{k}": (_positive, ">= 1") for k in ("nodes", "cpus_per_task", "mem_gb", "timeout_min")},
    "launch.gpus_per_node": (_non_negative, ">= 0"),
    "launch.tasks_per_node": (lambda v: v is None or v >= 1, "null (one per GPU, 1 on a CPU node) or >= 1"),
    "launch.array_parallelism": (_positive, ">= 1"),
    **{f"pretrain.{k}": (_positive, ">= 1") for k in ("num_images", "steps", "images_per_step")},
    "pretrain.peak_lr": (lambda v: v > 0, "> 0"),
    "pretrain.extent_loss_coef": (_non_negative, ">= 0"),
}


def validate(cfg: DictConfig, provenance: dict[str, str]) -> None:
    """Raise ConfigError for the first value that breaks a rule, naming the source (`provenance`) of each key."""

    def where(key: str) -> str:
        return provenance.get(key, "the schema defaults")

    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if key == "device" and isinstance(value, str) and re.fullmatch(r"cuda:\d+", value):
            continue
        if value not in allowed:
            hint = difflib.get_close_matches(str(value), allowed, n=1)
            suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
            raise ConfigError(f"{key}={value!r} in {where(key)} is not one of: {', '.join(allowed)}{suggestion}")
    for key, (ok, requirement) in _RULES.items():
        value = OmegaConf.select(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key}={value!r} in {where(key)} must be {requirement}")

    m, d = cfg.model, cfg.data
    if m.dilation and m.backbone_stage != 4:
        raise ConfigError(
            f"model.dilation=true ({where('model.dilation')}) dilates layer4, but model.backbone_stage="
            f"{m.backbone_stage} ({where('model.backbone_stage')}) stops the backbone before it"
        )
    if cfg.pretrain.enabled and d.dataset != "synthetic":
        raise ConfigError(
            f"pretrain.enabled=true ({where('pretrain.enabled')}) pretrains on the synthetic generator's images, but "
            f"data.dataset={d.dataset!r} ({where('data.dataset')}): give real data real weights "
            "(model.pretrained_backbone=FILE)"
        )
    if cfg.pretrain.enabled and m.pretrained_backbone:
        raise ConfigError(
            f"pretrain.enabled=true ({where('pretrain.enabled')}) and model.pretrained_backbone="
            f"{m.pretrained_backbone!r} ({where('model.pretrained_backbone')}) both set the backbone weights: set one"
        )
    if m.hidden_dim % m.nheads:
        raise ConfigError(
            f"model.hidden_dim={m.hidden_dim} ({where('model.hidden_dim')}) must be divisible by "
            f"model.nheads={m.nheads} ({where('model.nheads')})"
        )
    if not d.crop_min_size <= d.crop_max_size:
        raise ConfigError(
            f"data.crop_min_size={d.crop_min_size} ({where('data.crop_min_size')}) must be <= "
            f"data.crop_max_size={d.crop_max_size} ({where('data.crop_max_size')})"
        )
    if d.crop_min_size > min(d.crop_resize_scales):
        raise ConfigError(
            f"data.crop_min_size={d.crop_min_size} ({where('data.crop_min_size')}) must fit in the "
            f"smallest data.crop_resize_scales={min(d.crop_resize_scales)} "
            f"({where('data.crop_resize_scales')}): the random crop is taken from that resize"
        )
    for key in ("data.train_scales", "data.val_scale"):
        value = OmegaConf.select(cfg, key)
        largest = max(value) if isinstance(value, Iterable) else value
        if largest > d.max_size:
            raise ConfigError(f"{key}={value} ({where(key)}) exceeds data.max_size={d.max_size}, the long-side cap")
    n = cfg.launch
    if n.gpus_per_node > 0 and n.tasks_per_node is not None and n.tasks_per_node > n.gpus_per_node:
        raise ConfigError(
            f"launch.tasks_per_node={n.tasks_per_node} ({where('launch.tasks_per_node')}) exceeds "
            f"launch.gpus_per_node={n.gpus_per_node} ({where('launch.gpus_per_node')}): each process takes the GPU "
            "of its local rank"
        )
    if d.dataset == "coco" and not d.root:
        needed = ["data.val_images", "data.val_annotations"]
        if not cfg.eval.eval_only:
            needed = ["data.train_images", "data.train_annotations", *needed]
        unset = [k for k in needed if OmegaConf.select(cfg, k) is None]
        if unset:
            raise ConfigError(
                f"required value 'data.root' is missing: data.dataset=coco ({where('data.dataset')}) "
                f"needs data.root=/path/to/coco (or all of {', '.join(unset)})"
            )
