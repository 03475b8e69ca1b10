"""Two-task SLURM jobs (two gloo ranks of one job on the test node): preempted inside epoch 2, requeued and resumed
bit-identically; first-step maths of one process with the global batch; a killed rank fails the job at once.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import torch
from slurm_jobs import (
    assert_same_metrics,
    finished,
    job_ended,
    last_step,
    metrics,
    record,
    sacct_states,
    wait,
    wandb_ids,
)

import conddetr
from conddetr import launcher
from conddetr.config import load_config
from conddetr.engine import debug_first_step
from conddetr.launch_cli import main
from conddetr.launch_status import collect_status

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        shutil.which("sbatch") is None,
        reason="no sbatch on PATH: start a cluster with `bash scripts/slurm_cluster.sh up`",
    ),
]

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "experiments" / "smoke_synthetic.yaml")
# Two 1-CPU tasks: each job takes the whole 2-core test node, so the jobs below run one after the other. One image
# per rank: 16 train images give 8 optimizer steps per epoch, time to preempt inside epoch 2.
STEPS_PER_EPOCH = 8
TWO_TASKS = [
    "optim.epochs=2",
    "data.batch_size=1",
    "checkpoint_every_epochs=0",
    "launch.tasks_per_node=2",
    "launch.cpus_per_task=1",
    "launch.mem_gb=3",  # per node: two ranks of ~1.2 GB each
    "tracking.wandb_mode=offline",
]
# The run whose rank 1 is killed: epoch 1 only, a checkpoint every 2 steps (the restart's resume point).
KILLED = [*TWO_TASKS, "optim.epochs=1", "checkpoint_every_steps=2"]
FIRST_STEP = ["model.dropout=0"]  # the ranks' dropout streams differ (seed + rank); the backbone trains (1e-5)
DEAD_RANK_BOUND_S = 30  # a dead rank must end the job in seconds (the job's time limit is an hour)
# The jobs queue behind one another: on 2 idle cores the killed run starts ~70 s after the first job and every job
# takes 10-40 s, but a busy machine stretches that several times; waits fail only after these bounds.
QUEUE_S, JOB_S = 1200, 600


def _task_pid(job_id: str, rank: int) -> int:
    """The process of one task (rank) of a running job, from SLURM's own process list."""
    out = subprocess.run(["scontrol", "listpids", job_id], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines()[1:]:
        pid, _, step, _, global_id = line.split()
        cmdline = Path(f"/proc/{pid}/cmdline")
        if step != "batch" and global_id == str(rank) and cmdline.is_file():
            if b"submitit.core._submit" in cmdline.read_bytes():
                return int(pid)
    raise AssertionError(f"no process of rank {rank} in `scontrol listpids {job_id}`:\n{out}")


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Queue the four jobs in the order they run; preempt the first inside epoch 2, kill a rank of the last.

    After the killed job has failed, its status row is kept and the same run folder is submitted again. Jobs still
    queued or running when the module ends (or its set-up fails) are cancelled: they would hold the node.
    """
    root = tmp_path_factory.mktemp("slurm_ranks")
    submitted: list[str] = []
    try:
        yield _run_jobs(root, submitted)
    finally:
        subprocess.run(["scancel", *submitted], capture_output=True, check=False)  # finished ones: a no-op


def _run_jobs(root: Path, submitted: list[str]) -> dict:
    runs = {name: root / name for name in ("preempt", "reference", "killed")}

    def submit(name: str, overrides: list[str]) -> None:
        assert main([SMOKE, *overrides, f"run_dir={runs[name]}", "--cluster", "slurm"]) == 0
        submitted.append(record(runs[name])["job_id"])

    submit("preempt", TWO_TASKS)
    submit("reference", TWO_TASKS)
    # The first step of the same 2-task layout, through `python -m conddetr first-step` in both tasks.
    out = root / "first_step.pth"
    cfg = load_config(SMOKE, [*TWO_TASKS, *FIRST_STEP])
    executor = submitit.SlurmExecutor(folder=root / "first_step")
    executor.update_parameters(**launcher.sbatch_parameters(cfg.launch, name="first_step"))
    cmd = ["env", "CONDDETR_NUM_THREADS=1", sys.executable, "-m", "conddetr", "first-step", SMOKE, "--out", str(out),
           *TWO_TASKS, *FIRST_STEP]  # fmt: skip
    first_step_job = executor.submit(submitit.helpers.CommandFunction(cmd, cwd=REPO))
    submitted.append(first_step_job.job_id)
    submit("killed", KILLED)

    preempt = runs["preempt"]
    wait(lambda: last_step(preempt) > STEPS_PER_EPOCH, "epoch 2's first step", timeout=JOB_S, poll=0.02)
    assert not finished(preempt), "the job ended before it could be preempted"
    submitit.SlurmJob(folder=preempt / launcher.SUBMITIT_DIR, job_id=record(preempt)["job_id"])._interrupt()

    killed = runs["killed"]
    wait(lambda: last_step(killed) >= 3, "the killed run's third step", timeout=QUEUE_S, poll=0.02)  # queued last
    assert not finished(killed), "the job ended before a rank could be killed"
    job_id = record(killed)["job_id"]
    pid = _task_pid(job_id, rank=1)
    start = time.monotonic()
    subprocess.run(["kill", "-KILL", str(pid)], check=True)
    wait(lambda: finished(killed), "the job of the killed rank to end", poll=0.1)
    dead = {"seconds": time.monotonic() - start, "job_id": job_id, "row": collect_status(killed)[0]}
    dead["resume_step"] = int(torch.load(killed / "checkpoint.pth", weights_only=True)["global_step"])
    submit("killed", KILLED)  # the restart: same run folder, a new job
    return {**runs, "first_step": (first_step_job, out, cfg), "dead": dead}


def test_preempted_two_task_job_requeues_and_resumes_exactly(jobs):
    run_dir, reference = jobs["preempt"], jobs["reference"]
    job_id = record(run_dir)["job_id"]
    wait(lambda: finished(run_dir), "the requeued job to finish", timeout=JOB_S)
    assert sacct_states(job_id) == ["REQUEUED", "COMPLETED"]
    log = (run_dir / "train.log").read_text()
    assert f"rank 0 of 2 (submitit) on cpu; conddetr from {Path(conddetr.__file__).parent}" in log  # this code
    # Both ranks stopped at one step boundary: rank 0 saved once (the collective save), the restart went on there.
    saved = re.findall(r"saved mid-epoch checkpoint: epoch 2 step (\d+) of 8 \(global step (\d+)\)", log)
    resumed = re.findall(r"resuming \S+ at epoch (\d+) step (\d+) \(global step (\d+);", log)
    assert len(saved) == 1 and resumed == [("2", *saved[0])], (saved, resumed)
    assert int(saved[0][1]) > STEPS_PER_EPOCH
    # Rank 1 took the signal, waited for rank 0's requeue and was ended by it: no error of its own.
    rank1 = (run_dir / launcher.SUBMITIT_DIR / f"{job_id}_1_log.err").read_text()
    assert "Caught signal SIGUSR2" in rank1 and "Traceback" not in rank1, rank1[-2000:]
    state = torch.load(run_dir / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert len(state["rng"]) == 2 and state["data"]["world_size"] == 2  # one RNG state per rank
    ids = wandb_ids(run_dir)
    assert len(ids) == 2 and ids[0] == ids[1] == state["wandb_run_id"], ids
    wait(lambda: finished(reference), "the uninterrupted 2-task run to finish", timeout=JOB_S)
    assert sacct_states(record(reference)["job_id"]) == ["COMPLETED"]
    assert_same_metrics(metrics(run_dir), metrics(reference))


def test_two_task_first_step_equals_one_process_with_the_global_batch(jobs):
    job, out, cfg = jobs["first_step"]
    # In this process meanwhile: one rank, both images (the global batch of the 2-task job).
    loss, grads = debug_first_step(load_config(SMOKE, [*TWO_TASKS, *FIRST_STEP, "data.batch_size=2"]))
    wait(lambda: job_ended(job.job_id), "the first-step job", timeout=JOB_S)
    assert sacct_states(job.job_id) == ["COMPLETED"], job.stderr()
    ddp = torch.load(out, weights_only=True)
    assert ddp["world_size"] == 2 and cfg.data.batch_size == 1
    assert any(k.startswith("backbone.") for k in grads) and ddp["grads"].keys() == grads.keys()
    torch.testing.assert_close(torch.tensor(ddp["loss"]), torch.tensor(loss), rtol=0, atol=1e-5)
    torch.testing.assert_close(ddp["grads"], grads, rtol=1e-4, atol=1e-5)


def test_killed_rank_fails_the_job_within_seconds_and_is_named(jobs):
    dead = jobs["dead"]
    print(f"job {dead['job_id']}: FAILED {dead['seconds']:.1f} s after SIGKILL of rank 1")  # shown by pytest -rP
    assert dead["seconds"] < DEAD_RANK_BOUND_S, dead
    row = dead["row"]
    assert (row.job_id, row.state) == (dead["job_id"], "FAILED")
    # srun's own report of the task that died first; rank 0 only failed because its peer was gone.
    assert re.fullmatch(r"rank 1 on \S+: Killed", row.error), row.error
    assert sacct_states(dead["job_id"]) == ["FAILED"]


def test_restart_after_a_dead_rank_resumes_from_the_last_checkpoint(jobs):
    run_dir, dead = jobs["killed"], jobs["dead"]
    job_id = record(run_dir)["job_id"]
    assert job_id != dead["job_id"]
    wait(lambda: finished(run_dir), "the restarted job to finish", timeout=JOB_S)
    assert sacct_states(job_id) == ["COMPLETED"]
    step = dead["resume_step"]
    assert 2 <= step < STEPS_PER_EPOCH and step % 2 == 0  # a periodic mid-epoch checkpoint
    log = (run_dir / "train.log").read_text()
    resumed = re.findall(r"resuming \S+ at epoch (\d+) step (\d+) \(global step (\d+);", log)
    assert resumed == [("1", str(step), str(step))], resumed
    ids = wandb_ids(run_dir)
    assert len(ids) == 2 and ids[0] == ids[1], ids
    # Epoch 1 of the uninterrupted 2-epoch run is this 1-epoch run, row for row.
    wait(lambda: finished(jobs["reference"]), "the uninterrupted 2-task run to finish", timeout=JOB_S)
    want = [r for r in metrics(jobs["reference"]) if r["epoch"] <= 1]
    assert_same_metrics(metrics(run_dir), want)
