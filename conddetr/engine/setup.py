"""Builds a run's parts from the config: datasets, loaders, model, criterion, post-processor, DDP wrapper.

The one bridge between the config object and model code, which takes plain published-name arguments.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from conddetr.engine.distributed import DistEnv

log = logging.getLogger(__name__)


def model_kwargs_from_config(cfg, num_classes: int) -> dict:
    """Published-name keyword arguments of `build_model` (without `variant`) from a config's model section."""
    m = cfg.model
    return dict(
        backbone=m.backbone, dilation=m.dilation, hidden_dim=m.hidden_dim, nheads=m.nheads, enc_layers=m.enc_layers,
        dec_layers=m.dec_layers, dim_feedforward=m.dim_feedforward, num_queries=m.num_queries,
        num_classes=num_classes, dropout=m.dropout, position_embedding=m.position_embedding, aux_loss=m.aux_loss,
        lr_backbone=cfg.optim.lr_backbone, backbone_norm=m.backbone_norm, backbone_stage=m.backbone_stage,
    )  # fmt: skip


def pretrain_settings_from_config(cfg):
    """`pretrain.PretrainSettings` of a config: its pretrain section, model backbone and synthetic data knobs."""
    from conddetr.pretrain import PretrainSettings

    p, syn = cfg.pretrain, cfg.data.synthetic
    return PretrainSettings(
        backbone=cfg.model.backbone, last_stage=cfg.model.backbone_stage, image_size=syn.image_size,
        num_images=p.num_images, max_objects=syn.max_objects, min_object_size=syn.min_object_size,
        class_colours=syn.class_colours, min_visible=syn.min_visible, seed=p.seed, steps=p.steps,
        batch_size=p.images_per_step, lr=p.peak_lr, extent_loss_coef=p.extent_loss_coef,
    )  # fmt: skip


def backbone_weights(cfg) -> str | None:
    """The local file the backbone starts from: `model.pretrained_backbone`, or the synthetic-pretrained one (made
    first when missing, see conddetr/pretrain.py) when `pretrain.enabled`."""
    if not cfg.pretrain.enabled:
        return cfg.model.pretrained_backbone
    from conddetr.pretrain import ensure_pretrained_backbone

    return str(ensure_pretrained_backbone(cfg.pretrain.cache_dir, pretrain_settings_from_config(cfg)))


@dataclass
class Components:
    train_ds: object
    val_ds: object
    train_loader: object  # call data.batching.set_epoch before each epoch
    val_loader: object
    info: object  # data.DatasetInfo
    model: torch.nn.Module  # unwrapped: what checkpoints hold
    criterion: torch.nn.Module
    postprocessor: object
    model_kwargs: dict
    eval_model: torch.nn.Module | None = None  # the model evaluation calls (torch.compile'd with perf.compile)

    def export_state_dict(self) -> dict:
        from conddetr.models.published import export_published_state_dict

        return export_published_state_dict(self.model)


def build_components(cfg, env: DistEnv, device: torch.device) -> Components:
    """Datasets, loaders, model, criterion and postprocessor from the config (model code takes plain arguments)."""
    from conddetr.data import build_datasets
    from conddetr.data.batching import build_loaders
    from conddetr.models import build_criterion, build_model, build_postprocessor

    train_ds, val_ds, info = build_datasets(cfg.data, num_classes=cfg.model.num_classes)
    m = cfg.model
    if m.num_classes is None:
        log.info(
            "model.num_classes not set: using %d from the dataset (%s mapping)", info.num_classes, info.label_mapping
        )
    else:
        log.info("model.num_classes = %d (from the config)", m.num_classes)
    num_classes = m.num_classes if m.num_classes is not None else info.num_classes
    model_kwargs = model_kwargs_from_config(cfg, num_classes)
    model = build_model(
        m.variant, pretrained_backbone=backbone_weights(cfg), fused_backbone=cfg.perf.fused_backbone, **model_kwargs
    ).to(device)
    loss = cfg.loss
    criterion = build_criterion(
        m.variant, num_classes=num_classes, set_cost_class=loss.set_cost_class, set_cost_bbox=loss.set_cost_bbox,
        set_cost_giou=loss.set_cost_giou, cls_loss_coef=loss.cls_loss_coef, bbox_loss_coef=loss.bbox_loss_coef,
        giou_loss_coef=loss.giou_loss_coef, focal_alpha=loss.focal_alpha, eos_coef=loss.eos_coef,
        aux_loss=m.aux_loss, dec_layers=m.dec_layers,
    ).to(device)  # fmt: skip
    model_kwargs["variant"] = m.variant
    # The shuffle seed is the run seed on every rank (the shards must agree); rank offsets only the augmentation.
    loaders = build_loaders(
        train_ds, val_ds, cfg.data.batch_size, cfg.data.num_workers, distributed=env.distributed, seed=cfg.optim.seed
    )
    return Components(train_ds, val_ds, *loaders, info, model, criterion, build_postprocessor(m.variant), model_kwargs)


def wrap_ddp(model: torch.nn.Module, cfg, device: torch.device) -> DistributedDataParallel:
    """DDP around the unwrapped model (checkpoints save the unwrapped one).

    A one-layer Conditional DETR decoder never uses `query_scale` (layer 0 has T = 1); DDP must then look for
    unused parameters, or their gradient bucket is never all-reduced and the ranks silently diverge.
    """
    unused = cfg.model.variant == "conditional" and cfg.model.dec_layers < 2
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=unused)
