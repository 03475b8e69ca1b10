"""Run tracking: `Tracker` writes metrics.jsonl and W&B (online/offline); readers bring both back without network.

tracker.py: Tracker; metrics_file.py: the metrics.jsonl writer and readers; wandb_session.py: the W&B run (the only
module that starts wandb); wandb_files.py: offline `.wandb` readers. Import from `conddetr.tracking`.
"""

from conddetr.tracking.metrics_file import METRICS_NAME, TrackingWarning, read_metrics, truncate_metrics_after
from conddetr.tracking.tracker import Tracker
from conddetr.tracking.wandb_files import read_wandb_history, read_wandb_runs
from conddetr.tracking.wandb_session import MODES

__all__ = ["METRICS_NAME", "MODES", "Tracker", "TrackingWarning", "read_metrics", "read_wandb_history",
           "read_wandb_runs", "truncate_metrics_after"]  # fmt: skip
