"""Command line: `python -m conddetr train SPEC [key=value ...]` and `python -m conddetr first-step SPEC --out F ...`.

`train` runs (or resumes) the experiment in its run folder; `first-step` writes the first step's loss and gradients
(engine.debug_first_step), e.g. under `torchrun --nproc_per_node 2 --standalone -m conddetr first-step ...`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conddetr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train or evaluate (eval.eval_only=true) an experiment spec")
    train.add_argument("spec", help="experiment YAML (experiments/*.yaml)")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=2e-4")
    first = sub.add_parser("first-step", help="write the first optimizer step's loss and gradients")
    first.add_argument("spec")
    first.add_argument("--out", required=True, help="output file (torch.save of plain data)")
    first.add_argument("overrides", nargs="*")
    # Overrides may come before or after --out; argparse leaves the later ones unparsed.
    args, extra = parser.parse_known_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
