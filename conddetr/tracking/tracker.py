"""`Tracker`: one metric row goes to `metrics.jsonl` (always, on rank 0) and to W&B (online/offline) when enabled."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from conddetr.tracking.metrics_file import METRICS_NAME, MetricsWriter, read_metrics
from conddetr.tracking.wandb_session import MODES, WandbSession


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
        self._metrics: MetricsWriter | None = None
        # W&B ids: lowercase letters and digits; other ranks keep the id they were given and log nothing.
        self.run_id = (resume_id or secrets.token_hex(4)) if rank == 0 else resume_id
        init_kwargs = dict(project=project, entity=entity, group=group, name=name, tags=list(tags),
                           config=dict(config or {}), id=self.run_id)  # fmt: skip
        self._wandb = WandbSession(self.run_dir, init_kwargs, init_timeout=init_timeout, finish_timeout=finish_timeout)
        if rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = MetricsWriter(self.run_dir, resume_step)  # closed in finish()
        if mode != "disabled":
            self._wandb.start(mode)
            if resume_id is not None and self._wandb.mode == "offline":
                self._wandb.backfill(read_metrics(self.run_dir))

    @property
    def mode(self) -> str:
        """The W&B mode actually in use, after any fallback ("disabled" on ranks != 0)."""
        return self._wandb.mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._wandb.mode = value

    @property
    def _run(self) -> Any:
        """The live wandb run or None (tests patch its `log`)."""
        return self._wandb.run

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_NAME

    def log(self, metrics: Mapping[str, Any], *, step: int, epoch: float) -> None:
        """Append one row (flushed and fsynced, so a crash loses at most this line) and send it to W&B."""
        if self._metrics is None:
            return
        clash = {"step", "epoch"} & set(metrics)
        if clash:
            raise ValueError(f"metric names {sorted(clash)} are reserved: pass them as the step/epoch arguments")
        row = {"step": int(step), "epoch": float(epoch), **{k: _plain(v) for k, v in metrics.items()}}
        self._metrics.write(row)
        self._wandb.log(row)

    @property
    def logs_media(self) -> bool:
        """Whether a W&B run is active, i.e. whether media are worth computing (rank 0, W&B not disabled)."""
        return self._wandb.run is not None

    def log_media(self, media: Mapping[str, Any], *, step: int, epoch: float) -> None:
        """Log images and tables to W&B only (metrics.jsonl holds numbers), in one row at `step` / `epoch`.

        Values are plain data: an image `{"image": HxWx3 uint8 array or file path, "caption": str, "boxes": W&B box
        dict}` or a list of them; a table `{"columns": [...], "rows": [[...], ...]}`. A failure warns, never raises.
        """
        self._wandb.log_media(media, step=step, epoch=epoch)

    def finish(self) -> None:
        self._wandb.close()
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):  # 0-d tensors and numpy scalars
        value = value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return float(value)
