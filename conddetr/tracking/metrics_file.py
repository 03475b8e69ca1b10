"""metrics.jsonl: one JSON object per line (`{"step", "epoch", **metrics}`): its writer, readers and truncation.

`MetricsWriter` writes it for `Tracker`; a crash can leave at most a cut-off last line, which the readers drop.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path

METRICS_NAME = "metrics.jsonl"  # one JSON object per line: {"step", "epoch", **metrics}


class TrackingWarning(UserWarning):
    """W&B failed or a metrics file was damaged; training goes on."""


class MetricsWriter:
    """Appends rows to `run_dir/metrics.jsonl`, each flushed and fsynced: a crash loses at most the line in flight.

    Opening first drops the rows after `resume_step` (resuming a checkpoint), else a cut-off last line (a crash).
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.path = run_dir / METRICS_NAME
        if resume_step is not None:
            truncate_metrics_after(run_dir, resume_step)
        else:
            _drop_partial_tail(self.path)  # else the next line would be glued to a fragment
        self._file = open(self.path, "a", encoding="utf-8")  # closed in close()

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _metrics_file(run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir)
    return path / METRICS_NAME if path.is_dir() else path


def _parse_lines(path: Path) -> tuple[list[dict], bool]:
    """Rows of a metrics file and whether its last line was cut short (a crash mid-write)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rows: list[dict] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):
                warnings.warn(f"{path}: ignoring truncated last line {number} ({e})", TrackingWarning, stacklevel=3)
                return rows, True
            raise ValueError(f"{path}: line {number} is not valid JSON ({e})") from e
    return rows, False


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """Rows of `run_dir/metrics.jsonl` (or of that file itself); a truncated last line is dropped with a warning."""
    path = _metrics_file(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    return _parse_lines(path)[0]


def truncate_metrics_after(run_dir: str | os.PathLike, step: int) -> int:
    """Drop rows with step > `step` (logged after the checkpoint being resumed); returns how many were dropped.

    Call it before a Tracker opens the file (Tracker(resume_step=...) does). A missing file is not an error.
    """
    path = _metrics_file(run_dir)
    if not path.is_file():
        return 0
    rows, partial = _parse_lines(path)
    kept = [row for row in rows if row.get("step", -math.inf) <= step]
    if len(kept) == len(rows) and not partial:
        return 0
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(rows) - len(kept)


def _drop_partial_tail(path: Path) -> None:
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    warnings.warn(f"{path}: dropping a truncated last line ({len(data) - keep} bytes)", TrackingWarning, stacklevel=4)
    with open(path, "r+b") as f:
        f.truncate(keep)
