"""conddetr against HF transformers' ConditionalDetr / Detr: same sizes, settings and inputs, calls alternating.

Both sides: R50 random init, 300 / 100 queries, 91 labels, aux loss on, backbone trainable from layer2 (HF 5.x
freezes it all: unfrozen here, as published), dropout 0.1 also on attention weights and FFN activations (HF's
defaults are 0 there), AdamW lr 1e-4 / backbone 1e-5 / wd 1e-4 (HF: fused, its Trainer's default), clipping 0.1.
"forward" = eval forward + post-processing; "train step" = forward, matching, losses, backward, clip, AdamW step.
Speed-ups are medians of per-round HF time / our time, wall clock (process CPU time beside it); the last two lines
take the lesser of the two models. Peak RSS: separate processes, one per side and model. HF is a peer only
(`pip install -e '.[bench]'`). Run: make bench-peers (same glibc malloc settings for both sides).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

import torch
from bench_model import make_batch, make_setup  # benchmarks/ (scripts run from their folder)
from timing import alternate

from conddetr.engine.optim import build_optimizer
from conddetr.models import build_postprocessor

VARIANTS = ("conditional", "detr")


def require_transformers():
    try:
        import transformers
    except ImportError:
        sys.exit(
            "bench_peers.py needs HF transformers as a measurement peer (never a conddetr dependency): "
            "pip install -e '.[bench]' (or .venv/bin/pip install transformers)"
        )
    return transformers


def build_ours(variant: str, backbone: str, compile_model: bool):
    model, criterion = make_setup(variant, backbone)
    optimizer = build_optimizer(model, lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4)
    call = torch.compile(model) if compile_model else model
    return call, model, criterion, build_postprocessor(variant), optimizer


def build_hf(variant: str, backbone: str):
    tf = require_transformers()
    torch.manual_seed(0)
    backbone_config = None
    if backbone == "resnet18":  # --quick: the same small trunk on both sides
        backbone_config = tf.ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                                          out_features=["stage4"])  # fmt: skip
    # Published dropout: also on attention weights and FFN activations (HF defaults those two to 0).
    common = dict(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone_config,
                  num_labels=91, auxiliary_loss=True, dropout=0.1, attention_dropout=0.1,
                  activation_dropout=0.1)  # fmt: skip
    if variant == "conditional":
        model = tf.ConditionalDetrForObjectDetection(tf.ConditionalDetrConfig(num_queries=300, **common))
        processor = tf.ConditionalDetrImageProcessor()
    else:
        model = tf.DetrForObjectDetection(tf.DetrConfig(num_queries=100, **common))
        processor = tf.DetrImageProcessor()
    for name, p in model.model.backbone.named_parameters():  # layer2-4 = stages.1-3 train, as published
        p.requires_grad_(any(f"stages.{i}." in name for i in (1, 2, 3)))
    # HF Trainer's default optimizer from torch 2.8: fused AdamW; published groups (lr 1e-5 for the backbone).
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if "backbone" not in n]},
              {"params": [p for n, p in named if "backbone" in n], "lr": 1e-5}]  # fmt: skip
    optimizer = torch.optim.AdamW(groups, lr=1e-4, weight_decay=1e-4, fused=True)
    return model, processor, optimizer


def _clip_and_step(params, optimizer):
    torch.nn.utils.clip_grad_norm_(params, 0.1)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def our_calls(variant, backbone, compile_model, images, mask, targets, sizes):
    call, model, criterion, post, optimizer = build_ours(variant, backbone, compile_model)
    params = [p for p in model.parameters() if p.requires_grad]

    def forward():
        model.eval()
        with torch.no_grad():
            post(call(images, mask), sizes)

    def train_step():
        model.train()
        criterion.weighted_total(criterion(call(images, mask), targets)).backward()
        _clip_and_step(params, optimizer)

    return forward, train_step


def hf_calls(variant, backbone, images, mask, targets, sizes):
    model, processor, optimizer = build_hf(variant, backbone)
    params = [p for p in model.parameters() if p.requires_grad]
    pixel_mask = (~mask).long()  # HF: 1 = valid pixel
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]

    def forward():
        model.eval()
        with torch.no_grad():
            processor.post_process_object_detection(model(images, pixel_mask), threshold=0.0, target_sizes=sizes)

    def train_step():
        model.train()
        model(images, pixel_mask, labels=labels).loss.backward()
        _clip_and_step(params, optimizer)

    return forward, train_step


def rss_child(side: str, variant: str, args) -> None:
    """One side alone: a forward and two train steps, then the process's peak RSS (JSON on stdout)."""
    images, mask, targets = make_batch(2, args.height, args.width)
    sizes = torch.tensor([[args.height, args.width]] * 2)
    if side == "ours":
        forward, train_step = our_calls(variant, args.backbone, args.compile, images, mask, targets, sizes)
    else:
        forward, train_step = hf_calls(variant, args.backbone, images, mask, targets, sizes)
    forward()
    train_step()
    train_step()
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's RSS high-water mark. ru_maxrss would not do: Linux keeps it across exec, so a child started
    by a big parent reports the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: best effort


