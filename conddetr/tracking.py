"""Run tracking: `metrics.jsonl` (always, on rank 0) and Weights & Biases (online/offline), plus readers for both.

The only module that imports wandb (lazily). W&B problems never stop training: they warn once and fall back.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import struct
import time
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from conddetr.metrics_file import (  # re-exported: the metrics file is part of tracking's interface
    METRICS_NAME,
    TrackingWarning,
    _drop_partial_tail,
    read_metrics,
    truncate_metrics_after,
)

__all__ = ["METRICS_NAME", "MODES", "Tracker", "TrackingWarning", "read_metrics", "read_wandb_history",
           "truncate_metrics_after"]  # fmt: skip
MODES = ("online", "offline", "disabled")


class Tracker:
    """Logs metric rows to `run_dir/metrics.jsonl` and to W&B with `epoch` as the x-axis; no-op on ranks != 0.

    `resume_id` (saved in checkpoints as `.run_id`) continues the same W&B run; `resume_step` first drops the
    metrics.jsonl lines logged after the checkpoint being resumed (see `truncate_metrics_after`).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        mode: str = "offline",
        project: str = "conddetr",
        entity: str | None = None,
        group: str | None = None,
        name: str | None = None,
        tags: Iterable[str] = (),
        config: Mapping | None = None,
        resume_id: str | None = None,
        resume_step: int | None = None,
        rank: int = 0,
        init_timeout: float = 90.0,
        finish_timeout: float = 30.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"tracking mode {mode!r} is not one of {', '.join(MODES)}")
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.mode = "disabled"  # the mode actually in use, after any fallback
        self.run_id = resume_id
        self._run: Any = None
        self._file = None
        self._warned: set[str] = set()
        self.finish_timeout = finish_timeout
        if rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_metrics_after(self.run_dir, resume_step)
        else:
            _drop_partial_tail(self.run_dir / METRICS_NAME)  # else the next line would be glued to a fragment
        self._file = open(self.run_dir / METRICS_NAME, "a", encoding="utf-8")  # closed in finish()
        self.run_id = resume_id or secrets.token_hex(4)  # W&B ids: lowercase letters and digits
        self._init_kwargs = dict(
            project=project,
            entity=entity,
            group=group,
            name=name,
            tags=list(tags),
            config=dict(config or {}),
            id=self.run_id,
            resume="allow",
            dir=str(self.run_dir),
        )
        self._init_timeout = init_timeout
        if mode != "disabled":
            self._start(mode)
            if resume_id is not None and self.mode == "offline":
                self._backfill()

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_NAME

    def log(self, metrics: Mapping[str, Any], *, step: int, epoch: float) -> None:
        """Append one row (flushed and fsynced, so a crash loses at most this line) and send it to W&B."""
        if self._file is None:
            return
        clash = {"step", "epoch"} & set(metrics)
        if clash:
            raise ValueError(f"metric names {sorted(clash)} are reserved: pass them as the step/epoch arguments")
        row = {"step": int(step), "epoch": float(epoch), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._run is None:
            return
        try:
            self._run.log(row)
        except Exception as e:  # W&B must never stop training
            self._warn("log", f"wandb log failed ({type(e).__name__}: {e})")
            self._close_run()
            if self.mode == "online":
                self._start("offline")
                if self._run is not None:
                    self._safe_log(row)
            else:
                self.mode = "disabled"

    @property
    def logs_media(self) -> bool:
        """Whether a W&B run is active, i.e. whether media are worth computing (rank 0, W&B not disabled)."""
        return self._run is not None

    def log_media(self, media: Mapping[str, Any], *, step: int, epoch: float) -> None:
        """Log images and tables to W&B only (metrics.jsonl holds numbers), in one row at `step` / `epoch`.

        Values are plain data: an image `{"image": HxWx3 uint8 array or file path, "caption": str, "boxes": W&B box
        dict}` or a list of them; a table `{"columns": [...], "rows": [[...], ...]}`. A failure warns, never raises.
        """
        if self._run is None or not media:
            return
        try:
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
            self._run.log(row)
        except Exception as e:  # pictures are a courtesy: never stop training (nor the metric rows) for them
            self._warn("media", f"wandb media logging failed ({type(e).__name__}: {e}); metrics still logged")

    def finish(self) -> None:
        self._close_run()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def _start(self, mode: str) -> None:
        for attempt in [mode, "offline"] if mode == "online" else [mode]:
            try:
                self._run = self._init(attempt)
                self.mode = attempt
                return
            except Exception as e:
                then = "falling back to offline" if attempt == "online" else "W&B disabled, metrics.jsonl only"
                self._warn(f"init-{attempt}", f"wandb.init(mode={attempt!r}) failed ({type(e).__name__}: {e}); {then}")
        self.mode = "disabled"

    def _init(self, mode: str) -> Any:
        import wandb

        # A numbered suffix gives every (re)start its own folder, even two within the same second.
        wandb_dir = self.run_dir / "wandb"
        segment = len(list(wandb_dir.glob(f"*-{self.run_id}-seg*"))) if wandb_dir.is_dir() else 0
        options = dict(silent=True, console="off", init_timeout=self._init_timeout)
        try:
            settings = wandb.Settings(**options, x_sync_dir_suffix=f"seg{segment:03d}")
        except Exception:  # a wandb version without the private setting
            settings = wandb.Settings(**options)
        _drop_inherited_wandb_service()
        run = wandb.init(mode=mode, settings=settings, **self._init_kwargs)
        try:
            run.define_metric("step")
            run.define_metric("epoch")
            run.define_metric("*", step_metric="epoch")  # curves of runs with different batch sizes line up
        except Exception:
            run.finish()
            raise
        return run

    def _backfill(self) -> None:
        """Re-send the metrics.jsonl rows that earlier offline W&B segments lost.

        A SIGKILL also takes wandb-core's unflushed buffer, while metrics.jsonl is fsynced per line. The replay starts
        at the first row of the first step that differs, because a segment replaces earlier rows from its first step
        on (`read_wandb_history`). Online runs are not read back (that needs the network).
        """
        rows = read_metrics(self.run_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TrackingWarning)  # the killed segment's torn last record
            try:
                have = read_wandb_history(self.run_dir / "wandb")
            except FileNotFoundError:
                have = []
        k = 0
        while k < min(len(rows), len(have)) and rows[k] == have[k]:
            k += 1
        if k == len(rows):
            return
        while k > 0 and rows[k - 1]["step"] == rows[k]["step"]:
            k -= 1
        for row in rows[k:]:
            self._safe_log(row)

    def _safe_log(self, row: dict) -> None:
        try:
            self._run.log(row)
        except Exception as e:
            self._warn("log-fallback", f"wandb log failed again ({type(e).__name__}: {e}); W&B disabled")
            self._close_run()
            self.mode = "disabled"

    def _close_run(self) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        try:
            sync_file = Path(run.settings.sync_file)
            run.finish()
        except Exception as e:
            self._warn("finish", f"wandb finish failed ({type(e).__name__}: {e})")
            return
        # wandb-core writes the transaction log asynchronously; wait so the history can be read back at once.
        deadline = time.monotonic() + self.finish_timeout
        while not _wandb_file_complete(sync_file):
            if time.monotonic() > deadline:
                self._warn("flush", f"{sync_file} still incomplete {self.finish_timeout:.0f} s after wandb finish")
                return
            time.sleep(0.02)

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"{message} [run folder {self.run_dir}]", TrackingWarning, stacklevel=3)


