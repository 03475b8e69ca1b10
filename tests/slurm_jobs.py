"""Helpers of the SLURM test modules: wait for a job, read a run folder's launch record, metrics and W&B runs."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import torch

from conddetr import launcher
from conddetr.launch_status import ACTIVE_STATES, collect_status

TIMEOUT_S = 240  # per wait


def wait(predicate, what: str, timeout: float = TIMEOUT_S, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    squeue = subprocess.run(["squeue"], capture_output=True, text=True).stdout
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\nsqueue:\n{squeue}")


def finished(run_dir: Path) -> bool:
    (row,) = collect_status(run_dir)
    return row.state not in (*ACTIVE_STATES, "UNKNOWN")


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / launcher.LAUNCH_RECORD).read_text())


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)


def wandb_ids(run_dir: Path) -> list[str]:
    # Offline runs are folders `offline-run-<date>_<time>-<id>[-segNNN]`; one per (re)start of the job.
    return [p.name.split("-")[3] for p in sorted((run_dir / "wandb").glob("offline-run-*")) if p.is_dir()]


def sacct_states(job_id: str) -> list[str]:
    """Every record of the job, oldest first (a requeued job keeps its id: REQUEUED, then the final state)."""
    cmd = ["sacct", "-n", "-P", "-X", "-D", "-j", job_id, "-o", "State"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()


def job_ended(job_id: str) -> bool:
    states = sacct_states(job_id)
    return bool(states) and states[-1] not in (*ACTIVE_STATES, "UNKNOWN")


def assert_same_metrics(got: list[dict], want: list[dict]) -> None:
    """Row for row, key for key, bit for bit (CPU runs with a fixed thread count are deterministic)."""
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    keys = sorted(set().union(*want))
    table = [[[float(r.get(k, float("nan"))) for k in keys] for r in rows] for rows in (got, want)]
    got_t, want_t = torch.tensor(table[0], dtype=torch.float64), torch.tensor(table[1], dtype=torch.float64)
    torch.testing.assert_close(got_t, want_t, rtol=0, atol=0, equal_nan=True)
