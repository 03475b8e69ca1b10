"""Atomic, rotating training checkpoints of plain data, and RNG state capture/restore.

Layout in the run folder: `checkpoint.pth` (latest), `checkpoint_prev.pth` (the one before), and periodic copies
`checkpoint_epochNNN.pth` (NNN = completed epochs). Every file loads with torch.load(..., weights_only=True).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pth"  # the one name both save and resume use
PREV_CHECKPOINT_NAME = "checkpoint_prev.pth"
REQUIRED_KEYS = ("model", "optimizer", "lr_scheduler", "epoch", "global_step", "rng", "config")


def periodic_name(completed_epochs: int) -> str:
    return f"checkpoint_epoch{completed_epochs:03d}.pth"


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; some filesystems do not support opening a folder, which is harmless.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(final: Path) -> Path:
    # Hidden, same folder (os.replace must not cross filesystems), never matched by the resume names.
    return final.with_name(f".{final.name}.tmp{os.getpid()}")


def _write_temp(payload: dict, final: Path) -> Path:
    """torch.save into a temp file beside `final`, flushed and fsynced, so a later os.replace publishes it whole."""
    tmp = _temp_path(final)
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def atomic_save(payload: dict, path: Path) -> None:
    """Write `payload` so that `path` is always either the old file, absent, or the whole new file."""
    os.replace(_write_temp(payload, path), path)
    _fsync_dir(path.parent)


def save_checkpoint(run_dir: str | Path, payload: dict, *, every_epochs: int = 0) -> Path:
    """Write the latest checkpoint, keeping the previous one as checkpoint_prev.pth and periodic copies.

    The new file is complete on disk before the old latest is rotated, so a kill at any point leaves either the
    old latest, or the old latest as prev (and resume falls back to it), never a partial file under a resume name.
    """
    run_dir = Path(run_dir)
    latest, prev = run_dir / CHECKPOINT_NAME, run_dir / PREV_CHECKPOINT_NAME
    tmp = _write_temp(payload, latest)
    if latest.exists():
        os.replace(latest, prev)
    os.replace(tmp, latest)
    _fsync_dir(run_dir)
    completed = int(payload["epoch"]) + 1
    if every_epochs > 0 and completed % every_epochs == 0:
        copy = run_dir / periodic_name(completed)
        copy_tmp = _temp_path(copy)
        shutil.copyfile(latest, copy_tmp)
        with open(copy_tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(copy_tmp, copy)
        _fsync_dir(run_dir)
    return latest


def remove_stale_temps(run_dir: str | Path) -> list[Path]:
    """Delete temp files left by a process killed while writing (they are never read)."""
    stale = sorted(Path(run_dir).glob(".checkpoint*.pth.tmp*"))
    for p in stale:
        log.info("removing %s left by an interrupted checkpoint write", p)
        p.unlink(missing_ok=True)
    return stale


def _read(path: Path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"expected a dict, got {type(ckpt).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"missing keys {missing}")
    return ckpt


def load_latest_checkpoint(run_dir: str | Path) -> tuple[dict, Path] | None:
    """The newest readable training checkpoint of a run folder, or None when the folder has none.

    A corrupt or truncated checkpoint.pth (or one missing because a kill hit between rotation and replace) falls
    back to checkpoint_prev.pth with a warning. If files exist but none is readable this raises instead of silently
    starting over (which would overwrite the run's metrics).
    """
    run_dir = Path(run_dir)
    candidates = [run_dir / CHECKPOINT_NAME, run_dir / PREV_CHECKPOINT_NAME]
    problems = []
    for path in candidates:
        if not path.exists():
            if path.name == CHECKPOINT_NAME and candidates[1].exists():
                problems.append(f"{path} is missing")
            continue
        try:
            ckpt = _read(path)
        except Exception as err:  # torch raises several types for truncated zip archives
            problems.append(f"{path} is unreadable ({type(err).__name__}: {err})")
            continue
        if problems:
            log.warning("%s; resuming from %s instead", "; ".join(problems), path)
        return ckpt, path
    if problems:
        raise RuntimeError(f"no usable checkpoint in {run_dir}: " + "; ".join(problems))
    return None


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """RNG states as plain data (tensors, ints, lists) so that weights_only loading accepts them."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
        "cuda": None,
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_start_weights(model: torch.nn.Module, state_or_path: dict | str, *, source: str, fine_tune: bool) -> dict:
    """Load model weights from our checkpoint or a released one (published layout), checking the class count.

    With `fine_tune` the class head keeps its fresh initialisation (new label space) and every other weight is
    loaded; without it a class-count mismatch is an error naming both counts. Returns the loaded checkpoint dict.
    """
    from conddetr.models.published import load_checkpoint_file, load_published_state_dict

    ckpt = load_checkpoint_file(state_or_path) if isinstance(state_or_path, str) else state_or_path
    state = dict(ckpt["model"] if "model" in ckpt else ckpt)
    own = model.state_dict()
    head = [k for k in own if k.startswith("class_embed.")]
    theirs = state.get("class_embed.weight")
    if theirs is not None and theirs.shape != own["class_embed.weight"].shape and not fine_tune:
        raise ValueError(
            f"class-count mismatch: checkpoint {source} has a class head of {theirs.shape[0]} logits "
            f"(class_embed.weight {tuple(theirs.shape)}) but the model has {own['class_embed.weight'].shape[0]} "
            f"(class_embed.weight {tuple(own['class_embed.weight'].shape)}); set eval.fine_tune=true to re-initialise "
            f"the class head for this dataset, or set model.num_classes to match the checkpoint"
        )
    if fine_tune:
        state.update({k: own[k] for k in head})
        log.info("fine-tuning from %s: class head re-initialised (%s), all other weights loaded", source, head)
    load_published_state_dict(model, state, strict=True)
    return ckpt
