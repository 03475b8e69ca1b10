"""The W&B side of a Tracker: start (online falls back to offline), log, backfill after a kill, finish and flush.

The only module that starts wandb (imported lazily). A W&B problem never stops training: it warns once, falls back.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from conddetr.tracking.metrics_file import TrackingWarning
from conddetr.tracking.wandb_files import read_wandb_history, wandb_file_complete

MODES = ("online", "offline", "disabled")


class WandbSession:
    """One W&B run id over one or more segments (a segment per start: resume, online -> offline fallback).

    `mode` is the mode actually in use after any fallback; `run` the live wandb run, or None.
    """

    def __init__(self, run_dir: Path, init_kwargs: Mapping[str, Any], *, init_timeout: float, finish_timeout: float):
        self.run_dir = run_dir
        self.mode = "disabled"
        self.run: Any = None
        self.finish_timeout = finish_timeout
        self._init_kwargs = {**init_kwargs, "resume": "allow", "dir": str(run_dir)}  # `id`: the run id
        self._init_timeout = init_timeout
        self._warned: set[str] = set()

    def start(self, mode: str) -> None:
        """Start a segment in `mode`; online falls back to offline, a failed offline start leaves W&B disabled."""
        for attempt in [mode, "offline"] if mode == "online" else [mode]:
            try:
                self.run = _init_run(self.run_dir, attempt, self._init_kwargs, self._init_timeout)
                self.mode = attempt
                return
            except Exception as e:
                then = "falling back to offline" if attempt == "online" else "W&B disabled, metrics.jsonl only"
                self._warn(f"init-{attempt}", f"wandb.init(mode={attempt!r}) failed ({type(e).__name__}: {e}); {then}")
        self.mode = "disabled"

    def log(self, row: dict) -> None:
        """Send one row; on a failure an online run goes on in a new offline segment, an offline one stops W&B."""
        if self.run is None:
            return
        try:
            self.run.log(row)
        except Exception as e:  # W&B must never stop training
            self._warn("log", f"wandb log failed ({type(e).__name__}: {e})")
            self.close()
            if self.mode == "online":
                self.start("offline")
                if self.run is not None:
                    self._safe_log(row)
            else:
                self.mode = "disabled"

    def log_media(self, media: Mapping[str, Any], *, step: int, epoch: float) -> None:
        """Images and tables as wandb objects in one row (the format is `Tracker.log_media`'s); a failure warns."""
        if self.run is None or not media:
            return
        try:
            self.run.log(_media_row(media, step, epoch))
        except Exception as e:  # pictures are a courtesy: never stop training (nor the metric rows) for them
            self._warn("media", f"wandb media logging failed ({type(e).__name__}: {e}); metrics still logged")

    def backfill(self, rows: Sequence[dict]) -> None:
        """Re-send the rows (metrics.jsonl's) that earlier offline W&B segments lost.

        A SIGKILL also takes wandb-core's unflushed buffer, while metrics.jsonl is fsynced per line. The replay starts
        at the first row of the first step that differs, because a segment replaces earlier rows from its first step
        on (`read_wandb_history`). Online runs are not read back (that needs the network).
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TrackingWarning)  # the killed segment's torn last record
            try:
                have = read_wandb_history(self.run_dir / "wandb")
            except FileNotFoundError:
                have = []
        for row in rows[_first_lost(rows, have) :]:
            self._safe_log(row)

    def close(self) -> None:
        """Finish the run and wait until its `.wandb` file is complete, so its history can be read back at once."""
        run, self.run = self.run, None
        if run is None:
            return
        try:
            sync_file = Path(run.settings.sync_file)
            run.finish()
        except Exception as e:
            self._warn("finish", f"wandb finish failed ({type(e).__name__}: {e})")
            return
        # wandb-core writes the transaction log asynchronously.
        deadline = time.monotonic() + self.finish_timeout
        while not wandb_file_complete(sync_file):
            if time.monotonic() > deadline:
                self._warn("flush", f"{sync_file} still incomplete {self.finish_timeout:.0f} s after wandb finish")
                return
            time.sleep(0.02)

    def _safe_log(self, row: dict) -> None:
        try:
            self.run.log(row)
        except Exception as e:
            self._warn("log-fallback", f"wandb log failed again ({type(e).__name__}: {e}); W&B disabled")
            self.close()
            self.mode = "disabled"

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            # stacklevel 4: named after the code that called the Tracker, not after this package.
            warnings.warn(f"{message} [run folder {self.run_dir}]", TrackingWarning, stacklevel=4)


def _init_run(run_dir: Path, mode: str, init_kwargs: Mapping[str, Any], init_timeout: float) -> Any:
    """A new wandb run (segment) with `epoch` as the x-axis of every metric."""
    import wandb

    # A numbered suffix gives every (re)start its own folder, even two within the same second.
    wandb_dir = run_dir / "wandb"
    run_id = init_kwargs["id"]
    segment = len(list(wandb_dir.glob(f"*-{run_id}-seg*"))) if wandb_dir.is_dir() else 0
    options = dict(silent=True, console="off", init_timeout=init_timeout)
    try:
        settings = wandb.Settings(**options, x_sync_dir_suffix=f"seg{segment:03d}")
    except Exception:  # a wandb version without the private setting
        settings = wandb.Settings(**options)
    _drop_inherited_wandb_service()
    run = wandb.init(mode=mode, settings=settings, **init_kwargs)
    try:
        run.define_metric("step")
        run.define_metric("epoch")
        run.define_metric("*", step_metric="epoch")  # curves of runs with different batch sizes line up
    except Exception:
        run.finish()
        raise
    return run


def _media_row(media: Mapping[str, Any], step: int, epoch: float) -> dict[str, Any]:
    """A W&B row of wandb.Image / wandb.Table objects from plain-data media (format: `Tracker.log_media`)."""
    import wandb

    def image(item: Mapping) -> Any:
        return wandb.Image(item["image"], caption=item.get("caption"), boxes=item.get("boxes"))

    row: dict[str, Any] = {"step": int(step), "epoch": float(epoch)}
    for key, value in media.items():
        if isinstance(value, Mapping) and "columns" in value:
            row[key] = wandb.Table(columns=list(value["columns"]), data=[list(r) for r in value["rows"]])
        elif isinstance(value, Mapping):
            row[key] = image(value)
        else:
            row[key] = [image(item) for item in value]
    return row


def _first_lost(rows: Sequence[dict], have: Sequence[dict]) -> int:
    """Index of the first row to re-send: the first row of the step where `have` stops matching (len: none)."""
    k = 0
    while k < min(len(rows), len(have)) and rows[k] == have[k]:
        k += 1
    if k == len(rows):
        return k
    while k > 0 and rows[k - 1]["step"] == rows[k]["step"]:
        k -= 1
    return k


def _drop_inherited_wandb_service() -> None:
    """Start this process's own wandb-core rather than join one named by an inherited WANDB_SERVICE.

    wandb exports its service address to the environment, so a child of any process that used wandb (a test runner,
    a notebook, a driver) would join the parent's service: it dies with its owner, and it still holds the stream of
    a SIGKILLed run, so the resumed run's init fails with "run ID ... is in use".
    """
    from wandb.sdk import wandb_setup

    if getattr(wandb_setup, "_singleton", None) is None:  # this process has not set wandb up itself
        os.environ.pop("WANDB_SERVICE", None)
