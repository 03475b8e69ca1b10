"""Typed experiment schema (OmegaConf structured dataclasses), `load_config`, saving and sweep expansion.

The only module in `conddetr` that reads YAML. Defaults are the published COCO recipe for Conditional DETR R50.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import itertools
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_NAME = "config.yaml"  # resolved config saved in every run folder
COMMAND_LINE = "command line"  # source name used in errors about overrides


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

_Source = tuple[str, dict]  # (name used in messages, plain nested dict)


def load_config(spec_path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Schema defaults <- spec YAML (after its `base` chain) <- `key=value` overrides, then validated.

    Returns a structured, writable DictConfig (struct mode: assigning an unknown key or a wrong type still fails).
    When no source sets `name`, it defaults to the spec file's stem. Raises ConfigError naming key and source.
    """
    sources: list[_Source] = []
    if spec_path is not None:
        sources += _read_spec_chain(Path(spec_path), seen=())
    sources += [(f"{COMMAND_LINE} override '{item}'", _parse_override(item)) for item in overrides]
    cfg, provenance = _build(sources)
    if spec_path is not None and "name" not in provenance:
        cfg.name = Path(spec_path).stem
    _validate(cfg, provenance)
    return cfg


def save_config(cfg: DictConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically); a folder gets `CONFIG_NAME` inside it. Returns the file."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_NAME
    text = OmegaConf.to_yaml(cfg, resolve=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)  # a preempted job never leaves a half-written config behind
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def run_dir_of(cfg: DictConfig) -> Path:
    """The run folder: `run_dir` when set, else `output_dir/<name>` (one rule for the launcher and the engine)."""
    return Path(cfg.run_dir) if cfg.run_dir else Path(cfg.output_dir) / cfg.name


