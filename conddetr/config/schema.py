"""The typed experiment schema: one dataclass per section, defaults = the published COCO recipe (Conditional DETR R50).

`ConfigError` is raised by every part of `conddetr.config` for a spec, override or saved config that does not fit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, is_dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A spec, override or saved config that does not fit the schema; the message names key and source."""


@dataclass
class ModelConfig:
    # Field names are the published argparse names, so a released `args` namespace maps one to one.
    variant: str = "conditional"  # "conditional" | "detr": the one switch between the two papers
    backbone: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101
    dilation: bool = False  # DC5: dilate layer4 (stride 16 instead of 32)
    pretrained_backbone: str | None = None  # local file of torchvision ImageNet weights; nothing is downloaded
    backbone_norm: str = "frozen_bn"  # frozen_bn (published) | batch_norm (not published: from-scratch backbones)
    backbone_stage: int = 4  # features after layer4 (published); 2 or 3 (not published): stride 8 / 16, small images
    hidden_dim: int = 256  # transformer width D
    nheads: int = 8  # attention heads
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    num_queries: int = 300  # published: 300 Conditional DETR, 100 DETR
    num_classes: int | None = None  # logits (sigmoid) or foreground classes (softmax); None = derive from the data
    dropout: float = 0.1
    position_embedding: str = "sine"  # sine | learned
    aux_loss: bool = True  # losses on every intermediate decoder layer


@dataclass
class LossConfig:
    # Published Conditional DETR values; DETR specs override class cost/coef (1) and use eos_coef.
    set_cost_class: float = 2.0  # matcher weight of the class cost
    set_cost_bbox: float = 5.0  # matcher weight of the L1 box cost
    set_cost_giou: float = 2.0  # matcher weight of the -GIoU cost
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    focal_alpha: float = 0.25  # Conditional DETR sigmoid focal loss
    eos_coef: float = 0.1  # DETR no-object class weight


@dataclass
class SyntheticConfig:
    cache_dir: str = ".cache/synthetic"  # generated once per (seed, sizes, counts) and reused
    seed: int = 0
    image_size: int = 128  # square images, pixels
    num_train: int = 512
    num_val: int = 64
    max_objects: int = 10  # objects per image drawn uniformly in 1..max_objects (difficulty knob)
    min_object_size: int = 14  # smallest object side in pixels; 32 drops COCO's small bucket (difficulty knob)
    class_colours: bool = False  # each shape its own colour: easy classification, localisation stays (difficulty knob)
    min_visible: float = 0.5  # share of an object later ones must leave visible; 1.0 = no overlap (difficulty knob)


@dataclass
class DataConfig:
    dataset: str = "synthetic"  # synthetic | coco (any COCO-format dataset)
    root: str = ""  # COCO root; both root/train2017 and root/images/train2017 layouts are found
    train_images: str | None = None  # overrides the folder derived from root
    train_annotations: str | None = None  # overrides root/annotations/instances_train2017.json
    val_images: str | None = None
    val_annotations: str | None = None
    label_mapping: str = "category_id"  # category_id (published: label = id) | contiguous (0..K-1, saved with run)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # Published augmentation: multi-scale short side, long side capped; random resize+crop branch.
    train_scales: list[int] = field(default_factory=lambda: list(range(480, 801, 32)))
    crop_resize_scales: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_min_size: int = 384
    crop_max_size: int = 600
    random_crop: bool = True  # the published resize-crop branch; false (not published) only flips and resizes
    max_size: int = 1333  # long-side cap, pixels
    val_scale: int = 800  # validation short side
    batch_size: int = 2  # images per process (per GPU); total = batch_size * world_size * accum_steps
    num_workers: int = 2


@dataclass
class OptimConfig:
    lr: float = 1e-4
    lr_backbone: float = 1e-5  # 0 freezes the whole backbone
    weight_decay: float = 1e-4
    epochs: int = 50  # full passes over the training set
    lr_drop_epoch: int = 40  # lr divided by 10 after this many epochs
    clip_max_norm: float = 0.1  # gradient L2 clipping; 0 disables
    accum_steps: int = 1  # gradient accumulation, to reach the published 16-image batch on fewer GPUs
    amp: str = "none"  # none | bf16 | fp16
    seed: int = 42  # + rank


