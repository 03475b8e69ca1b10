"""Attention kernels on the CPU at Conditional DETR / DETR shapes: SDPA, SDPA with zero-padded v, matmul.

Conditional DETR's cross-attention has 2D/heads-wide q/k heads and D/heads-wide v heads: SDPA accepts that but
leaves its fused path. Kernel calls alternate (load from other processes hits all alike); prints median ms per
call and the median per-round ratio of each kernel to "matmul" (< 1: faster than matmul).
Run: MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456 python benchmarks/bench_cross_attention.py
"""

from __future__ import annotations

import argparse
import statistics

import torch
from timing import alternate  # benchmarks/timing.py (scripts run from their folder)

from conddetr.attention import attend

KERNELS = ("matmul", "sdpa", "sdpa_padded")


def bench_case(name, b, q_len, k_len, d_qk, d_v, heads, repeats, backward):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, q_len, d_qk, generator=gen, requires_grad=backward)
    k = torch.randn(b, k_len, d_qk, generator=gen, requires_grad=backward)
    v = torch.randn(b, k_len, d_v, generator=gen, requires_grad=backward)
    mask = torch.zeros(b, k_len, dtype=torch.bool)
    mask[1, k_len * 3 // 4 :] = True  # a padded second image, as in real batches

    def call(kernel):
        def fn():
            if backward:
                attend(q, k, v, heads, mask, kernel=kernel).sum().backward()
            else:
                with torch.no_grad():
                    attend(q, k, v, heads, mask, kernel=kernel)

        return fn

    with torch.no_grad():
        ref = attend(q, k, v, heads, mask, kernel="matmul")
        diff = max((attend(q, k, v, heads, mask, kernel=kn) - ref).abs().max().item() for kn in KERNELS)
    times = alternate({kn: call(kn) for kn in KERNELS}, repeats)
    cells = []
    for kn in KERNELS:
        ratio = statistics.median(t / m for t, m in zip(times[kn], times["matmul"], strict=True))
        cells.append(f"{kn} {statistics.median(times[kn]) * 1e3:7.2f} ms ({ratio:4.2f})")
    fastest = min(KERNELS, key=lambda kn: statistics.median(times[kn]))
    mode = "fwd+bwd" if backward else "forward"
    print(f"{name:<32} {mode:<7} " + "  ".join(cells) + f"  fastest {fastest}  max|diff| {diff:.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one small case, few repeats (CI smoke)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    d, heads, b = 256, 8, 2
    # (name, queries, keys, q/k width, v width): keys = feature cells of the image size named.
    cases = [("cond cross 512x640 (16x20)", 300, 320, 2 * d, d)]
    if not args.quick:
        cases += [
            ("cond cross 800x1066 (25x34)", 300, 850, 2 * d, d),
            ("cond cross DC5 800x1066 (50x67)", 300, 3350, 2 * d, d),
            ("detr cross 800x1066 (25x34)", 100, 850, d, d),
            ("encoder self 800x1066 (25x34)", 850, 850, d, d),
        ]
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, B={b}, heads={heads}, D={d}; "
        "(x.xx) = median per-round time ratio to matmul"
    )
    for name, q_len, k_len, d_qk, d_v in cases:
        for backward in (False, True):
            bench_case(name, b, q_len, k_len, d_qk, d_v, heads, repeats, backward)


if __name__ == "__main__":
    main()
