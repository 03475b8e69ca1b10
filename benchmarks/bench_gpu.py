"""GPU speed and memory: Conditional DETR R50 (random init) at 800x1216, batch 2 and 8, fp32 / TF32 / bf16 / compile.

Per setting: train images/s (forward, matching, losses, backward, clip 0.1, fused AdamW step), inference images/s
(forward + post-processing) and peak CUDA memory of each. Losses and matching run in float32 under bf16 autocast,
as in training. Without a CUDA device it says so and exits 0 (the CPU benchmarks are the others).
Run: python benchmarks/bench_gpu.py [--sizes 800 1216] [--batches 2 8] [--steps 10]
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_model import make_setup  # benchmarks/ (scripts run from their folder)

from conddetr.engine.optim import build_optimizer
from conddetr.engine.precision import maybe_compile
from conddetr.models import build_postprocessor

# name -> (autocast dtype or None, TF32, torch.compile)
SETTINGS = {
    "fp32": (None, False, False),
    "tf32": (None, True, False),
    "bf16": (torch.bfloat16, True, False),
    "bf16+compile": (torch.bfloat16, True, True),
}


def make_inputs(batch: int, height: int, width: int, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=gen)
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    mask[1::2, :, width * 3 // 4 :] = True  # every other image narrower: a padded batch
    targets = []
    for _ in range(batch):
        n = int(torch.randint(1, 20, (1,), generator=gen))
        boxes = torch.cat(
            (0.2 + 0.6 * torch.rand(n, 2, generator=gen), 0.05 + 0.3 * torch.rand(n, 2, generator=gen)), 1
        )
        targets.append({"boxes": boxes.to(device), "labels": torch.randint(1, 91, (n,), generator=gen).to(device)})
    return images.to(device), mask.to(device), targets


def measure(fn, steps: int, warmup: int) -> tuple[float, float]:
    """(seconds per call, peak GiB) after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, torch.cuda.max_memory_allocated() / 2**30


def bench(setting: str, batch: int, height: int, width: int, steps: int) -> str:
    dtype, tf32, compile_model = SETTINGS[setting]
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    model, criterion = make_setup("conditional", "resnet50")
    model, criterion = model.to(device), criterion.to(device)
    optimizer = build_optimizer(model, lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4)
    call = maybe_compile(model, compile_model)
    post = build_postprocessor("conditional")
    params = [p for p in model.parameters() if p.requires_grad]
    images, mask, targets = make_inputs(batch, height, width, device)
    sizes = torch.tensor([[height, width]] * batch, device=device)

    def train_step():
        model.train()
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            outputs = call(images, mask)
        criterion.weighted_total(criterion(outputs, targets)).backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def inference():
        model.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            post({k: v.float() for k, v in call(images, mask).items() if k != "aux_outputs"}, sizes)

    warmup = 3 if compile_model else 2
    train_s, train_gib = measure(train_step, steps, warmup)
    infer_s, infer_gib = measure(inference, steps, warmup)
    return (f"{setting:<13} batch {batch:>2}  train {batch / train_s:7.1f} img/s  peak {train_gib:5.1f} GiB   "
            f"inference {batch / infer_s:7.1f} img/s  peak {infer_gib:5.1f} GiB")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[800, 1216], metavar=("H", "W"))
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device visible (torch.cuda.is_available() is False): nothing measured")
        return
    height, width = args.sizes
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, R50 Conditional DETR, {height}x{width}, "
          f"{args.steps} timed calls after warm-up")  # fmt: skip
    for batch in args.batches:
        for setting in args.settings:
            print(bench(setting, batch, height, width, args.steps), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