def _drop_inherited_wandb_service() -> None:
    """Start this process's own wandb-core rather than join one named by an inherited WANDB_SERVICE.

    wandb exports its service address to the environment, so a child of any process that used wandb (a test runner,
    a notebook, a driver) would join the parent's service: it dies with its owner, and it still holds the stream of
    a SIGKILLed run, so the resumed run's init fails with "run ID ... is in use".
    """
    from wandb.sdk import wandb_setup

    if getattr(wandb_setup, "_singleton", None) is None:  # this process has not set wandb up itself
        os.environ.pop("WANDB_SERVICE", None)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):  # 0-d tensors and numpy scalars
        value = value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return float(value)


# --- reading W&B's transaction log (`run-<id>.wandb`) without network -------------------------------------------

_HEADER = b":W&B"  # then 2 magic bytes and 1 version byte
_HEADER_LEN = 7
_BLOCK = 32 * 1024  # LevelDB-log blocks; the file header counts towards the first block
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_payloads(path: Path, quiet: bool = False) -> Iterator[bytes]:
    """Record payloads of a `.wandb` file (LevelDB log format: crc32, length, type, data; records may span blocks)."""
    data = path.read_bytes()
    if not data.startswith(_HEADER) or len(data) < _HEADER_LEN:
        raise ValueError(f"{path} is not a W&B transaction log (bad header)")
    pos, pending = _HEADER_LEN, b""
    while pos < len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        if pos + 7 > len(data):
            break  # a cut-off record header
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        body = data[pos + 7 : pos + 7 + length]
        if len(body) < length:
            break
        if kind not in (_FULL, _FIRST, _MIDDLE, _LAST) or zlib.crc32(bytes([kind]) + body) & 0xFFFFFFFF != crc:
            if not quiet:
                warnings.warn(f"{path}: stopped at a damaged record (offset {pos})", TrackingWarning, stacklevel=2)
            return
        pos += 7 + length
        if kind == _FULL:
            yield body
        elif kind == _FIRST:
            pending = body
        elif kind == _MIDDLE:
            pending += body
        elif kind == _LAST:
            yield pending + body
            pending = b""
    if (pos < len(data) or pending) and not quiet:  # a run killed mid-write (or still writing)
        warnings.warn(f"{path}: ignoring a partial last record (offset {pos})", TrackingWarning, stacklevel=2)


