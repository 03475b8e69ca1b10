"""Convergence over seeds: a sweep's runs grouped by model and seed, mean and spread per epoch, speed-up per seed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from conddetr.analysis.convergence import METRICS_FILE, RunCurves, Speedup, convergence_speedup, load_run

CONFIG_FILE = "config.yaml"  # the resolved config every run folder holds (conddetr.config.CONFIG_NAME)


def load_study(folder: str | Path) -> dict[str, dict[int, RunCurves]]:
    """Runs under `folder` (a sweep's output folder) by model variant, then seed (`optim.seed` of each run's config).

    Folders without metrics.jsonl (not started yet) are skipped; two runs with the same variant and seed are an error.
    """
    from conddetr.config import load_config

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no study folder {folder}")
    study: dict[str, dict[int, RunCurves]] = {}
    for run_dir in sorted(p for p in folder.iterdir() if (p / METRICS_FILE).is_file()):
        if not (run_dir / CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"{run_dir} has {METRICS_FILE} but no {CONFIG_FILE}: cannot tell its model and seed"
            )
        cfg = load_config(run_dir / CONFIG_FILE)
        variant, seed = cfg.model.variant, int(cfg.optim.seed)
        runs = study.setdefault(variant, {})
        if seed in runs:
            raise ValueError(f"{run_dir} and {runs[seed].run_dir} are both {variant} with optim.seed={seed}")
        runs[seed] = load_run(run_dir)
    if not study:
        raise FileNotFoundError(f"no run folder with {METRICS_FILE} under {folder}")
    return study


@dataclass(frozen=True)
class SeedStats:
    """A metric over seeds at the epochs every seed evaluated: mean and sample standard deviation (0 for one)."""

    epochs: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    seeds: int


def aggregate(runs: list[RunCurves], metric: str = "AP") -> SeedStats:
    if not runs:
        raise ValueError("no runs to aggregate")
    curves = [dict(zip(r.ap(metric).epochs, r.ap(metric).values, strict=True)) for r in runs]
    common = sorted(set.intersection(*(set(c) for c in curves)))
    mean, std = [], []
    for epoch in common:
        values = [c[epoch] for c in curves]
        m = sum(values) / len(values)
        var = sum((v - m) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
        mean.append(m)
        std.append(math.sqrt(var))
    return SeedStats(tuple(common), tuple(mean), tuple(std), len(runs))


def speedups_per_seed(
    baseline: dict[int, RunCurves], faster: dict[int, RunCurves], metric: str = "AP"
) -> dict[int, Speedup]:
    """For every seed both models ran: epochs the baseline needs for its own final AP over those `faster` needs."""
    shared = sorted(set(baseline) & set(faster))
    if not shared:
        raise ValueError(f"no seed in common: baseline has {sorted(baseline)}, the other model {sorted(faster)}")
    return {seed: convergence_speedup(baseline[seed], faster[seed], metric=metric) for seed in shared}


def plot_seed_curves(groups: dict[str, list[RunCurves]], metric: str = "AP", ax=None):
    """Mean val `metric` (x100) per epoch for each model, with a band of +-1 standard deviation over seeds."""
    from conddetr.analysis.convergence import METRIC_LABELS, _axes

    fig, ax = _axes(ax)
    label = METRIC_LABELS.get(metric, metric)
    for name, runs in groups.items():
        stats = aggregate(runs, metric)
        mean = [100 * m for m in stats.mean]
        (line,) = ax.plot(stats.epochs, mean, marker="o", ms=3, label=f"{name} (mean of {stats.seeds} seeds)")
        low = [100 * (m - s) for m, s in zip(stats.mean, stats.std, strict=True)]
        high = [100 * (m + s) for m, s in zip(stats.mean, stats.std, strict=True)]
        ax.fill_between(stats.epochs, low, high, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"val {label}")
    ax.set_title(f"val {label} per epoch, mean +- 1 std over seeds")
    ax.legend()
    return fig
