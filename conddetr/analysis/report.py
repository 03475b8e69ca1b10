"""A convergence comparison as a W&B "report" run: its figures and speed-up table, in the group of the runs compared.

Logged through `conddetr.tracking.Tracker` (online, offline or disabled; W&B failures warn, never raise).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

from conddetr.analysis.convergence import METRIC_LABELS, Speedup, published_speedups

log = logging.getLogger(__name__)

SPEEDUP_COLUMNS = ["run", "baseline", "metric", "target AP", "epochs (run)", "epochs (baseline)", "speedup",
                   "at least", "source"]  # fmt: skip


def speedup_table(speedups: Mapping[str, Speedup], baseline: str, published: bool = True) -> dict:
    """Rows of the notebook's speed-ups (AP x 100; None where a run never reached the target), plus the published
    COCO figures; as `{"columns", "rows"}` for `Tracker.log_media`."""
    rows = []
    for name, s in speedups.items():
        label = METRIC_LABELS.get(s.metric, s.metric)
        rows.append([name, baseline, label, round(100 * s.target, 3), s.epochs_b, s.epochs_a, s.ratio, s.lower_bound,
                     "these runs"])  # fmt: skip
    if published:
        for backbone, ratio in published_speedups().items():
            rows.append([f"Conditional DETR {backbone}", f"DETR {backbone}", "AP", None, None, None, ratio, None,
                         "published (COCO)"])  # fmt: skip
    return {"columns": SPEEDUP_COLUMNS, "rows": rows}


def shared_tracking(run_dirs: Iterable[str | Path]) -> dict[str, str | None]:
    """The W&B project and group the compared runs share (from their config.yaml), None where they differ."""
    from conddetr.config import CONFIG_NAME, ConfigError, load_config

    projects, groups = set(), set()
    for folder in run_dirs:
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            return {"project": None, "group": None}
        try:
            cfg = load_config(path)
        except ConfigError as err:
            log.warning("cannot read %s for its W&B group: %s", path, err)
            return {"project": None, "group": None}
        projects.add(cfg.tracking.project)
        groups.add(cfg.tracking.group or cfg.name)  # the engine's rule: group defaults to the experiment name
    return {
        "project": projects.pop() if len(projects) == 1 else None,
        "group": groups.pop() if len(groups) == 1 else None,
    }


def log_report(
    out_dir: str | Path,
    figures: Mapping[str, str | Path],
    tables: Mapping[str, dict],
    *,
    mode: str = "offline",
    project: str | None = None,
    group: str | None = None,
    name: str = "convergence-report",
) -> str | None:
    """One W&B run (tagged "report") holding `figures` (key -> PNG file) and `tables`; its folder is `out_dir`.

    Returns the run id, or None when W&B is disabled or could not start (a warning says why).
    """
    from conddetr.tracking import Tracker

    media: dict = {key: {"image": str(path), "caption": Path(path).name} for key, path in figures.items()}
    media.update(tables)
    tracker = Tracker(out_dir, mode=mode, project=project or "conddetr", group=group, name=name, tags=["report"],
                      config={"report": name, "figures": sorted(figures)})  # fmt: skip
    try:
        if not tracker.logs_media:
            return None
        tracker.log_media(media, step=0, epoch=0.0)
        return tracker.run_id
    finally:
        tracker.finish()
