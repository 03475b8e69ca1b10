"""Checkpoint files: atomic writes, rotation, periodic copies, fallback on corruption, plain-data RNG state."""

from __future__ import annotations

import logging
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conddetr.engine.checkpoint import (
    CHECKPOINT_NAME,
    PREV_CHECKPOINT_NAME,
    capture_rng_state,
    load_latest_checkpoint,
    remove_stale_temps,
    restore_rng_state,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]


def make_payload(epoch: int) -> dict:
    """A small but complete training checkpoint (model, AdamW, StepLR, RNG) after one optimizer step."""
    torch.manual_seed(epoch)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "lr_scheduler": sched.state_dict(),
        "grad_scaler": None,
        "epoch": epoch,
        "global_step": 10 * (epoch + 1),
        "rng": [capture_rng_state(torch.device("cpu"))],
        "config": {"name": "t", "optim": {"lr": 1e-3, "tags": ["a"]}},
        "wandb_run_id": "abc123",
        "label_to_category": {0: 1, 1: 5},
        "model_kwargs": {"variant": "conditional", "num_classes": 2},
    }


def test_save_rotates_and_keeps_periodic_copies(tmp_path):
    for epoch in range(4):
        save_checkpoint(tmp_path, make_payload(epoch), every_epochs=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint.pth", "checkpoint_epoch002.pth", "checkpoint_epoch004.pth", "checkpoint_prev.pth"]
    epochs = {n: torch.load(tmp_path / n, weights_only=True)["epoch"] for n in names}
    assert epochs == {
        "checkpoint.pth": 3,
        "checkpoint_prev.pth": 2,
        "checkpoint_epoch002.pth": 1,
        "checkpoint_epoch004.pth": 3,
    }


def test_checkpoint_is_plain_data_and_round_trips(tmp_path):
    payload = make_payload(1)
    save_checkpoint(tmp_path, payload)
    loaded = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)  # raises on any non-plain object
    torch.testing.assert_close(loaded["model"], payload["model"], rtol=0, atol=0)
    torch.testing.assert_close(loaded["optimizer"]["state"], payload["optimizer"]["state"], rtol=0, atol=0)
    assert loaded["lr_scheduler"] == payload["lr_scheduler"]
    assert loaded["config"] == payload["config"]
    assert loaded["label_to_category"] == {0: 1, 1: 5}
    ckpt, path = load_latest_checkpoint(tmp_path)
    assert path.name == CHECKPOINT_NAME and ckpt["global_step"] == 20


def test_rng_state_restores_every_generator_through_weights_only(tmp_path):
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = capture_rng_state(torch.device("cpu"))
    torch.save(state, tmp_path / "rng.pth")
    expected = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], np.random.randn())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    restore_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True), torch.device("cpu"))
    got = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], np.random.randn())
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2] and got[3] == expected[3]


def test_corrupt_latest_falls_back_to_prev_with_warning(tmp_path, caplog):
    save_checkpoint(tmp_path, make_payload(0))
    save_checkpoint(tmp_path, make_payload(1))
    latest = tmp_path / CHECKPOINT_NAME
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # truncated, as by a full disk
    with caplog.at_level(logging.WARNING, logger="conddetr.engine.checkpoint"):
        ckpt, path = load_latest_checkpoint(tmp_path)
    assert path.name == PREV_CHECKPOINT_NAME and ckpt["epoch"] == 0
    assert "checkpoint.pth" in caplog.text and "unreadable" in caplog.text


def test_missing_latest_after_rotation_falls_back_to_prev(tmp_path, caplog):
    # A kill between "latest -> prev" and "temp -> latest" leaves only prev (and a temp file never read).
    save_checkpoint(tmp_path, make_payload(0))
    (tmp_path / CHECKPOINT_NAME).rename(tmp_path / PREV_CHECKPOINT_NAME)
    (tmp_path / ".checkpoint.pth.tmp999").write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="conddetr.engine.checkpoint"):
        ckpt, path = load_latest_checkpoint(tmp_path)
    assert path.name == PREV_CHECKPOINT_NAME and ckpt["epoch"] == 0
    assert "missing" in caplog.text


def test_unreadable_checkpoint_without_prev_raises_naming_the_file(tmp_path):
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="checkpoint.pth is unreadable"):
        load_latest_checkpoint(tmp_path)
    assert load_latest_checkpoint(tmp_path / "empty") is None


def test_checkpoint_missing_required_keys_is_rejected(tmp_path):
    torch.save({"model": {}}, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(RuntimeError, match=r"missing keys \['optimizer'"):
        load_latest_checkpoint(tmp_path)


def test_process_killed_while_writing_never_leaves_a_resumable_partial_file(tmp_path):
    """SIGKILL a process inside torch.save (a slow writer): resume still takes the previous whole checkpoint."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(REPO / "tests")!r})
        import torch
        import conddetr.engine.checkpoint as ckpt_io
        from test_checkpoint import make_payload

        run_dir = Path(sys.argv[1])
        ckpt_io.save_checkpoint(run_dir, make_payload(0))
        ckpt_io.save_checkpoint(run_dir, make_payload(1))

        def slow_save(obj, f, *args, **kwargs):
            f.write(b"PK\\x03\\x04 half a zip archive")
            f.flush()
            (run_dir / "writing").touch()
            time.sleep(60)

        ckpt_io.torch.save = slow_save
        ckpt_io.save_checkpoint(run_dir, make_payload(2))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "writing").exists():
            assert proc.poll() is None, "writer process exited before reaching the slow save"
            assert time.monotonic() < deadline, "writer never reached the slow save"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    temps = sorted(p.name for p in tmp_path.glob(".checkpoint*"))
    assert len(temps) == 1 and temps[0].startswith(".checkpoint.pth.tmp")
    ckpt, path = load_latest_checkpoint(tmp_path)
    assert path.name == CHECKPOINT_NAME and ckpt["epoch"] == 1
    assert [p.name for p in remove_stale_temps(tmp_path)] == temps
    assert not list(tmp_path.glob(".checkpoint*"))
