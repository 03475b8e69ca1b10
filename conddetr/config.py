"""Typed experiment schema (OmegaConf structured dataclasses) and `load_config`.

The only module in `conddetr` that reads YAML. Defaults are the published COCO recipe for Conditional DETR R50.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    # Field names are the published argparse names, so a released `args` namespace maps one to one.
    variant: str = "conditional"  # "conditional" | "detr": the one switch between the two papers
    backbone: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101
    dilation: bool = False  # DC5: dilate layer4 (stride 16 instead of 32)
    pretrained_backbone: str | None = None  # local file of torchvision ImageNet weights; nothing is downloaded
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


@dataclass
class LaunchConfig:
    # SLURM resources (submitit); overridable as launch.<key>=value on the command line.
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: int = 8
    timeout_min: int = 60
    constraint: str | None = None
    array_parallelism: int = 16  # max simultaneously running jobs of a sweep array
    extra_sbatch: dict[str, str] = field(default_factory=dict)  # any other sbatch option


@dataclass
class Config:
    name: str = "conddetr_r50"  # experiment name: W&B group, default run folder name
    output_dir: str = "runs"  # run folders live in output_dir/<name> unless run_dir is set
    run_dir: str | None = None
    device: str = "auto"  # auto | cpu | cuda
    checkpoint_every_epochs: int = 10  # periodic copies kept beside the rolling latest checkpoint
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
