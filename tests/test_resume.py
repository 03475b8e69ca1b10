"""Exact resume: runs killed (SIGTERM, SIGKILL) during epoch 2 and started again equal an uninterrupted run.

SIGTERM saves a mid-epoch checkpoint at the next step boundary; the SIGKILL'd run has `checkpoint_every_steps`.
Both resume inside epoch 2, not at its start.

Every run is a `python -m conddetr train` subprocess with one intra-op thread, so CPU results are bit-identical.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conddetr.config import load_config
from conddetr.engine import CHECKPOINT_NAME, run
from conddetr.tracking import read_metrics, read_wandb_history

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "experiments" / "smoke_synthetic.yaml"
EPOCHS, STEPS_PER_EPOCH = 3, 8  # 16 train images, batch 2
EVERY_STEPS = 3  # the SIGKILL'd run's checkpoint_every_steps: mid-epoch-2 checkpoints at global steps 9, 12, 15


def overrides(root: Path, run_dir: Path) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"data.synthetic.cache_dir={root / 'cache'}",
        "data.batch_size=2",
        f"optim.epochs={EPOCHS}",
        "optim.lr_backbone=0",  # frozen backbone: smaller checkpoints, faster steps; the transformer still trains
        "optim.lr_drop_epoch=2",
        "checkpoint_every_epochs=100",
        "tracking.wandb_mode=offline",
        "tracking.log_every_steps=1",
    ]


def start(root: Path, run_dir: Path, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    env = dict(os.environ, CONDDETR_NUM_THREADS="1", CONDDETR_NO_TQDM="1", WANDB_SILENT="true")
    env.update({k: str(root / "wandb_home") for k in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR")})
    log = open(root / f"{run_dir.name}.log", "a")  # noqa: SIM115 - closed with the process
    cmd = [sys.executable, "-m", "conddetr", "train", str(SPEC), *overrides(root, run_dir), *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, timeout: float = 240) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.log.close()  # type: ignore[attr-defined]


def wait_mid_epoch_2(proc: subprocess.Popen, run_dir: Path, timeout: float = 240) -> None:
    """Until metrics.jsonl holds step 10: epoch 2 is under way, past the SIGKILL'd run's checkpoint at step 9."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"run exited early with {proc.returncode}; see {proc.log.name}"  # type: ignore
        assert time.monotonic() < deadline, "run never reached epoch 2"
        path = run_dir / "metrics.jsonl"
        if path.exists():
            steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
            if steps and max(steps) >= STEPS_PER_EPOCH + 2:  # step 10
                return
        time.sleep(0.02)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run and two interrupted-then-resumed runs, two processes at a time (2 cores)."""
    root = tmp_path_factory.mktemp("resume")
    ref, term, kill = root / "reference", root / "sigterm", root / "sigkill"
    p_ref, p_term = start(root, ref), start(root, term)
    wait_mid_epoch_2(p_term, term)
    p_term.send_signal(signal.SIGTERM)
    term_code = finish(p_term)
    at_kill = {"sigterm": torch.load(term / CHECKPOINT_NAME, weights_only=True)}
    lines_before = {"sigterm": len(read_metrics(term))}
    every = (f"checkpoint_every_steps={EVERY_STEPS}",)
    p_term2, p_kill = start(root, term), start(root, kill, every)
    wait_mid_epoch_2(p_kill, kill)
    p_kill.send_signal(signal.SIGKILL)
    kill_code = finish(p_kill)
    at_kill["sigkill"] = torch.load(kill / CHECKPOINT_NAME, weights_only=True)
    lines_before["sigkill"] = len(read_metrics(kill))
    p_kill2 = start(root, kill, every)
    codes = {"reference": finish(p_ref), "sigterm2": finish(p_term2), "sigkill2": finish(p_kill2)}
    assert codes == {"reference": 0, "sigterm2": 0, "sigkill2": 0}, f"see the logs in {root}"
    return {
        "root": root,
        "dirs": {"reference": ref, "sigterm": term, "sigkill": kill},
        "at_kill": at_kill,
        "lines_before": lines_before,
        "codes": {"sigterm": term_code, "sigkill": kill_code},
    }


def test_sigterm_stops_gracefully_and_sigkill_dies(runs):
    assert runs["codes"] == {"sigterm": 143, "sigkill": -signal.SIGKILL}


@pytest.mark.parametrize("name", ["sigterm", "sigkill"])
def test_interrupted_run_left_a_mid_epoch_2_checkpoint(runs, name):
    ckpt = runs["at_kill"][name]
    step = ckpt["global_step"]
    assert ckpt["epoch"] == 0 and STEPS_PER_EPOCH < step < 2 * STEPS_PER_EPOCH  # inside epoch 2, past its start
    position = ckpt["position"]
    assert (position["epoch"], position["steps_done"], position["global_step"]) == (1, step - STEPS_PER_EPOCH, step)
    window = position["window"]  # log_every_steps=1: every step is logged at once, the window is empty
    assert window.shape == (0, len(position["names"]) + 1) and position["epoch_sum"].shape == (window.shape[1],)
    if name == "sigterm":  # saved at the step boundary after the signal: nothing logged past it
        assert runs["lines_before"][name] == step + 1  # its steps and epoch 1's line
    else:  # the last periodic checkpoint; the kill came later, so the resume drops lines
        assert step % EVERY_STEPS == 0 and runs["lines_before"][name] > step + 1


@pytest.mark.parametrize("name", ["sigterm", "sigkill"])
def test_resumed_process_continued_inside_epoch_2(runs, name):
    """Fewer optimizer steps than a restart from the epoch boundary (global step 8) would redo."""
    step = runs["at_kill"][name]["global_step"]
    text = (runs["dirs"][name] / "train.log").read_text()
    assert f"at epoch 2 step {step - STEPS_PER_EPOCH} (global step {step};" in text
    assert step > STEPS_PER_EPOCH


@pytest.mark.parametrize("name", ["sigterm", "sigkill"])
def test_resumed_metrics_equal_uninterrupted_run(runs, name):
    ref = read_metrics(runs["dirs"]["reference"])
    got = read_metrics(runs["dirs"][name])
    epoch_rows = [r for r in ref if "train_epoch/loss" in r]
    assert len(epoch_rows) == EPOCHS and all("val/AP" in r and "val/AP50" in r for r in epoch_rows)
    assert len(ref) == EPOCHS * (STEPS_PER_EPOCH + 1)
    assert got == ref  # every step and epoch line, bit for bit (floats compared exactly)


@pytest.mark.parametrize("name", ["sigterm", "sigkill"])
def test_resumed_run_keeps_one_wandb_run_id(runs, name):
    run_dir = runs["dirs"][name]
    final = torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)
    run_id = runs["at_kill"][name]["wandb_run_id"]
    assert run_id and final["wandb_run_id"] == run_id
    segments = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(f"-{run_id}" in p.name for p in segments)
    # A graceful stop closes its W&B segment; a SIGKILL also takes wandb-core's unflushed buffer, and the resumed
    # segment re-sends what the killed one lost from metrics.jsonl (fsynced per line). Either way: the whole run.
    assert read_wandb_history(run_dir) == read_metrics(run_dir)


def test_resume_restores_epoch_step_and_learning_rate(runs):
    ckpt = torch.load(runs["dirs"]["sigterm"] / CHECKPOINT_NAME, weights_only=True)
    assert (ckpt["epoch"], ckpt["global_step"]) == (EPOCHS - 1, EPOCHS * STEPS_PER_EPOCH)
    assert ckpt["lr_scheduler"]["last_epoch"] == EPOCHS
    lrs = {r["step"]: r["train/lr"] for r in read_metrics(runs["dirs"]["sigterm"]) if "train/lr" in r}
    # lr_drop_epoch=2: epochs 1-2 at 1e-4, epoch 3 (run after the resume) at 1e-5
    assert lrs[STEPS_PER_EPOCH + 1] == pytest.approx(1e-4, rel=1e-12)
    assert lrs[2 * STEPS_PER_EPOCH + 1] == pytest.approx(1e-5, rel=1e-12)
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == pytest.approx([1e-5], rel=1e-12)
    assert ckpt["config"]["optim"]["epochs"] == EPOCHS and ckpt["model_kwargs"]["variant"] == "conditional"
    assert ckpt["label_to_category"] and all(k == v for k, v in ckpt["label_to_category"].items())  # category_id


def test_eval_only_of_our_checkpoint_reproduces_the_last_val_metrics(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("CONDDETR_NUM_THREADS", "1")  # the reference run's thread count: same predictions
    threads = torch.get_num_threads()
    ref_dir = runs["dirs"]["reference"]
    cfg = load_config(
        SPEC,
        overrides(runs["root"], tmp_path / "eval")
        + [f"eval.checkpoint={ref_dir / CHECKPOINT_NAME}", "eval.eval_only=true"],
    )
    try:
        metrics = run(cfg)
    finally:
        torch.set_num_threads(threads)
    last = read_metrics(ref_dir)[-1]
    assert metrics == {k: v for k, v in last.items() if k.startswith("val/")}
    assert json.loads((tmp_path / "eval" / "eval_only.json").read_text())["val/AP"] == metrics["val/AP"]
    assert (tmp_path / "eval" / "results" / "eval_only.json").is_file()