def peak_rss(side: str, variant: str, argv: list[str]) -> float:
    cmd = [sys.executable, __file__, *argv, "--rss-child", side, variant]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=os.path.dirname(__file__))
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-18 on both sides, 96x128 images, 1 round")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="our model through torch.compile (not HF's)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS processes")
    parser.add_argument("--rss-child", nargs=2, metavar=("SIDE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.backbone = "resnet18" if args.quick else "resnet50"
    args.height, args.width = (96, 128) if args.quick else (512, 640)
    repeats = 1 if args.quick else args.repeats
    if args.rss_child:
        return rss_child(*args.rss_child, args)
    tf = require_transformers()
    child_argv = [a for a in sys.argv[1:]]
    malloc = {k: os.environ.get(k, "unset") for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    print(f"torch {torch.__version__}, transformers {tf.__version__}, threads {torch.get_num_threads()}, "
          f"{args.backbone}, batch 2x3x{args.height}x{args.width}, {repeats} rounds, compile {args.compile}, "
          f"{malloc}")  # fmt: skip
    images, mask, targets = make_batch(2, args.height, args.width)
    sizes = torch.tensor([[args.height, args.width]] * 2)
    speedups = {"forward": [], "train step": []}
    for variant in args.variants:
        ours = our_calls(variant, args.backbone, args.compile, images, mask, targets, sizes)
        hf = hf_calls(variant, args.backbone, images, mask, targets, sizes)
        for i, label in enumerate(speedups):
            cpu: dict = {}
            times = alternate({"ours": ours[i], "hf": hf[i]}, repeats, cpu)
            rounds = [h / o for h, o in zip(times["hf"], times["ours"], strict=True)]
            cpu_ratio = statistics.median(h / o for h, o in zip(cpu["hf"], cpu["ours"], strict=True))
            speedups[label].append(statistics.median(rounds))
            print(f"{variant:<11} {label:<10}  ours {statistics.median(times['ours']):7.3f} s  "
                  f"hf {statistics.median(times['hf']):7.3f} s  hf/ours {speedups[label][-1]:5.2f} "
                  f"(rounds {' '.join(f'{r:.2f}' for r in rounds)}; CPU time hf/ours {cpu_ratio:.2f})")  # fmt: skip
        del ours, hf
    for variant in [] if args.no_rss else args.variants:
        rss = {side: peak_rss(side, variant, child_argv) for side in ("ours", "hf")}
        print(f"{variant:<11} peak RSS (own process: a forward, two train steps)  ours {rss['ours']:7.0f} MB  "
              f"hf {rss['hf']:7.0f} MB  ours/hf {rss['ours'] / rss['hf']:.2f}")  # fmt: skip
    print(f"forward speedup vs hf: {min(speedups['forward']):.2f}")
    print(f"train step speedup vs hf: {min(speedups['train step']):.2f}")


if __name__ == "__main__":
    main()
