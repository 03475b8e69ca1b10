"""`python -m conddetr predict CHECKPOINT INPUT... [--out DIR] [--threshold T] ...`: arguments, errors, summary.

Exit status 0 when at least one image was predicted, 1 on bad input (message names the file), 2 on bad options.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

HELP = "draw a checkpoint's detections on images and write a COCO results JSON"


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="run folder, run checkpoint (.pth) or released DETR / Conditional DETR .pth")
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT",
        help="image files, folders of images, or a COCO annotation .json followed by its image folder",
    )  # fmt: skip
    parser.add_argument("--out", default="predictions", help="output folder (default: ./predictions)")
    add = parser.add_argument
    add("--threshold", type=_fraction, default=0.5, help="keep detections scoring at least this (0.5; 0 keeps all)")
    add("--max-size", type=_positive, help="long-side cap of the resize (default: the checkpoint's; published 1333)")
    add("--batch-size", type=_positive, default=1, help="images per forward pass (1: padding shifts results slightly)")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add("--attention", action="store_true", help="also draw per-head cross-attention maps of the top detections")
    add("--attention-top", type=_positive, default=3, help="detections per image with attention maps (default 3)")
    add("--attention-layer", type=int, default=-1, help="decoder layer of the attention maps (default -1: the last)")


def run(args: argparse.Namespace) -> int:
    import torch

    from conddetr.engine.loop import progress_enabled
    from conddetr.predict.inputs import collect_inputs
    from conddetr.predict.loading import PredictError, load_predictor
    from conddetr.predict.run import IMAGES_NAME, RESULTS_NAME, AttentionOptions, predict

    log = logging.getLogger("conddetr.predict")
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise PredictError("--device cuda: CUDA is not available on this machine")
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(auto if args.device == "auto" else args.device)
        inputs = collect_inputs(args.inputs)  # first: a typo in an INPUT fails before the model loads
        predictor = load_predictor(args.checkpoint, device=device, max_size=args.max_size)
    except PredictError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    log.info("%s; %d images; resize short side %d, long side <= %d; %s", predictor.description, len(inputs),
             predictor.val_scale, predictor.max_size, device)  # fmt: skip
    attention = AttentionOptions(args.attention_top, args.attention_layer) if args.attention else None
    out = Path(args.out)
    summary = predict(predictor, inputs, out, threshold=args.threshold, batch_size=args.batch_size,
                      attention=attention, show_progress=progress_enabled(True)[0])  # fmt: skip
    per_image = summary.seconds / max(summary.images, 1)
    model = summary.model_seconds / max(summary.images, 1)
    skipped = f", {len(summary.skipped)} unreadable skipped" if summary.skipped else ""
    print(
        f"{summary.images} images{skipped}, {summary.detections} detections >= {args.threshold:g}, "
        f"{per_image:.3f} s per image ({model:.3f} s in the model, {device}); wrote {out}/*.png, "
        f"{out / RESULTS_NAME}, {out / IMAGES_NAME}"
    )
    if summary.images == 0:
        print(f"error: none of the {len(inputs)} inputs could be read", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conddetr predict", description=HELP)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