def config_to_dict(cfg: DictConfig) -> dict:
    """Plain nested dict (str/int/float/bool/None/list/dict), safe in a `weights_only=True` checkpoint."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def config_from_dict(data: Mapping, overrides: Iterable[str] = (), source: str = "saved config") -> DictConfig:
    """Back from `config_to_dict` output (checkpoint, config.yaml) to a validated config, for resume and eval."""
    if isinstance(data, DictConfig):
        data = OmegaConf.to_container(data, resolve=False)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source} must be a mapping of config keys, got {type(data).__name__}")
    sources = [(source, dict(data))]
    sources += [(f"{COMMAND_LINE} override '{item}'", _parse_override(item)) for item in overrides]
    cfg, provenance = _build(sources)
    _validate(cfg, provenance)
    return cfg


def _read_yaml_mapping(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and OmegaConf grammar errors
        raise ConfigError(f"cannot parse YAML in {path}: {e}") from e
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path} must hold a mapping of keys, not a {type(node).__name__}")
    return OmegaConf.to_container(node, resolve=False)


def _read_spec_chain(path: Path, seen: tuple[Path, ...]) -> list[_Source]:
    """The spec and, first, the specs it names through `base:` (resolved relative to the naming file)."""
    resolved = path.resolve()
    if resolved in seen:
        raise ConfigError(f"'base' chain loops back to {path}")
    data = _read_yaml_mapping(path)
    base = data.pop("base", None)
    chain: list[_Source] = []
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"'base' in {path} must be the path of another spec, relative to {path}")
        chain = _read_spec_chain(path.parent / base, seen + (resolved,))
    return chain + [(str(path), data)]


def _parse_override(item: str) -> dict:
    key, eq, _ = item.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(f"{COMMAND_LINE} override '{item}' is not of the form key=value")
    if key[0] in "+~":
        raise ConfigError(f"{COMMAND_LINE} override '{item}': adding or deleting keys is not allowed (fixed schema)")
    try:
        node = OmegaConf.from_dotlist([item])
    except Exception as e:
        raise ConfigError(f"cannot parse {COMMAND_LINE} override '{item}': {e}") from e
    return OmegaConf.to_container(node, resolve=False)


def _is_section(node: Any) -> bool:
    return isinstance(node, DictConfig) and is_dataclass(OmegaConf.get_type(node))


def _build(sources: Sequence[_Source]) -> tuple[DictConfig, dict[str, str]]:
    """Merge sources onto the schema; returns the config and, per leaf key set, the source that set it last."""
    cfg = OmegaConf.structured(Config)
    provenance: dict[str, str] = {}
    missing: dict[str, str] = {}  # keys whose latest value is "???", with the source that said so
    for source, data in sources:
        # Walk first: OmegaConf's own errors name neither the file nor the closest valid key.
        _check_keys(cfg, data, "", source, provenance, missing)
        try:
            cfg.merge_with(data)  # in place: OmegaConf.merge deep-copies the whole tree per source
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            reason = str(e).splitlines()[0]
            raise ConfigError(f"bad value for '{key}' in {source}: {reason}") from e
    try:
        OmegaConf.resolve(cfg)  # `${...}` interpolations in specs become plain values here
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        where = provenance.get(key, "the schema defaults")
        raise ConfigError(f"cannot resolve '{key}' in {where}: {str(e).splitlines()[0]}") from e
    if missing:
        key, source = next(iter(missing.items()))
        raise ConfigError(f"required value '{key}' is missing: {source} leaves it '???'; set it, e.g. {key}=...")
    return cfg, provenance


def _check_keys(node: DictConfig, data: dict, prefix: str, source: str, provenance: dict, missing: dict) -> None:
    valid = set(node.keys())
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in valid:
            raise ConfigError(f"unknown key '{full}' in {source}{_did_you_mean(full)}")
        child = node._get_node(key)
        if _is_section(child):
            if not isinstance(value, dict):
                keys = ", ".join(str(k) for k in child.keys())
                raise ConfigError(f"'{full}' in {source} must be a section with keys ({keys}), got {value!r}")
            _check_keys(child, value, f"{full}.", source, provenance, missing)
            continue
        if isinstance(value, dict) and not isinstance(child, DictConfig):
            raise ConfigError(f"'{full}' in {source} is a single value, not a section; got {value!r}")
        provenance[full] = source
        if value == "???":
            missing[full] = source
        else:
            missing.pop(full, None)


@functools.cache
def _schema_paths() -> tuple[str, ...]:
    """Every dotted key of the schema, sections included (e.g. `data`, `data.synthetic.seed`)."""
    paths: list[str] = []

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node.keys():
            paths.append(f"{prefix}{key}")
            child = node._get_node(key)
            if _is_section(child):
                walk(child, f"{prefix}{key}.")

    walk(OmegaConf.structured(Config), "")
    return tuple(paths)


def _did_you_mean(full: str) -> str:
    paths = _schema_paths()
    by_leaf: dict[str, list[str]] = {}
    for p in paths:
        by_leaf.setdefault(p.rsplit(".", 1)[-1], []).append(p)
    leaf = full.rsplit(".", 1)[-1]
    # A right name under the wrong section (`lr=...`, `model.lr`) is found by its last part.
    close = by_leaf.get(leaf, [])
    if not close:
        ancestors = {full.rsplit(".", n)[0] for n in range(1, full.count(".") + 1)}
        close = difflib.get_close_matches(full, [p for p in paths if p not in ancestors], n=1, cutoff=0.6)
    if not close:
        leaves = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        close = by_leaf[leaves[0]] if leaves else []
    if not close:
        return "; valid keys are listed in conddetr/config.py"
    return "; did you mean " + " or ".join(f"'{c}'" for c in close) + "?"


def _validate(cfg: DictConfig, provenance: dict[str, str]) -> None:
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


SWEEP_KEYS = ("base", "common", "grid", "runs")


def load_sweep(path: str | os.PathLike) -> tuple[str, list[list[str]]]:
    """Expand a sweep file into (base spec path, one override list per run); every run is validated.

    Order: for each entry of `runs` (file order), every `grid` point (cartesian product, first key slowest).
    `common` overrides come first in every run.
    """
    base_path, named = load_sweep_runs(path)
    return base_path, [overrides for _, overrides in named]


def load_sweep_runs(path: str | os.PathLike) -> tuple[str, list[tuple[str, list[str]]]]:
    """`load_sweep` with each run's name: `run_name_for` of its grid and run overrides (`common` ones are shared by
    every run, so they stay out of the names)."""
    path = Path(path)
    data = _read_yaml_mapping(path)
    for key in data:
        if key not in SWEEP_KEYS:
            hint = difflib.get_close_matches(str(key), SWEEP_KEYS, n=1)
            suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
            raise ConfigError(f"unknown key '{key}' in sweep {path} (valid: {', '.join(SWEEP_KEYS)}){suggestion}")
    base = data.get("base")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"sweep {path} needs 'base': the spec path, relative to the sweep file")
    base_path = os.path.normpath(path.parent / base)
    common = data.get("common") or {}
    if not isinstance(common, dict):
        raise ConfigError(f"'common' in sweep {path} must be a mapping of overrides shared by every run")
    common = flatten_keys(common)
    grid = data.get("grid") or {}
    runs = data.get("runs")
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"'grid' in sweep {path} must map each key to a non-empty list of values")
    if runs is not None and not (isinstance(runs, list) and runs and all(isinstance(r, dict) for r in runs)):
        raise ConfigError(f"'runs' in sweep {path} must be a non-empty list of override mappings ({{}} = base)")
    if not grid and runs is None:
        raise ConfigError(f"sweep {path} defines no runs: give 'grid', 'runs' or both")

    points = [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]
    shared = [f"{k}={_format_value(v, path)}" for k, v in common.items()]
    expanded: list[tuple[str, list[str]]] = []
    names: dict[str, list[str]] = {}
    for index, run in enumerate(runs or [{}]):
        run = flatten_keys(run)
        for point in points:
            both = sorted(set(point) & set(run))
            if both:
                raise ConfigError(f"sweep {path}: runs[{index}] sets {', '.join(both)}, which 'grid' also sweeps")
            again = sorted(set(common) & (set(point) | set(run)))
            if again:
                raise ConfigError(f"sweep {path}: 'common' sets {', '.join(again)}, which 'grid' or 'runs' also set")
            own = [f"{k}={_format_value(v, path)}" for k, v in {**point, **run}.items()]
            overrides = shared + own
            try:
                load_config(base_path, overrides)
            except ConfigError as e:
                raise ConfigError(f"sweep {path}, run {overrides}: {e}") from e
            name = run_name_for(own)
            if name in names:
                raise ConfigError(f"sweep {path}: runs {names[name]} and {overrides} share the name '{name}'")
            names[name] = overrides
            expanded.append((name, overrides))
    return base_path, expanded


def run_name_for(overrides: Sequence[str]) -> str:
    """Readable, file-system-safe run name from overrides, e.g. `optim.lr=0.0002` -> `lr0.0002`; none -> `base`."""
    parts = []
    for item in overrides:
        key, _, value = item.partition("=")
        value = value.strip().strip("'\"")
        clean = re.sub(r"[^A-Za-z0-9.+-]+", "-", value)
        clean = (clean if value.startswith("-") else clean.lstrip("-")).rstrip("-") or "empty"
        joiner = "" if re.match(r"[-+.\d]", clean) else "-"  # numbers read well glued: lr0.0002, variant-detr
        parts.append(f"{_short_key(key.strip())}{joiner}{clean}")
    name = "_".join(parts) or "base"
    if len(name) > 120:  # file-system limits; the hash keeps long names unique
        name = f"{name[:100]}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return name


def _short_key(key: str) -> str:
    """Shortest dotted suffix naming one schema key: `optim.lr` -> `lr`, but `optim.seed` stays (data has one too)."""
    parts = key.split(".")
    paths = _schema_paths()
    for n in range(1, len(parts)):
        suffix = ".".join(parts[-n:])
        if sum(p == suffix or p.endswith(f".{suffix}") for p in paths) <= 1:
            return suffix
    return key


def flatten_keys(mapping: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested mappings ({model: {variant: detr}}) become dotted keys ({model.variant: detr})."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(flatten_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _format_value(value: Any, path: Path) -> str:
    """Override text that OmegaConf's dotlist parser reads back as the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(_format_value(v, path) for v in value) + "]"
    if isinstance(value, str):
        plain = re.fullmatch(r"[A-Za-z_/][\w./:-]*", value)
        if plain and value.lower() not in ("null", "true", "false", "none", "nan", "inf"):
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    raise ConfigError(f"sweep {path}: value {value!r} of type {type(value).__name__} cannot be an override")
