"""Hungarian matching of a batch of 16 images x 300 queries x 20 targets (91 classes): cost matrix + assignment.

Ours computes each image's cost against its own targets in one batched pass; the peer is the published scheme,
every query scored against the whole batch's targets ([B*Q, B*N]) and cut per image. Calls alternate; prints median
ms per matcher call (cost + scipy assignment) and the per-round ratio peer / ours.
Run: python benchmarks/bench_matcher.py [--repeats 50]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from scipy.optimize import linear_sum_assignment
from timing import alternate  # benchmarks/timing.py (scripts run from their folder)

from conddetr.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from conddetr.models.matcher import HungarianMatcher


def published_scheme(matcher: HungarianMatcher, outputs: dict, targets: list[dict]):
    """The published matcher's layout: [B*Q, C] class cost over all classes, [B*Q, sum N] pair costs, split."""
    logits, boxes = outputs["pred_logits"].flatten(0, 1), outputs["pred_boxes"].flatten(0, 1)  # [B*Q, C], [B*Q, 4]
    labels = torch.cat([t["labels"] for t in targets])
    tgt = torch.cat([t["boxes"] for t in targets])
    if matcher.class_cost == "focal":
        prob, alpha = logits.sigmoid(), matcher.focal_alpha
        neg = (1 - alpha) * prob**2 * -(1 - prob + 1e-8).log()
        pos = alpha * (1 - prob) ** 2 * -(prob + 1e-8).log()
        cost_class = pos[:, labels] - neg[:, labels]
    else:
        cost_class = -logits.softmax(-1)[:, labels]
    cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt))
    cost = matcher.set_cost_bbox * torch.cdist(boxes, tgt, p=1) + matcher.set_cost_class * cost_class
    cost = (cost + matcher.set_cost_giou * cost_giou).view(len(targets), -1, len(tgt))
    sizes = [len(t["boxes"]) for t in targets]
    return [linear_sum_assignment(c[b].numpy()) for b, c in enumerate(cost.split(sizes, -1))]


def bench_case(class_cost: str, repeats: int, gen: torch.Generator) -> str:
    batch, queries, num_targets, classes = 16, 300, 20, 91
    outputs = {
        "pred_logits": torch.randn(batch, queries, classes + (class_cost == "softmax"), generator=gen),
        "pred_boxes": torch.rand(batch, queries, 4, generator=gen) * 0.5 + 0.25,
    }
    targets = [
        {"labels": torch.randint(0, classes, (num_targets,), generator=gen),
         "boxes": torch.rand(num_targets, 4, generator=gen) * 0.5 + 0.25}
        for _ in range(batch)
    ]  # fmt: skip
    matcher = HungarianMatcher(class_cost, 2.0 if class_cost == "focal" else 1.0, 5.0, 2.0)
    for (rows, cols), (p_rows, p_cols) in zip(
        matcher(outputs, targets), published_scheme(matcher, outputs, targets), strict=True
    ):
        assert rows.tolist() == p_rows.tolist() and cols.tolist() == p_cols.tolist(), "assignments differ"
    cpu: dict = {}
    with torch.no_grad():
        wall = alternate(
            {"ours": lambda: matcher(outputs, targets), "peer": lambda: published_scheme(matcher, outputs, targets)},
            repeats,
            cpu,
        )
    ratio = statistics.median(p / o for p, o in zip(wall["peer"], wall["ours"], strict=True))
    ms = {k: statistics.median(v) * 1e3 for k, v in wall.items()}
    cpu_ms = {k: statistics.median(v) * 1e3 for k, v in cpu.items()}
    name = f"matching {batch} x {queries} x {num_targets} ({class_cost})"
    return (
        f"{name}: ours {ms['ours']:.1f} ms (CPU {cpu_ms['ours']:.1f} ms), published scheme {ms['peer']:.1f} ms "
        f"(CPU {cpu_ms['peer']:.1f} ms), peer/ours {ratio:.2f}, same indices"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.repeats} rounds; medians, wall (CPU)")
    gen = torch.Generator().manual_seed(0)
    for class_cost in ("focal", "softmax"):
        print(bench_case(class_cost, args.repeats, gen))


if __name__ == "__main__":
    main()
