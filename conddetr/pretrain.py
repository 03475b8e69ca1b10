"""Backbone pretraining on synthetic images (not published): our stand-in for the published ImageNet weights.

A torchvision ResNet (trainable batch norm) learns dense shape labels on images the detection splits never contain;
the result is a torchvision-format file that `model.pretrained_backbone` reads, cached per settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from tqdm import tqdm

from conddetr.data.synthetic import GENERATOR_VERSION, SHAPES, Difficulty, render_scene
from conddetr.models.backbone import STAGE_CHANNELS

log = logging.getLogger(__name__)

PRETRAIN_VERSION = 1  # bump when the objective or the data changes, so old cache files are not reused
PRETRAIN_SPLIT = 2  # synthetic stream id: detection uses 0 (train) and 1 (val), so no image is ever shared
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the detection pipeline's normalisation, so features transfer as they are
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKGROUND = len(SHAPES)  # class index of background cells


@dataclass(frozen=True)
class PretrainSettings:
    """Everything the pretrained file depends on (its cache key); plain values, no config object."""

    backbone: str = "resnet18"
    last_stage: int = 4  # train stem..layer<last_stage>; later stages are not in the file
    image_size: int = 128
    num_images: int = 4000
    max_objects: int = 6
    min_object_size: int = 16
    class_colours: bool = False
    min_visible: float = 0.5
    seed: int = 0
    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    extent_loss_coef: float = 1.0  # box-extent regression on object cells of the last stage (0: labels only)

    def cache_key(self) -> str:
        fields = dataclasses.asdict(self)
        text = json.dumps({**fields, "v": PRETRAIN_VERSION, "gen": GENERATOR_VERSION}, sort_keys=True)
        digest = hashlib.sha1(text.encode()).hexdigest()[:12]
        return f"{self.backbone}_stage{self.last_stage}_{self.image_size}px_{digest}"

    @property
    def difficulty(self) -> Difficulty:
        return Difficulty(self.max_objects, self.min_object_size, self.class_colours, self.min_visible)


def backbone_file(cache_dir: str | Path, settings: PretrainSettings) -> Path:
    """Where the pretrained file of `settings` lives (whether or not it exists yet)."""
    return Path(cache_dir) / f"{settings.cache_key()}.pth"


def _render_one(job: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    seed, index, size, difficulty = job
    rng = np.random.default_rng([seed, PRETRAIN_SPLIT, index])
    image, objects, owner = render_scene(rng, size, difficulty)
    classes = np.array([shape for shape, _ in objects] + [BACKGROUND], dtype=np.int64)
    labels = classes[owner].astype(np.uint8)  # owner -1 (background) picks the last entry
    boxes = np.array([[x, y, x + w, y + h] for _, (x, y, w, h) in objects] + [[0, 0, 0, 0]], dtype=np.float32)
    return image, labels, boxes[owner].astype(np.float16)  # [S,S,3], [S,S], [S,S,4] box of each pixel's object


def render_pretrain_set(s: PretrainSettings, workers: int | None = None) -> dict[str, torch.Tensor]:
    """Images uint8 [N,3,S,S], labels uint8 [N,S,S] (shape index, BACKGROUND elsewhere), boxes f16 [N,4,S,S]
    (xyxy pixels of each pixel's object). Deterministic in the settings, whatever the worker count."""
    jobs = [(s.seed, i, s.image_size, s.difficulty) for i in range(s.num_images)]
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers > 1 and len(jobs) >= 256 and "fork" in mp.get_all_start_methods():
        with mp.get_context("fork").Pool(workers) as pool:
            rendered = pool.map(_render_one, jobs, chunksize=32)
    else:
        rendered = [_render_one(job) for job in jobs]
    images, labels, boxes = (np.stack(parts) for parts in zip(*rendered, strict=True))
    return {
        "images": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        "labels": torch.from_numpy(labels),
        "boxes": torch.from_numpy(boxes).permute(0, 3, 1, 2).contiguous(),
    }


class DenseHeads(nn.Module):
    """1x1 convolutions on the trunk's stages: shape class per cell (every stage), box extent (last stage)."""

    def __init__(self, backbone: str, last_stage: int):
        super().__init__()
        channels = STAGE_CHANNELS[backbone][:last_stage]
        self.classify = nn.ModuleList(nn.Conv2d(c, BACKGROUND + 1, 1) for c in channels)
        self.extent = nn.Conv2d(channels[-1], 4, 1)


def build_trunk(backbone: str, last_stage: int) -> nn.Sequential:
    """torchvision ResNet stem + layer1..layer<last_stage>, trainable BatchNorm, torchvision module names."""
    resnet = getattr(torchvision.models, backbone)(weights=None)
    names = ("conv1", "bn1", "relu", "maxpool", *(f"layer{i}" for i in range(1, last_stage + 1)))
    return nn.Sequential(OrderedDict((n, getattr(resnet, n)) for n in names))


def _stage_outputs(trunk: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    outs = []
    for name, module in trunk.named_children():
        x = module(x)
        if name.startswith("layer"):
            outs.append(x)  # [B, C_s, S / stride_s, S / stride_s]
    return outs


def dense_losses(
    features: list[torch.Tensor], heads: DenseHeads, labels: torch.Tensor, boxes: torch.Tensor, size: int
) -> dict[str, torch.Tensor]:
    """Per-stage cell classification (labels sampled at cell centres) and, on object cells of the last stage,
    L1 on the distances from the cell centre to the four box sides (FCOS-style, in image sizes)."""
    out = {}
    for i, (feat, head) in enumerate(zip(features, heads.classify, strict=True)):
        h, w = feat.shape[-2:]
        target = F.interpolate(labels[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()  # [B, h, w]
        out[f"cls_{i + 1}"] = F.cross_entropy(head(feat), target)
    feat = features[-1]
    h, w = feat.shape[-2:]
    box = F.interpolate(boxes.float(), size=(h, w), mode="nearest")  # [B, 4, h, w] xyxy pixels
    cls = F.interpolate(labels[:, None].float(), size=(h, w), mode="nearest")[:, 0]  # [B, h, w]
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) * (labels.shape[-2] / h)
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) * (labels.shape[-1] / w)
    cy, cx = ys[:, None].expand(h, w), xs[None, :].expand(h, w)
    target = torch.stack([cx - box[:, 0], cy - box[:, 1], box[:, 2] - cx, box[:, 3] - cy], 1) / size  # [B,4,h,w]
    fg = (cls != BACKGROUND)[:, None].expand_as(target)
    pred = heads.extent(feat)
    out["extent"] = F.l1_loss(pred[fg], target[fg]) if fg.any() else pred.sum() * 0
    return out


def _augment(images: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor, gen: torch.Generator):
    """Horizontal flip per image (boxes follow), then one random rescale in [0.75, 1] of the whole batch: the
    detection pipeline shows the backbone such sizes."""
    size = images.shape[-1]
    flip = torch.rand(images.shape[0], generator=gen) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    labels = torch.where(flip[:, None, None], labels.flip(-1), labels)
    flipped = torch.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], 1).flip(-1)
    boxes = torch.where(flip[:, None, None, None], flipped, boxes)
    scale = float(torch.empty(1).uniform_(0.75, 1.0, generator=gen))
    new = max(32, round(size * scale / 8) * 8)
    if new != size:
        images = F.interpolate(images, size=(new, new), mode="bilinear", align_corners=False, antialias=True)
        labels = F.interpolate(labels[:, None].float(), size=(new, new), mode="nearest")[:, 0].to(labels.dtype)
        boxes = F.interpolate(boxes, size=(new, new), mode="nearest") * (new / size)
    return images, labels, boxes


