"""`make demo`: the paper's claim on this machine, end to end, in one command.

Pretrain the synthetic backbone once (cached), train Conditional DETR and DETR side by side on equal terms, then
compare their convergence and draw the cross-attention bands of the trained models.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SPECS = ("experiments/demo_synthetic.yaml", "experiments/demo_synthetic_detr.yaml")
NAMES = {"conditional": "Conditional DETR", "detr": "DETR"}


@dataclass
class DemoRun:
    name: str  # display name
    spec: str
    cfg: object  # resolved config
    run_dir: Path
    process: subprocess.Popen | None = None
    shown: int = 0  # metrics.jsonl lines already echoed


def plan(specs: list[str], overrides: list[str]) -> list[DemoRun]:
    """Resolve the specs; every one must start from the same backbone file (the comparison stays fair)."""
    from conddetr.config import load_config, run_dir_of

    runs = []
    for spec in specs:
        cfg = load_config(spec, overrides)
        runs.append(DemoRun(NAMES[cfg.model.variant], spec, cfg, run_dir_of(cfg)))
    backbones = {json.dumps(dict(r.cfg.pretrain), sort_keys=True) + str(r.cfg.model.pretrained_backbone) for r in runs}
    if len(backbones) != 1:
        raise ValueError(f"{', '.join(specs)} start from different backbones: the comparison would not be fair")
    if len({r.name for r in runs}) != len(runs):
        raise ValueError(f"{', '.join(specs)}: give one spec per variant")
    return runs


def pretrain_once(run: DemoRun) -> str | None:
    from conddetr.engine.setup import backbone_weights

    if not run.cfg.pretrain.enabled:
        return run.cfg.model.pretrained_backbone
    start = time.perf_counter()
    path = backbone_weights(run.cfg)  # pretrains with a progress bar unless the file is cached
    print(f"backbone: {path} ({time.perf_counter() - start:.0f} s)", flush=True)
    return path


def start(run: DemoRun, overrides: list[str], threads: int) -> None:
    """`python -m conddetr train SPEC` in its own process, console to run_dir/console.log."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CONDDETR_NUM_THREADS": str(threads), "CONDDETR_NO_TQDM": "1"}
    # glibc malloc returns memory to the OS too eagerly for a training loop: page faults cost 10-30 % here.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "33554432")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "268435456")
    log = open(run.run_dir / "console.log", "ab")  # noqa: SIM115 (closed when the process ends, with the file object)
    cmd = [sys.executable, "-m", "conddetr", "train", run.spec, *overrides]
    run.process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def echo_progress(run: DemoRun) -> None:
    """Print the val lines a run has logged since the last call."""
    path = run.run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    for line in lines[run.shown :]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return  # a line being written: read it next time
        run.shown += 1
        if "val/AP" in row:
            print(f"  {run.name:17s} epoch {row['epoch']:g}: val AP {100 * row['val/AP']:.1f}, "
                  f"AP50 {100 * row['val/AP50']:.1f}, train loss {row.get('train_epoch/loss', float('nan')):.3f}",
                  flush=True)  # fmt: skip


def train_all(runs: list[DemoRun], overrides: list[str], parallel: bool) -> None:
    cores = os.cpu_count() or 1
    groups = [runs] if parallel else [[r] for r in runs]
    for group in groups:
        threads = max(1, cores // len(group))
        for run in group:
            start(run, overrides, threads)
            print(f"training {run.name}: {run.spec} -> {run.run_dir} ({threads} thread(s); log "
                  f"{run.run_dir / 'console.log'})", flush=True)  # fmt: skip
        while any(r.process.poll() is None for r in group):
            time.sleep(5)
            for run in group:
                echo_progress(run)
        for run in group:
            echo_progress(run)
            if run.process.returncode != 0:
                raise RuntimeError(
                    f"{run.name} training failed (exit {run.process.returncode}); see {run.run_dir / 'console.log'}"
                )


def analyse(runs: list[DemoRun], out: Path) -> None:
    """Convergence comparison and attention bands, through the library code behind the notebooks."""
    from conddetr.analysis import bands, convergence

    out.mkdir(parents=True, exist_ok=True)
    curves = convergence.load_runs({r.name: r.run_dir for r in runs})
    by_name = {c.name: c for c in curves}
    base, fast = by_name["DETR"], by_name["Conditional DETR"]
    speedup = convergence.convergence_speedup(base, fast)
    figures = {
        "AP curves": out / "convergence_AP.png",
        "loss curves": out / "train_loss.png",
    }
    convergence.plot_ap_curves(curves, target=speedup.target).savefig(figures["AP curves"], dpi=120)
    convergence.plot_train_loss(curves).savefig(figures["loss curves"], dpi=120)
    print()
    for c in curves:
        ap = c.ap("AP")
        print(f"{c.name:17s} final val AP {100 * ap.final:.1f} (AP50 {100 * c.ap('AP50').final:.1f}) "
              f"after {ap.epochs[-1]:g} epochs")  # fmt: skip
    print(speedup.describe(base.name, fast.name))
    for run in runs:
        report = bands.attention_report(run.run_dir / "checkpoint.pth")
        path = out / f"attention_bands_{run.cfg.model.variant}.png"
        report.figure.savefig(path, dpi=120)
        figures[f"attention bands ({run.name})"] = path
        print(f"{run.name:17s} {report.summary}")
    print("\nfigures:")
    for what, path in figures.items():
        print(f"  {what:35s} {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conddetr demo", description=__doc__)
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to both runs")
    parser.add_argument("--specs", nargs=2, default=list(DEFAULT_SPECS), metavar=("CONDITIONAL", "DETR"))
    parser.add_argument("--sequential", action="store_true", help="one run after the other, all cores each")
    parser.add_argument("--out", default="runs/demo_analysis", help="folder of the figures")
    args = parser.parse_args(argv)
    os.chdir(REPO)  # relative paths in the specs (run folders, caches) mean the repository's
    started = time.perf_counter()
    runs = plan(args.specs, args.overrides)
    pretrain_once(runs[0])
    train_all(runs, args.overrides, parallel=not args.sequential)
    analyse(runs, Path(args.out))
    t = runs[0].cfg.tracking
    folders = " ".join(f"{r.run_dir}/wandb/offline-run-*" for r in runs)
    print(f"\nW&B {t.wandb_mode}, group {t.group or runs[0].cfg.name!r}: `wandb sync {folders}` uploads both runs")
    print(f"demo done in {(time.perf_counter() - started) / 60:.1f} min")
    return 0
