"""CPU speed of Conditional DETR R50 vs DETR R50 (random init): forward, and train step (forward + loss + backward).

Batch 2 x 3x512x640 by default; model calls alternate so load from other processes hits both alike. Prints median
seconds and the median per-round ratio Conditional / DETR. Timings are only comparable under the same allocator
settings: MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456 python benchmarks/bench_model.py
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from timing import alternate  # benchmarks/timing.py (scripts run from their folder)

from conddetr.models import build_criterion, build_model

# Published loss settings of each paper (matcher costs = loss weights except DETR's class cost 1).
LOSS = {
    "conditional": dict(set_cost_class=2.0, cls_loss_coef=2.0),
    "detr": dict(set_cost_class=1.0, cls_loss_coef=1.0),
}


def make_setup(variant: str, backbone: str, num_classes: int = 91):
    torch.manual_seed(0)
    model = build_model(variant, backbone=backbone, num_classes=num_classes)
    criterion = build_criterion(
        variant,
        num_classes=num_classes,
        set_cost_bbox=5.0,
        set_cost_giou=2.0,
        bbox_loss_coef=5.0,
        giou_loss_coef=2.0,
        focal_alpha=0.25,
        eos_coef=0.1,
        aux_loss=True,
        dec_layers=6,
        **LOSS[variant],
    )
    return model, criterion


def make_batch(batch: int, height: int, width: int):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=gen)
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    mask[1:, :, width * 7 // 8 :] = True  # later images narrower, as in real padded batches
    targets = []
    for _ in range(batch):
        n = 5
        centers = 0.2 + 0.6 * torch.rand(n, 2, generator=gen)
        sizes = 0.05 + 0.3 * torch.rand(n, 2, generator=gen)
        targets.append({"boxes": torch.cat((centers, sizes), 1), "labels": torch.randint(1, 91, (n,), generator=gen)})
    return images, mask, targets


def forward_fn(model, images, mask):
    def run():
        model.eval()
        with torch.no_grad():
            model(images, mask)

    return run


def train_step_fn(model, criterion, images, mask, targets):
    def run():
        model.train()
        model.zero_grad(set_to_none=True)
        losses = criterion(model(images, mask), targets)
        sum(losses[k] * w for k, w in criterion.weight_dict.items()).backward()

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="ResNet-18 (unless --backbone), small images, 1 round")
    parser.add_argument("--backbone", default=None, help="default resnet50")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    height, width, repeats = (96, 128, 1) if args.quick else (512, 640, args.repeats)
    args.backbone = args.backbone or ("resnet18" if args.quick else "resnet50")
    images, mask, targets = make_batch(2, height, width)
    setups = {v: make_setup(v, args.backbone) for v in ("conditional", "detr")}
    malloc = {k: os.environ.get(k, "unset") for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.backbone}, batch 2x3x{height}x{width}, "
        f"{repeats} rounds, {malloc}"
    )
    for label, make in (
        ("forward", lambda m, c: forward_fn(m, images, mask)),
        ("train step", lambda m, c: train_step_fn(m, c, images, mask, targets)),
    ):
        times = alternate({v: make(m, c) for v, (m, c) in setups.items()}, repeats)
        ratio = statistics.median(a / b for a, b in zip(times["conditional"], times["detr"], strict=True))
        print(
            f"{label:<10}  conditional {statistics.median(times['conditional']):7.3f} s  "
            f"detr {statistics.median(times['detr']):7.3f} s  conditional/detr {ratio:5.2f}"
        )


if __name__ == "__main__":
    main()
