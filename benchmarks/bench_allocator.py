"""The launcher's glibc malloc settings (perf.tune_malloc) against glibc's defaults: Conditional DETR R50, CPU.

glibc reads its settings at process start, so each measurement is its own process: rounds alternate a process with
the defaults and one with MALLOC_MMAP_THRESHOLD_=32 MiB / MALLOC_TRIM_THRESHOLD_=256 MiB (engine/allocator.py).
Each times forward (eval, no grad) and train step (forward, loss, backward) calls; prints medians and the median
per-round ratio default / tuned (> 1: the settings help).
Run: python benchmarks/bench_allocator.py [--rounds 3] [--calls 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from conddetr.engine.allocator import SETTINGS


def child(args) -> None:
    import torch
    from bench_model import forward_fn, make_batch, make_setup, train_step_fn

    if args.threads:
        torch.set_num_threads(args.threads)
    model, criterion = make_setup("conditional", args.backbone)
    images, mask, targets = make_batch(2, args.height, args.width)
    out = {}
    for name, fn in (("forward", forward_fn(model, images, mask)),
                     ("train step", train_step_fn(model, criterion, images, mask, targets))):  # fmt: skip
        fn()  # warm-up
        times = []
        for _ in range(args.calls):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    print(json.dumps(out))


def run_child(tuned: bool, argv: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    if tuned:
        env.update({k: str(v) for k, v in SETTINGS.items()})
    cmd = [sys.executable, __file__, *argv, "--child"]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=os.path.dirname(__file__))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2, help="timed calls per process and kind")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="ResNet-18, 128x160 images, 1 round")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.backbone = "resnet18" if args.quick else "resnet50"
    args.height, args.width = (128, 160) if args.quick else (512, 640)
    if args.child:
        return child(args)
    argv = [a for a in sys.argv[1:] if a != "--child"]
    rounds = 1 if args.quick else args.rounds
    print(f"{args.backbone}, batch 2x3x{args.height}x{args.width}, {rounds} rounds x {args.calls} calls, "
          f"tuned = {SETTINGS}")  # fmt: skip
    results = {False: [], True: []}
    for _ in range(rounds):
        for tuned in (False, True):
            results[tuned].append(run_child(tuned, argv))
    for kind in ("forward", "train step"):
        default = [r[kind] for r in results[False]]
        tuned = [r[kind] for r in results[True]]
        ratio = statistics.median(d / t for d, t in zip(default, tuned, strict=True))
        print(f"{kind:<10}  glibc defaults {statistics.median(default):7.3f} s  tuned {statistics.median(tuned):7.3f} s"
              f"  default/tuned {ratio:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
