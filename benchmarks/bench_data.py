"""Data speed: synthetic generation time (2,000 images of 256x256) and train-pipeline throughput, 2 workers vs 0.

Usage: python benchmarks/bench_data.py [--num-images 2000] [--size 256] [--batches 60]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import torch

from conddetr.config import DataConfig, SyntheticConfig
from conddetr.data import build_datasets, build_loaders, set_epoch


def throughput(train_ds, val_ds, num_workers: int, batch_size: int, batches: int) -> float:
    """Images per second through the train pipeline (decode, augment, normalise, collate)."""
    loader, _ = build_loaders(train_ds, val_ds, batch_size, num_workers, distributed=False, seed=0)
    set_epoch(loader, 0)
    iterator = iter(loader)
    next(iterator)  # worker start-up is paid once per epoch; measure the steady state
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (generation workers): load-independent."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker: one thread per process
    with tempfile.TemporaryDirectory() as cache:
        start, cpu_start = time.perf_counter(), cpu_seconds()
        cfg = DataConfig(
            synthetic=SyntheticConfig(cache_dir=cache, image_size=args.size, num_train=args.num_images, num_val=8),
            # Published recipe scaled to 256-pixel images (about 0.6..1.25x the published 480..800 / 1333 ratios).
            train_scales=list(range(192, 321, 32)),
            crop_resize_scales=[200, 250, 300],
            crop_min_size=160,
            crop_max_size=256,
            max_size=512,
            val_scale=256,
        )
        train_ds, val_ds, _ = build_datasets(cfg)
        generation, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
        print(
            f"generate {args.num_images} synthetic {args.size}x{args.size} images (+8 val) and index them: "
            f"{generation:.1f} s wall, {cpu:.1f} s CPU ({args.num_images / generation:.0f} images/s)"
        )
        rates = {w: throughput(train_ds, val_ds, w, args.batch_size, args.batches) for w in (0, 2)}
        for workers, rate in rates.items():
            print(f"train pipeline, {workers} DataLoader workers: {rate:.1f} images/s")
        print(f"ratio 2 workers / 0 workers: {rates[2] / rates[0]:.2f}x")


if __name__ == "__main__":
    main()
