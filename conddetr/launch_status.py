"""`launch.py status DIR`: one table row per run folder (job id, SLURM state, epoch reached, latest val AP, error)."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from conddetr.launcher import ERROR_FILE, LAUNCH_RECORD, SUBMITIT_DIR

RUN_MARKERS = ("config.yaml", LAUNCH_RECORD)  # a run folder holds one of these (pending jobs: only the record)
SKIP_DIRS = {SUBMITIT_DIR, ".submitit", "wandb", "results"}
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "COMPLETING")
_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt|Exit)\b.*")


@dataclass
class RunStatus:
    run: str  # run folder relative to DIR
    cluster: str
    job_id: str
    state: str  # SLURM state (sacct) or the job's own record for local/debug runs
    epoch: float | None  # furthest epoch logged in metrics.jsonl
    val_ap: float | None  # latest val/AP in metrics.jsonl
    error: str  # first line of the error, for failed runs


def find_run_dirs(root: Path) -> list[Path]:
    """Run folders under root (root included), recursively; submitit/W&B/results folders are not searched."""
    found, stack = [], [root]
    while stack:
        folder = stack.pop()
        if any((folder / m).is_file() for m in RUN_MARKERS):
            found.append(folder)
        stack += [d for d in folder.iterdir() if d.is_dir() and d.name not in SKIP_DIRS and not d.is_symlink()]
    return sorted(found)


def read_metrics(run_dir: Path) -> tuple[float | None, float | None]:
    """(furthest epoch, latest val/AP) from metrics.jsonl; a half-written last line is ignored."""
    epoch = ap = None
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None, None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row.get("epoch"), int | float):
            epoch = max(epoch or 0.0, float(row["epoch"]))
        if isinstance(row.get("val/AP"), int | float):
            ap = float(row["val/AP"])
    return epoch, ap


def sacct_states(records: dict[str, dict]) -> dict[str, str]:
    """SLURM state per job id through sacct; ids unknown to it (or no sacct) are left out."""
    if not records or shutil.which("sacct") is None:
        return {}
    cmd = ["sacct", "-n", "-P", "-X", "-D", "-o", "JobID,State,Submit", "-j", ",".join(records)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return {}
    states: dict[str, tuple[str, str]] = {}
    for line in out.splitlines():
        job_id, state, submit = (line.split("|") + ["", ""])[:3]
        if job_id not in records:
            continue
        # Job ids restart when the SLURM state folder is wiped: keep the record submitted with (or after) this run.
        submitted = records[job_id].get("submitted_at", "")
        if _not_before(submit, submitted) and (job_id not in states or submit >= states[job_id][1]):
            states[job_id] = (state.split()[0], submit)  # "CANCELLED by 0" -> "CANCELLED"
    return {k: v[0] for k, v in states.items()}


def _not_before(sacct_time: str, record_time: str) -> bool:
    try:
        submit = dt.datetime.fromisoformat(sacct_time).astimezone(dt.timezone.utc)
        recorded = dt.datetime.fromisoformat(record_time)
    except ValueError:
        return True
    return submit >= recorded - dt.timedelta(minutes=2)  # sacct's clock vs the launcher's, and whole seconds


def first_error_line(run_dir: Path, record: dict) -> str:
    """The job's `error.txt` first line, else the last exception line of the job's submitit stderr log."""
    error_file = run_dir / ERROR_FILE
    if error_file.is_file():
        lines = error_file.read_text().strip().splitlines()
        return lines[0] if lines else ""
    job_id = record.get("job_id", "")
    folder = Path(record.get("submitit_folder", run_dir / SUBMITIT_DIR))
    name = re.compile(rf"{re.escape(job_id)}_\d+_log\.err")  # task logs of this job only (a sweep shares a folder)
    logs = sorted(p for p in folder.glob("*_log.err") if name.fullmatch(p.name)) if job_id and folder.is_dir() else []
    if not logs:
        return ""
    lines = [s.strip() for s in logs[0].read_text(errors="replace").splitlines() if s.strip()]
    matches = [s for s in lines if _EXCEPTION_LINE.match(s)]
    return matches[-1] if matches else (lines[-1] if lines else "")


def collect_status(root: str | Path) -> list[RunStatus]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"status: {root} is not a folder")
    runs = find_run_dirs(root)
    records = {}
    for run_dir in runs:
        path = run_dir / LAUNCH_RECORD
        records[run_dir] = json.loads(path.read_text()) if path.is_file() else {}
    slurm = {r["job_id"]: r for r in records.values() if r.get("cluster") == "slurm" and r.get("job_id")}
    states = sacct_states(slurm)
    rows = []
    for run_dir in runs:
        record = records[run_dir]
        state = states.get(record.get("job_id", ""), record.get("state", "UNKNOWN"))
        epoch, ap = read_metrics(run_dir)
        failed = state not in ("COMPLETED", *ACTIVE_STATES)
        error = first_error_line(run_dir, record) if failed or (run_dir / ERROR_FILE).is_file() else ""
        rel = str(run_dir.relative_to(root)) if run_dir != root else run_dir.name
        rows.append(RunStatus(rel, record.get("cluster", "-"), record.get("job_id", "-"), state, epoch, ap, error))
    return rows


def format_table(rows: list[RunStatus]) -> str:
    header = ("RUN", "CLUSTER", "JOB", "STATE", "EPOCH", "VAL AP", "ERROR")
    body = [
        (
            r.run,
            r.cluster,
            r.job_id,
            r.state,
            "-" if r.epoch is None else f"{r.epoch:.2f}",
            "-" if r.val_ap is None else f"{r.val_ap:.4f}",
            r.error[:100],
        )  # fmt: skip
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header) - 1)]
    lines = [
        "  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)), row[-1]]).rstrip()
        for row in [header, *body]
    ]
    return "\n".join(lines)
