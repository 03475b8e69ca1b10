"""Reading W&B's transaction logs (`run-<id>.wandb`) offline: history rows and run records, no network needed.

The format is LevelDB's log (crc32, length, type, data; records may span 32 KiB blocks) of wandb protobuf records.
"""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conddetr.tracking.metrics_file import TrackingWarning

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


def wandb_file_complete(path: Path) -> bool:
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
