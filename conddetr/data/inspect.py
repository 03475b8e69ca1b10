"""Inspect a COCO-format dataset: counts, class and box-size histograms, and a PNG of a few annotated images.

Usage: python -m conddetr.data.inspect --images DIR --annotations FILE [--out PNG] [--num-images N]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from conddetr.data.coco import CocoDetection, DatasetError, read_annotation_file

SIZE_BUCKETS = (("small", 0, 32**2), ("medium", 32**2, 96**2), ("large", 96**2, float("inf")))  # COCO's areas


def _bar(count: int, largest: int, width: int = 40) -> str:
    return "#" * max(1 if count else 0, round(width * count / max(largest, 1)))


def summarize(data: dict, num_dropped: int) -> str:
    """Text report: image / annotation counts, per-category and per-size-bucket histograms."""
    names = {cat["id"]: cat["name"] for cat in data["categories"]}
    anns = data["annotations"]
    crowd = sum(1 for a in anns if a.get("iscrowd", 0))
    per_image = Counter(a["image_id"] for a in anns)
    lines = [
        f"images: {len(data['images'])} ({len(data['images']) - len(per_image)} without annotations)",
        f"annotations: {len(anns)} ({crowd} crowd, {num_dropped} degenerate dropped)",
        f"objects per image: max {max(per_image.values(), default=0)}, "
        f"mean {len(anns) / max(len(data['images']), 1):.2f}",
        f"categories: {len(names)} (ids {min(names)}..{max(names)})",
        "",
        "per category:",
    ]
    by_category = Counter(a["category_id"] for a in anns)
    largest = max(by_category.values(), default=0)
    for cid in sorted(names):
        lines.append(f"  {cid:>4} {names[cid]:<16} {by_category[cid]:>7} {_bar(by_category[cid], largest)}")
    # Box area (w * h) in COCO's size buckets, then box side length in powers of two.
    boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
    areas = boxes[:, 2] * boxes[:, 3]
    bucket_counts = [int(((areas >= lo) & (areas < hi)).sum()) for _, lo, hi in SIZE_BUCKETS]
    lines += ["", "box area (COCO buckets):"]
    for (name, _, _), count in zip(SIZE_BUCKETS, bucket_counts, strict=True):
        lines.append(f"  {name:<8} {count:>7} {_bar(count, max(bucket_counts))}")
    sides = np.sqrt(np.clip(areas, 1, None))
    edges = [0, 8, 16, 32, 64, 128, 256, 512, np.inf]
    hist, _ = np.histogram(sides, bins=edges)
    lines += ["", "sqrt(box area) in pixels:"]
    for lo, hi, count in zip(edges[:-1], edges[1:], hist, strict=True):
        lines.append(f"  {lo:>4}-{hi:<4} {count:>7} {_bar(int(count), int(hist.max()))}")
    return "\n".join(lines)


def plot_examples(dataset: CocoDetection, names: dict[int, str], out: Path, num_images: int = 6) -> None:
    """A grid of the first images that have boxes, with their boxes and category names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    indices = [i for i, r in enumerate(dataset.records) if len(r.labels)][:num_images] or [0]
    cols = min(3, len(indices))
    rows = (len(indices) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, indices, strict=False):
        image, target = dataset[index]
        ax.imshow(image.permute(1, 2, 0).numpy())
        for (x0, y0, x1, y1), label in zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True):
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="yellow", linewidth=1.5))
            ax.text(x0, y0, names.get(label, str(label)), color="black", fontsize=7, backgroundcolor="yellow")
        ax.set_title(f"image id {int(target['image_id'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, type=Path, help="image folder")
    parser.add_argument("--annotations", required=True, type=Path, help="COCO instances JSON")
    parser.add_argument("--out", type=Path, help="PNG with a few images and their boxes")
    parser.add_argument("--num-images", type=int, default=6)
    args = parser.parse_args(argv)
    try:
        data = read_annotation_file(args.annotations)
        dataset = CocoDetection(args.images, args.annotations, annotations=data)  # labels = category ids
        print(summarize(data, dataset.num_dropped))
        if args.out is not None:
            plot_examples(dataset, {c["id"]: c["name"] for c in data["categories"]}, args.out, args.num_images)
            print(f"\nwrote {args.out}")
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