def _wandb_file_complete(path: Path) -> bool:
    """Whether a `.wandb` file holds its run's exit record (all history before it is on disk)."""
    from wandb.proto import wandb_internal_pb2

    if not path.is_file() or path.stat().st_size <= _HEADER_LEN:
        return False
    record = wandb_internal_pb2.Record()
    for payload in _wandb_payloads(path, quiet=True):
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "exit":
            return True
    return False


def _read_wandb_file(path: Path) -> tuple[float, list[dict]]:
    """(run start time, history rows) of one `.wandb` file."""
    from wandb.proto import wandb_internal_pb2

    start, rows = path.stat().st_mtime, []
    for payload in _wandb_payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run" and record.run.HasField("start_time"):
            start = record.run.start_time.seconds + record.run.start_time.nanos * 1e-9
        elif kind == "history":
            row: dict = {}
            for item in record.history.item:
                # Media are logged as nested keys (["val/predictions", "_type"], ...): rebuild their dicts.
                *parents, leaf = [item.key] if item.key else list(item.nested_key)
                node = row
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = json.loads(item.value_json)
            rows.append(row)
    return start, rows


def read_wandb_runs(path: str | os.PathLike) -> list[dict]:
    """The run record of every `.wandb` file under `path`: {"file", "run_id", "project", "group"}, one per segment."""
    from wandb.proto import wandb_internal_pb2

    root = Path(path)
    files = sorted({root.resolve()} if root.is_file() else {p.resolve() for p in root.rglob("*.wandb")})
    if not files:
        raise FileNotFoundError(f"no .wandb files under {root}")
    runs = []
    for file in files:
        record = wandb_internal_pb2.Record()
        for payload in _wandb_payloads(file, quiet=True):
            record.ParseFromString(payload)
            if record.WhichOneof("record_type") == "run":
                r = record.run
                runs.append({"file": str(file), "run_id": r.run_id, "project": r.project, "group": r.run_group})
                break
    return runs


def _is_media(value: Any) -> bool:
    return isinstance(value, dict) and "_type" in value  # images, image lists, tables, ...


def read_wandb_history(
    path: str | os.PathLike, include_internal: bool = False, include_media: bool = False
) -> list[dict]:
    """History rows of every `.wandb` file under `path` (run folder, its `wandb/`, or one file), merged in order.

    Segments (resumes) are ordered by start time; a segment replaces the earlier rows from its first `step` on,
    as `truncate_metrics_after` does for metrics.jsonl. Keys starting with `_` are W&B's own unless requested.
    Media (images, tables: dicts with a `_type`, their files under the segment's `files/`) are left out unless
    requested, with the rows that held nothing else, so by default the history equals metrics.jsonl.
    """
    root = Path(path)
    files = {root.resolve()} if root.is_file() else {p.resolve() for p in root.rglob("*.wandb")}
    if not files:
        raise FileNotFoundError(f"no .wandb files under {root}")
    segments = [(*_read_wandb_file(f), str(f)) for f in files]
    merged: list[dict] = []
    for _start, rows, _name in sorted(segments, key=lambda s: (s[0], s[2])):
        if rows and "step" in rows[0]:
            merged = [row for row in merged if row.get("step", -math.inf) < rows[0]["step"]]
        merged += rows
    if not include_media:
        plain = [{k: v for k, v in row.items() if not _is_media(v)} for row in merged]
        merged = [p for p, row in zip(plain, merged, strict=True) if len(p) == len(row) or _has_metrics(p)]
    if include_internal:
        return merged
    return [{k: v for k, v in row.items() if not k.startswith("_")} for row in merged]


def _has_metrics(row: dict) -> bool:
    return any(k not in ("step", "epoch") and not k.startswith("_") for k in row)
