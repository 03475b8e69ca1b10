"""`launch.py status DIR`: one table row per run folder (job id, SLURM state, epoch reached, latest val AP, error).

A leaf: reads run folders and sacct, imports nothing from conddetr; the launcher writes what it reads.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# What the launcher leaves in a run folder and status reads back (defined here so status imports nothing of ours).
LAUNCH_RECORD = "launch.json"  # job id, cluster, submission time, state
ERROR_FILE = "error.txt"  # written by a failing job: exception line first, then the traceback
SUBMITIT_DIR = "submitit"  # per-run submitit folder (SLURM job ids restart when the state folder is wiped)
START_MARKER = "conddetr: task started"  # first stderr line of every (re)start of a SLURM task

RUN_MARKERS = ("config.yaml", LAUNCH_RECORD)  # a run folder holds one of these (pending jobs: only the record)
SKIP_DIRS = {SUBMITIT_DIR, ".submitit", "wandb", "results"}
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "COMPLETING")
_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt|Exit)\b.*")
_RANK_PREFIX = re.compile(r"^\[rank\d+\]: ")
_SRUN_TASK_END = re.compile(r"^srun: error: (\S+): tasks? ([\d,-]+): (.+)$")  # srun's report of a task ending badly


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
    """What ended the job: the first task srun reported dead (a multi-task job's other ranks fail only because of
    it), else the job's `error.txt` first line, else the last exception line of its task 0 stderr log."""
    error_file = run_dir / ERROR_FILE
    rank0_error = ""
    if error_file.is_file():
        lines = error_file.read_text().strip().splitlines()
        rank0_error = lines[0] if lines else ""
    logs = _task_logs(run_dir, record)
    failed = first_failed_task(logs[0].read_text(errors="replace")) if 0 in logs else None
    if failed is not None:
        tasks, host, reason = failed
        ids = _task_ids(tasks)
        if 0 not in ids or not rank0_error:
            if reason.startswith("Exited with exit code") and len(ids) == 1 and ids[0] in logs:
                reason = _last_exception_line(logs[ids[0]]) or reason
            return f"rank{'s' if len(ids) > 1 else ''} {tasks} on {host}: {reason}"
    if rank0_error or 0 not in logs:
        return rank0_error
    return _last_exception_line(logs[0])


def first_failed_task(batch_log: str) -> tuple[str, str, str] | None:
    """(tasks, host, reason) of srun's first report of tasks ending badly since the job's last (re)start.

    srun writes these lines to the batch log (task 0's stderr), e.g. `srun: error: node3: task 1: Killed`; a task
    number is the rank (submitit: global rank = SLURM_PROCID).
    """
    since_start = batch_log.rsplit(START_MARKER, 1)[-1]  # a requeued job's earlier starts left their own lines
    for line in since_start.splitlines():
        m = _SRUN_TASK_END.match(line.strip())
        if m:
            return m.group(2), m.group(1), m.group(3).strip()
    return None


def _task_ids(spec: str) -> list[int]:
    ids: list[int] = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        ids += list(range(int(first), int(last or first) + 1))
    return ids


def _task_logs(run_dir: Path, record: dict) -> dict[int, Path]:
    """This job's submitit stderr logs by task (a sweep shares one folder between its jobs)."""
    job_id = record.get("job_id", "")
    folder = Path(record.get("submitit_folder", run_dir / SUBMITIT_DIR))
    if not job_id or not folder.is_dir():
        return {}
    name = re.compile(rf"{re.escape(job_id)}_(\d+)_log\.err")
    return {int(m.group(1)): p for p in folder.glob("*_log.err") if (m := name.fullmatch(p.name))}


def _last_exception_line(path: Path) -> str:
    text = path.read_text(errors="replace").rsplit(START_MARKER, 1)[-1]  # this (re)start of the task only
    # torch prefixes the traceback of a failed distributed call with "[rankN]: ".
    lines = [_RANK_PREFIX.sub("", s).strip() for s in text.splitlines() if s.strip()]
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
