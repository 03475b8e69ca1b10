"""Command line: `python -m conddetr {train,first-step,pretrain-backbone} SPEC [key=value ...]`, `... demo [...]`,
`... predict CHECKPOINT INPUT... [options]`.

`train` runs (or resumes) the experiment in its run folder; `first-step` writes the first step's loss and gradients
(engine.debug_first_step), e.g. under `torchrun --nproc_per_node 2 --standalone -m conddetr first-step ...`;
`pretrain-backbone` makes the spec's synthetic-pretrained backbone file (its `pretrain` section) unless cached;
`demo` is `make demo` (conddetr/demo.py); `predict` draws a checkpoint's detections on images (conddetr/predict/cli.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # its own options (conddetr/demo.py)
        from conddetr.demo import main as demo

        return demo(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m conddetr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train or evaluate (eval.eval_only=true) an experiment spec")
    train.add_argument("spec", help="experiment YAML (experiments/*.yaml)")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=2e-4")
    first = sub.add_parser("first-step", help="write the first optimizer step's loss and gradients")
    first.add_argument("spec")
    first.add_argument("--out", required=True, help="output file (torch.save of plain data)")
    first.add_argument("overrides", nargs="*")
    pre = sub.add_parser("pretrain-backbone", help="make the spec's synthetic-pretrained backbone file (cached)")
    pre.add_argument("spec")
    pre.add_argument("--force", action="store_true", help="pretrain again even when the file is cached")
    pre.add_argument("overrides", nargs="*")
    from conddetr.predict import cli as predict_cli

    predict_cli.add_arguments(sub.add_parser("predict", help=predict_cli.HELP, description=predict_cli.HELP))
    # Overrides may come before or after --out; argparse leaves the later ones unparsed.
    args, extra = parser.parse_known_args(argv)
    if args.command == "predict":
        if extra:
            parser.error(f"predict: unrecognised arguments {extra}")
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return predict_cli.run(args)
    unknown = [a for a in extra if "=" not in a]
    if unknown:
        parser.error(f"unrecognised arguments {unknown} (overrides are key=value)")
    args.overrides = [*args.overrides, *extra]

    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO if rank == "0" else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    from conddetr.config import load_config
    from conddetr.engine import NonFiniteLossError, TrainingInterrupted, debug_first_step, run

    cfg = load_config(args.spec, args.overrides)
    if cfg.perf.tune_malloc:
        from conddetr.engine.allocator import tune_malloc

        tune_malloc()
    if args.command == "pretrain-backbone":
        return _pretrain_backbone(cfg, args.force)
    if args.command == "first-step":
        loss, _ = debug_first_step(cfg, args.out)
        print(f"first-step loss {loss:.8f} written to {args.out}")
        return 0
    try:
        metrics = run(cfg)
    except TrainingInterrupted as err:
        logging.getLogger("conddetr").warning("%s; run again to resume from the last checkpoint", err)
        return 143  # the conventional exit status of a SIGTERM'd process
    except NonFiniteLossError as err:
        logging.getLogger("conddetr").error("%s", err)
        return 1
    print({k: round(v, 6) for k, v in metrics.items()})
    return 0


def _pretrain_backbone(cfg, force: bool) -> int:
    from conddetr.engine.setup import pretrain_settings_from_config
    from conddetr.pretrain import backbone_file, ensure_pretrained_backbone

    if not cfg.pretrain.enabled:
        print(f"{cfg.name}: pretrain.enabled is false, so this spec uses no synthetic-pretrained backbone")
        return 2
    settings = pretrain_settings_from_config(cfg)
    cached = backbone_file(cfg.pretrain.cache_dir, settings).is_file() and not force
    path = ensure_pretrained_backbone(cfg.pretrain.cache_dir, settings, show_progress=True, force=force)
    print(f"pretrained backbone {'(cached) ' if cached else ''}{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