@dataclass
class EvalConfig:
    every_epochs: int = 1  # COCO evaluation period, epochs
    eval_only: bool = False  # evaluate `checkpoint` (ours or a released one) and stop
    checkpoint: str | None = None  # weights to evaluate or start from
    fine_tune: bool = False  # allow a checkpoint with another class count: class head re-initialised
    per_category_ap: bool = False


@dataclass
class TrackingConfig:
    wandb_mode: str = "offline"  # online | offline | disabled
    project: str = "conddetr"
    entity: str | None = None
    group: str | None = None  # defaults to the experiment name
    tags: list[str] = field(default_factory=list)
    log_every_steps: int = 10
    # Not published: val images drawn to W&B with predicted and true boxes at each evaluation (0: none).
    log_images: int = 8


@dataclass
class LaunchConfig:
    # SLURM resources (submitit); overridable as launch.<key>=value on the command line.
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # processes per node; None: one per GPU, 1 on a CPU node (gloo when > 1)
    cpus_per_task: int = 2
    mem_gb: int = 8
    timeout_min: int = 60
    constraint: str | None = None
    array_parallelism: int = 16  # max simultaneously running jobs of a sweep array
    extra_sbatch: dict[str, str] = field(default_factory=dict)  # any other sbatch option


@dataclass
class PretrainConfig:
    # Not published: a synthetic stand-in for the published ImageNet weights (conddetr/pretrain.py). With `enabled`,
    # the backbone (model.backbone up to model.backbone_stage) starts from the cached file of these settings, made by
    # `python -m conddetr pretrain-backbone SPEC` or on first use; detection keeps the published frozen BN. Images
    # come from the data.synthetic generator (its size and difficulty knobs) in a stream of their own.
    enabled: bool = False
    cache_dir: str = ".cache/backbones"  # one file per settings, reused by every run that asks for them
    seed: int = 0  # of the pretraining images and initialisation; never one of the detection splits' streams
    num_images: int = 3000  # rendered once into memory, sampled with flips and rescaling
    steps: int = 300
    images_per_step: int = 32
    peak_lr: float = 2e-3  # AdamW, linear warm-up then cosine decay
    extent_loss_coef: float = 1.0  # weight of the box-extent regression beside the dense shape labels


@dataclass
class PerfConfig:
    # Not published: speed options. Only tf32 (and optim.amp) change numbers beyond float rounding.
    fused_backbone: bool = True  # frozen BN folded into its conv; CPU: oneDNN fused conv+bias(+add)+ReLU (~1e-6 rel.)
    compile: bool = False  # torch.compile the model for training and evaluation; checkpoints keep the plain module
    tf32: bool = False  # CUDA only: TF32 matmuls and convolutions (~1e-3 relative error, faster on Ampere+)
    tune_malloc: bool = True  # launcher: glibc mmap threshold 32 MiB, trim 256 MiB (fewer page faults on the CPU)


@dataclass
class Config:
    name: str = "conddetr_r50"  # experiment name: W&B group, default run folder name
    output_dir: str = "runs"  # run folders live in output_dir/<name> unless run_dir is set
    run_dir: str | None = None
    device: str = "auto"  # auto | cpu | cuda
    checkpoint_every_epochs: int = 10  # periodic copies kept beside the rolling latest checkpoint
    checkpoint_every_steps: int = 0  # also save the rolling checkpoint mid-epoch every N optimizer steps (0: off)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)


def is_section(node: Any) -> bool:
    """Whether a config node is a schema section (a nested dataclass), not a leaf value."""
    return isinstance(node, DictConfig) and is_dataclass(OmegaConf.get_type(node))


@functools.cache
def schema_paths() -> tuple[str, ...]:
    """Every dotted key of the schema, sections included (e.g. `data`, `data.synthetic.seed`)."""
    paths: list[str] = []

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node.keys():
            paths.append(f"{prefix}{key}")
            child = node._get_node(key)
            if is_section(child):
                walk(child, f"{prefix}{key}.")

    walk(OmegaConf.structured(Config), "")
    return tuple(paths)
