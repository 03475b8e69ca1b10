"""Convergence curves from run folders: val AP per epoch, train loss per fractional epoch, epochs-to-AP and speedups.

Reads `run_dir/metrics.jsonl` (one `{"step", "epoch", ...}` object per line, written by `conddetr.tracking.Tracker`;
val lines carry the completed epoch count, train lines the fractional epoch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class Curve:
    """A metric against epochs; `epochs` strictly increasing (duplicates from a resumed run keep the last value)."""

    epochs: tuple[float, ...]
    values: tuple[float, ...]

    def __post_init__(self):
        if len(self.epochs) != len(self.values):
            raise ValueError(f"curve has {len(self.epochs)} epochs but {len(self.values)} values")
        if any(b <= a for a, b in zip(self.epochs[:-1], self.epochs[1:], strict=True)):
            raise ValueError(f"curve epochs must be strictly increasing, got {self.epochs}")

    def __len__(self) -> int:
        return len(self.epochs)

    @property
    def final(self) -> float:
        if not self.values:
            raise ValueError("empty curve has no final value")
        return self.values[-1]


@dataclass
class RunCurves:
    """Curves of one run: `val[name]` for every `val/<name>` metric (e.g. "AP", "AP50"), and the train loss."""

    name: str
    run_dir: Path
    val: dict[str, Curve] = field(default_factory=dict)
    train_loss: Curve = field(default_factory=lambda: Curve((), ()))

    def ap(self, metric: str = "AP") -> Curve:
        if metric not in self.val:
            raise KeyError(f"run {self.name!r} ({self.run_dir}) logged no 'val/{metric}'; has {sorted(self.val)}")
        return self.val[metric]


def _curve(points: dict[float, float]) -> Curve:
    epochs = sorted(points)
    return Curve(tuple(epochs), tuple(points[e] for e in epochs))


def load_run(run_dir: str | Path, name: str | None = None) -> RunCurves:
    """Read `run_dir/metrics.jsonl` (via `conddetr.tracking.read_metrics`) into curves.

    The train loss curve is `train/loss` (logged every few steps); a run that logged none (fewer steps per epoch
    than the logging period) falls back to the per-epoch means `train_epoch/loss`. COCO's -1 ("no objects of that
    size") is left out of the curve, not plotted as an AP.
    """
    from conddetr.tracking import read_metrics

    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in run folder {run_dir} (expected {path})")
    val: dict[str, dict[float, float]] = {}
    loss: dict[float, float] = {}
    epoch_loss: dict[float, float] = {}
    for lineno, record in enumerate(read_metrics(run_dir), start=1):
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int | float):
            raise ValueError(f"{path}: row {lineno}: expected an object with a numeric 'epoch', got {record!r:.80}")
        epoch = float(record["epoch"])
        for key, value in record.items():
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            # A resumed run may log an epoch twice: the later line wins.
            if key.startswith("val/") and value >= 0:
                val.setdefault(key[len("val/") :], {})[epoch] = float(value)
            elif key == "train/loss":
                loss[epoch] = float(value)
            elif key == "train_epoch/loss":
                epoch_loss[epoch] = float(value)
    return RunCurves(
        name=name or run_dir.name,
        run_dir=run_dir,
        val={metric: _curve(points) for metric, points in val.items()},
        train_loss=_curve(loss or epoch_loss),
    )


def load_runs(run_dirs: dict[str, str | Path]) -> list[RunCurves]:
    """Load several runs, keyed by display name (e.g. {"DETR": "runs/detr", "Conditional DETR": ...})."""
    return [load_run(path, name) for name, path in run_dirs.items()]


def epochs_to_reach(curve: Curve, target: float) -> float | None:
    """First epoch at which `curve` reaches `target`, linearly interpolated between evaluations; None if never.

    The first crossing counts even if the curve later dips (non-monotone AP). No origin point is assumed: if the
    first evaluation already reaches the target, its epoch is returned (an upper bound: nothing is known earlier).
    Nothing is extrapolated beyond the last evaluation.
    """
    if math.isnan(target):
        raise ValueError("target AP is NaN")
    for i, (epoch, value) in enumerate(zip(curve.epochs, curve.values, strict=True)):
        if value >= target:
            if i == 0:
                return epoch
            e0, v0 = curve.epochs[i - 1], curve.values[i - 1]
            return e0 + (target - v0) / (value - v0) * (epoch - e0)
    return None


def format_ap(fraction: float) -> str:
    """COCO AP as published (x100, one decimal); tiny values of barely trained runs keep two significant digits."""
    ap = 100 * fraction
    return f"{ap:.1f}" if abs(ap) >= 1 else f"{ap:.2g}"


@dataclass(frozen=True)
class Speedup:
    """How many times fewer epochs run b needs than run a to reach `target` AP.

    `ratio` is None unless both runs reached the target. When only b reached it, `lower_bound` = (a's last epoch)
    / (b's epochs): b is at least that much faster, given what was observed; it is never reported as `ratio`.
    """

    target: float
    epochs_a: float | None
    epochs_b: float | None
    last_epoch_a: float
    last_epoch_b: float
    ratio: float | None
    lower_bound: float | None
    metric: str = "AP"

    def describe(self, name_a: str = "a", name_b: str = "b") -> str:
        t = f"{METRIC_LABELS.get(self.metric, self.metric)} {format_ap(self.target)}"
        if self.ratio is not None:
            return f"{name_b} reaches {t} in {self.epochs_b:.3g} epochs vs {self.epochs_a:.3g}: {self.ratio:.2f}x fewer"
        if self.epochs_b is None:
            return f"{name_b} never reached {t} within its {self.last_epoch_b:.3g} epochs: no speedup can be claimed"
        return (
            f"{name_a} never reached {t} within its {self.last_epoch_a:.3g} epochs; {name_b} did in "
            f"{self.epochs_b:.3g}: at least {self.lower_bound:.2f}x fewer (not extrapolated)"
        )


def convergence_speedup(
    run_a: RunCurves | Curve, run_b: RunCurves | Curve, target: float | None = None, metric: str = "AP"
) -> Speedup:
    """The paper's "Nx faster" figure: epochs run a needs for `target` divided by the epochs run b needs.

    `target=None` takes run a's final AP and counts run a's whole schedule (its last epoch), as the paper compares
    DETR's 500-epoch AP with Conditional DETR's schedule. An explicit target is interpolated on both curves.
    """
    a = run_a.ap(metric) if isinstance(run_a, RunCurves) else run_a
    b = run_b.ap(metric) if isinstance(run_b, RunCurves) else run_b
    if not len(a) or not len(b):
        raise ValueError("both runs need at least one evaluation to compare convergence")
    if target is None:
        target, epochs_a = a.final, a.epochs[-1]
    else:
        epochs_a = epochs_to_reach(a, target)
    epochs_b = epochs_to_reach(b, target)
    ratio = None
    if epochs_a is not None and epochs_b is not None:
        # b at epoch 0 means the target needed no training at all: an honest, if useless, infinite speedup.
        ratio = epochs_a / epochs_b if epochs_b > 0 else math.inf
    lower = a.epochs[-1] / epochs_b if epochs_a is None and epochs_b else None
    return Speedup(target, epochs_a, epochs_b, a.epochs[-1], b.epochs[-1], ratio, lower, metric)


# Published COCO val results, R50/R101, from the Conditional DETR model zoo (Atten4Vis/ConditionalDETR README;
# DESIGN.md section 3). AP in percent, as published. The paper's 6.7x for R50/R101 compares DETR 500 epochs with
# Conditional DETR 75 epochs, a schedule not in this table; the 10x for DC5 compares 500 with 50 epochs.
@dataclass(frozen=True)
class PublishedResult:
    variant: str  # "detr" | "conditional"
    backbone: str  # "R50" | "DC5-R50" | "R101" | "DC5-R101"
    epochs: int
    AP: float
    APs: float
    APm: float
    APl: float


PUBLISHED = (
    PublishedResult("detr", "R50", 500, 42.0, 20.5, 45.8, 61.1),
    PublishedResult("detr", "R50", 50, 34.8, 13.9, 37.3, 54.4),
    PublishedResult("detr", "DC5-R50", 500, 43.3, 22.5, 47.3, 61.1),
    PublishedResult("detr", "R101", 500, 43.5, 21.0, 48.0, 61.8),
    PublishedResult("detr", "R101", 50, 36.9, 15.5, 40.6, 55.6),
    PublishedResult("detr", "DC5-R101", 500, 44.9, 23.7, 49.5, 62.3),
    PublishedResult("conditional", "R50", 50, 41.0, 20.6, 44.3, 59.3),
    PublishedResult("conditional", "DC5-R50", 50, 43.7, 23.9, 47.6, 60.1),
    PublishedResult("conditional", "R101", 50, 42.8, 21.7, 46.6, 60.9),
    PublishedResult("conditional", "DC5-R101", 50, 45.0, 26.1, 48.9, 62.8),
)
VARIANT_NAMES = {"detr": "DETR", "conditional": "Conditional DETR"}
# Axis labels: COCO's metric is AP (averaged over IoU 0.50:0.95), not "mAP"; AP50 is AP at IoU 0.5.
METRIC_LABELS = {"AP": "AP", "AP50": "AP50", "AP75": "AP75", "APs": "AP small", "APm": "AP medium", "APl": "AP large"}


def published_speedups(rows=PUBLISHED) -> dict[str, float | None]:
    """Per backbone: DETR's longest schedule / Conditional DETR's shortest one matching its AP; None if none does."""
    out: dict[str, float | None] = {}
    for backbone in dict.fromkeys(r.backbone for r in rows):
        detr = max((r for r in rows if r.backbone == backbone and r.variant == "detr"), key=lambda r: r.epochs)
        cond = [r for r in rows if r.backbone == backbone and r.variant == "conditional" and r.AP >= detr.AP]
        out[backbone] = detr.epochs / min(r.epochs for r in cond) if cond else None
    return out


def _axes(ax):
    from matplotlib.figure import Figure  # object API only: never touches pyplot's global backend

    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=(6, 4), layout="constrained")
    return fig, fig.add_subplot()


def plot_ap_curves(runs: list[RunCurves], metric: str = "AP", target: float | None = None, ax=None):
    """Val `metric` (x100) against epochs for each run; `target` (fraction) draws a line and marks each crossing."""
    fig, ax = _axes(ax)
    label = METRIC_LABELS.get(metric, metric)
    for run in runs:
        curve = run.ap(metric)
        (line,) = ax.plot(curve.epochs, [100 * v for v in curve.values], marker="o", ms=3, label=run.name)
        reached = epochs_to_reach(curve, target) if target is not None else None
        if reached is not None:
            ax.plot([reached], [100 * target], marker="x", ms=9, color=line.get_color())
    if target is not None:
        ax.axhline(100 * target, ls=":", color="grey", label=f"target {label} {format_ap(target)}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"val {label}")
    ax.set_title(f"COCO-style val {label} per epoch")
    ax.legend()
    return fig


def plot_train_loss(runs: list[RunCurves], ax=None):
    """Weighted total training loss against fractional epoch (runs with different batch sizes line up)."""
    fig, ax = _axes(ax)
    for run in runs:
        ax.plot(run.train_loss.epochs, run.train_loss.values, label=run.name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss (weighted sum)")
    ax.set_title("training loss")
    ax.legend()
    return fig


def plot_published(rows=PUBLISHED, ax=None):
    """Published val AP against training epochs (log scale): one colour per backbone, one marker per variant."""
    fig, ax = _axes(ax)
    backbones = list(dict.fromkeys(r.backbone for r in rows))
    for variant, style in (("detr", "--s"), ("conditional", "-o")):
        for i, backbone in enumerate(backbones):
            pts = sorted((r.epochs, r.AP) for r in rows if r.variant == variant and r.backbone == backbone)
            if pts:
                xs, ys = [e for e, _ in pts], [ap for _, ap in pts]
                ax.plot(xs, ys, style, color=f"C{i}", label=f"{VARIANT_NAMES[variant]} {backbone}")
    ax.set_xscale("log")
    epochs = sorted({r.epochs for r in rows})
    ax.set_xticks(epochs, [str(e) for e in epochs])
    ax.minorticks_off()
    ax.set_xlabel("training epochs (log scale)")
    ax.set_ylabel("COCO val AP")
    ax.set_title("published results (R50 / R101, COCO 2017 val)")
    ax.legend(fontsize="small")
    return fig
