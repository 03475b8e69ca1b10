"""Tracker (metrics.jsonl + W&B), W&B fallbacks, and reading metrics/offline W&B history back without network."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from conddetr.tracking import (
    METRICS_NAME,
    Tracker,
    TrackingWarning,
    read_metrics,
    read_wandb_history,
    truncate_metrics_after,
)


def _isolate_wandb(mp: pytest.MonkeyPatch, tmp: Path) -> None:
    """W&B writes only under `tmp` and can reach nothing: no key, no netrc, a closed local port as server."""
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        mp.setenv(var, str(tmp / var.lower()))
    mp.setenv("HOME", str(tmp / "home"))
    mp.setenv("NETRC", str(tmp / "home" / ".netrc"))
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: even an online attempt stays on this host
    mp.delenv("WANDB_API_KEY", raising=False)
    mp.delenv("WANDB_MODE", raising=False)  # each Tracker passes its mode explicitly


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    _isolate_wandb(monkeypatch, tmp_path)
    return tmp_path


def _rows(start: int, stop: int, steps_per_epoch: int = 4) -> list[dict]:
    return [{"train/loss": 1.0 / (s + 1), "train/lr": 1e-4, "_epoch": s / steps_per_epoch} for s in range(start, stop)]


def _log(tracker: Tracker, rows: list[dict], first_step: int) -> None:
    for step, row in enumerate(rows, start=first_step):
        metrics = {k: v for k, v in row.items() if k != "_epoch"}
        tracker.log(metrics, step=step, epoch=row["_epoch"])


@pytest.fixture(scope="module")
def resumed_offline_run(tmp_path_factory):
    """An offline run of 300 steps, a crash leaving steps 251..299 and a half line after the step-250 checkpoint,
    then a resume with the same run id that logs steps 251..319. Big enough for records to span 32 KiB blocks."""
    tmp = tmp_path_factory.mktemp("wandb_resume")
    with pytest.MonkeyPatch.context() as mp:
        _isolate_wandb(mp, tmp)
        run_dir = tmp / "run"
        first = Tracker(run_dir, mode="offline", name="t", config={"optim": {"lr": 1e-4}})
        _log(first, _rows(0, 300), first_step=0)
        first.finish()
        with open(run_dir / METRICS_NAME, "a") as f:
            f.write('{"step": 300, "epo')  # killed mid-write
        with pytest.warns(TrackingWarning, match="truncated last line"):
            second = Tracker(run_dir, mode="offline", name="t", resume_id=first.run_id, resume_step=250)
        _log(second, _rows(251, 320), first_step=251)
        second.finish()
        yield run_dir, first, second


def test_metrics_jsonl_rows_and_types(tmp_path):
    tracker = Tracker(tmp_path / "run", mode="disabled")
    tracker.log({"train/loss": torch.tensor(0.5), "val/AP": 0.25, "train/count": 3}, step=7, epoch=0.5)
    tracker.log({"train/loss": 0.25}, step=8, epoch=1.0)
    tracker.finish()
    lines = (tmp_path / "run" / METRICS_NAME).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 7, "epoch": 0.5, "train/loss": 0.5, "val/AP": 0.25, "train/count": 3},
        {"step": 8, "epoch": 1.0, "train/loss": 0.25},
    ]
    assert read_metrics(tmp_path / "run") == [json.loads(line) for line in lines]
    assert tracker.run_id and tracker.mode == "disabled"


def test_reserved_metric_names_rejected(tmp_path):
    with Tracker(tmp_path, mode="disabled") as tracker, pytest.raises(ValueError, match="reserved"):
        tracker.log({"epoch": 1.0}, step=0, epoch=1.0)


def test_non_zero_rank_writes_nothing(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setattr(wandb, "init", lambda *a, **k: pytest.fail("rank 1 must not start W&B"))
    tracker = Tracker(tmp_path / "run", mode="online", resume_id="abc123", rank=1)
    tracker.log({"train/loss": 1.0}, step=0, epoch=0.0)
    tracker.finish()
    assert not (tmp_path / "run").exists()
    assert tracker.run_id == "abc123"


def test_resume_truncates_and_wandb_history_equals_metrics(resumed_offline_run):
    run_dir, first, second = resumed_offline_run
    assert second.run_id == first.run_id and second.mode == "offline"
    expected = [
        {"step": s, "epoch": row["_epoch"], "train/loss": row["train/loss"], "train/lr": row["train/lr"]}
        for s, row in enumerate(_rows(0, 320))
    ]
    assert read_metrics(run_dir) == expected  # no duplicated steps 251..299, no half line
    files = sorted(run_dir.rglob("*.wandb"))
    assert len({f.resolve() for f in files}) == 2  # one transaction log per (re)start, same run id
    assert all(first.run_id in f.name for f in files)
    assert read_wandb_history(run_dir) == expected


def test_wandb_history_keeps_internal_keys_on_request(resumed_offline_run):
    run_dir, _, _ = resumed_offline_run
    rows = read_wandb_history(run_dir / "wandb", include_internal=True)
    assert {"_step", "_timestamp", "step", "epoch", "train/loss"} <= set(rows[0])


def test_damaged_wandb_file_reads_prefix_with_warning(resumed_offline_run, tmp_path):
    run_dir, _, _ = resumed_offline_run
    source = next(p for p in run_dir.rglob("*.wandb") if not p.is_symlink() and "seg000" in str(p))
    full = read_wandb_history(source)
    data = source.read_bytes()
    cut = [i for i in range(len(data)) if data.startswith(b"train/loss", i)][100]  # inside a record
    damaged = tmp_path / source.name
    damaged.write_bytes(data[:cut])
    with pytest.warns(TrackingWarning, match="partial last record"):
        partial = read_wandb_history(damaged)
    assert 0 < len(partial) < len(full)
    assert partial == full[: len(partial)]


def test_online_without_api_key_warns_and_falls_back_to_offline(wandb_env):
    with pytest.warns(TrackingWarning, match="falling back to offline"):
        tracker = Tracker(wandb_env / "run", mode="online", init_timeout=5)
    assert tracker.mode == "offline"
    _log(tracker, _rows(0, 3), first_step=0)
    tracker.finish()
    assert read_wandb_history(wandb_env / "run") == read_metrics(wandb_env / "run")


def test_init_failure_everywhere_disables_wandb_and_keeps_metrics(wandb_env, monkeypatch):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("simulated W&B outage")

    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(TrackingWarning) as record:
        tracker = Tracker(wandb_env / "run", mode="online")
    messages = [str(w.message) for w in record]
    assert any("falling back to offline" in m for m in messages)
    assert any("W&B disabled" in m for m in messages)
    assert tracker.mode == "disabled"
    _log(tracker, _rows(0, 3), first_step=0)
    tracker.finish()
    assert [row["step"] for row in read_metrics(wandb_env / "run")] == [0, 1, 2]


def test_log_failure_warns_once_and_training_continues(wandb_env, monkeypatch):
    tracker = Tracker(wandb_env / "run", mode="offline")
    calls = []

    def broken_log(row):
        calls.append(row["step"])
        raise ConnectionError("simulated log failure")

    monkeypatch.setattr(tracker._run, "log", broken_log)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _log(tracker, _rows(0, 4), first_step=0)
    tracker.finish()
    ours = [w for w in record if issubclass(w.category, TrackingWarning)]
    assert len(ours) == 1 and "wandb log failed" in str(ours[0].message)
    assert calls == [0]  # offline failure: W&B is disabled, not retried every step
    assert tracker.mode == "disabled"
    assert [row["step"] for row in read_metrics(wandb_env / "run")] == [0, 1, 2, 3]


def test_read_metrics_tolerates_truncated_last_line(tmp_path):
    path = tmp_path / METRICS_NAME
    path.write_text('{"step": 0, "epoch": 0.0, "a": 1}\n{"step": 1, "epoch": 0.5, "a": 2}\n{"step": 2, "ep')
    with pytest.warns(TrackingWarning, match="truncated last line"):
        rows = read_metrics(tmp_path)
    assert rows == [{"step": 0, "epoch": 0.0, "a": 1}, {"step": 1, "epoch": 0.5, "a": 2}]


def test_read_metrics_rejects_damage_before_the_last_line(tmp_path):
    (tmp_path / METRICS_NAME).write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2"):
        read_metrics(tmp_path)


def test_truncate_metrics_after(tmp_path):
    assert truncate_metrics_after(tmp_path, 3) == 0  # no file yet: a fresh run
    (tmp_path / METRICS_NAME).write_text("".join(json.dumps({"step": s, "epoch": s / 2}) + "\n" for s in range(6)))
    assert truncate_metrics_after(tmp_path, 3) == 2
    assert read_metrics(tmp_path) == [{"step": s, "epoch": s / 2} for s in range(4)]
    assert truncate_metrics_after(tmp_path, 3) == 0


def test_online_log_failure_continues_in_an_offline_segment(wandb_env, monkeypatch):
    tracker = Tracker(wandb_env / "run", mode="offline")
    tracker.mode = "online"  # stand-in for a live online run whose connection then breaks
    real_log = tracker._run.log

    def flaky_log(row):
        if row["step"] == 2:
            raise ConnectionError("simulated network loss")
        real_log(row)

    monkeypatch.setattr(tracker._run, "log", flaky_log)
    with pytest.warns(TrackingWarning, match="wandb log failed"):
        _log(tracker, _rows(0, 5), first_step=0)
    tracker.finish()
    assert tracker.mode == "offline"
    assert len({p.resolve() for p in (wandb_env / "run").rglob("*.wandb")}) == 2
    assert read_wandb_history(wandb_env / "run") == read_metrics(wandb_env / "run")  # step 2 re-sent offline


def test_media_failure_warns_and_metrics_go_on(wandb_env, monkeypatch):
    import wandb

    tracker = Tracker(wandb_env / "run", mode="offline")
    assert tracker.logs_media
    tracker.log_media({"val/table": {"columns": ["a"], "rows": [[1.0]]}}, step=0, epoch=0.0)

    def broken_image(*args, **kwargs):
        raise OSError("simulated media failure")

    monkeypatch.setattr(wandb, "Image", broken_image)
    with pytest.warns(TrackingWarning, match="media logging failed.*simulated media failure"):
        tracker.log_media({"val/predictions": [{"image": "x.png"}]}, step=1, epoch=1.0)
    _log(tracker, _rows(1, 3), first_step=1)
    tracker.finish()
    assert read_wandb_history(wandb_env / "run") == read_metrics(wandb_env / "run")  # the table row left out
    (row,) = [r for r in read_wandb_history(wandb_env / "run", include_media=True) if "val/table" in r]
    assert row["val/table"]["_type"] == "table-file" and row["step"] == 0
    assert Tracker(wandb_env / "off", mode="disabled").logs_media is False


def test_child_process_does_not_join_the_parents_wandb_service(wandb_env):
    """wandb exports WANDB_SERVICE; a child resuming a run whose stream the parent's service still holds (as after
    a SIGKILL) must start its own service, not fail with "run ID ... is in use" and lose W&B."""
    import os
    import subprocess
    import sys

    parent = Tracker(wandb_env / "parent", mode="offline", name="parent")  # a live stream under this run id
    try:
        assert "WANDB_SERVICE" in os.environ  # what makes children join this process's service
        child = (
            "import sys, warnings; from pathlib import Path; from conddetr.tracking import Tracker; "
            "warnings.simplefilter('error'); "
            "t = Tracker(Path(sys.argv[1]), mode='offline', name='child', resume_id=sys.argv[2], resume_step=0); "
            "t.log({'train/loss': 1.0}, step=1, epoch=0.5); print(t.mode); t.finish()"
        )
        out = subprocess.run(
            [sys.executable, "-c", child, str(wandb_env / "child"), parent.run_id],
            capture_output=True, text=True, timeout=180, env=dict(os.environ),
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["offline"]
        assert read_wandb_history(wandb_env / "child") == read_metrics(wandb_env / "child")
    finally:
        parent.finish()