def _normalise(images_uint8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD)[None, :, None, None]
    return (images_uint8.float() / 255 - mean) / std


def pretrain(s: PretrainSettings, out: str | Path, show_progress: bool = True) -> dict:
    """Train the trunk on dense labels and write its torchvision-format state dict to `out` (atomically).

    Returns the summary also written beside it as JSON (settings, final losses, cell accuracy, seconds).
    """
    from conddetr.engine.checkpoint import atomic_save

    out = Path(out)
    start = time.perf_counter()
    torch.manual_seed(s.seed)
    data = render_pretrain_set(s)
    log.info("rendered %d pretraining images of %d px in %.1f s", s.num_images, s.image_size,
             time.perf_counter() - start)  # fmt: skip
    trunk, heads = build_trunk(s.backbone, s.last_stage), DenseHeads(s.backbone, s.last_stage)
    params = [*trunk.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    warmup = max(1, s.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i / s.steps, 1.0)))
    )
    gen = torch.Generator().manual_seed(s.seed)
    trunk.train()
    window: dict[str, list[float]] = {}
    bar = tqdm(range(s.steps), desc="pretrain backbone", disable=not show_progress, dynamic_ncols=True)
    for _ in bar:
        idx = torch.randint(0, s.num_images, (s.batch_size,), generator=gen)
        images, labels, boxes = _augment(data["images"][idx], data["labels"][idx], data["boxes"][idx].float(), gen)
        losses = dense_losses(_stage_outputs(trunk, _normalise(images)), heads, labels, boxes, s.image_size)
        total = sum(v for k, v in losses.items() if k != "extent") + s.extent_loss_coef * losses["extent"]
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        schedule.step()
        for k, v in losses.items():
            window.setdefault(k, []).append(float(v.detach()))
        bar.set_postfix({k: f"{np.mean(v[-20:]):.3f}" for k, v in window.items()})
    summary = {
        "settings": dataclasses.asdict(s),
        "final_losses": {k: float(np.mean(v[-20:])) for k, v in window.items()},
        "seconds": round(time.perf_counter() - start, 1),
        **evaluate_cells(trunk, heads, s),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(trunk.state_dict(), out)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    log.info("pretrained backbone written to %s: %s", out, json.dumps(summary))
    return summary


@torch.no_grad()
def evaluate_cells(trunk: nn.Sequential, heads: DenseHeads, s: PretrainSettings) -> dict:
    """Cell accuracy of the last stage's classifier on fresh images (all cells, and object cells alone)."""
    count = min(256, max(8, s.num_images // 8))
    held_out = dataclasses.replace(s, seed=s.seed + 1_000_003, num_images=count)
    data = render_pretrain_set(held_out, workers=1)
    trunk.eval()
    feat = _stage_outputs(trunk, _normalise(data["images"]))[-1]
    pred = heads.classify[-1](feat).argmax(1)  # [N, h, w]
    target = F.interpolate(data["labels"][:, None].float(), size=pred.shape[-2:], mode="nearest")[:, 0].long()
    fg = target != BACKGROUND
    trunk.train()
    return {
        "cell_accuracy": float((pred == target).float().mean()),
        "object_cell_accuracy": float((pred[fg] == target[fg]).float().mean()),
    }


def ensure_pretrained_backbone(
    cache_dir: str | Path, s: PretrainSettings, show_progress: bool | None = None, force: bool = False
) -> Path:
    """The cached file of `s`, pretraining it first when missing (or `force`); concurrent callers (ranks, the jobs
    of a sweep) wait for the one that pretrains. `show_progress` None: a progress bar when stderr is a terminal."""
    path = backbone_file(cache_dir, s)
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    if force and path.is_file():
        path.unlink()
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock, _locked(lock):
        if path.is_file():  # another process made it while we waited
            return path
        log.info("no pretrained backbone %s: pretraining it (%d steps of %d images)", path, s.steps, s.batch_size)
        pretrain(s, path, show_progress=show_progress)
    return path


@contextlib.contextmanager
def _locked(handle):
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
