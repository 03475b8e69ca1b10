"""launch.py against a real SLURM cluster (`bash scripts/slurm_cluster.sh up`): a sweep as one job array, a failing
task in it, and a preempted job that requeues and ends with the same metrics as an uninterrupted run.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import submitit
import torch
from slurm_jobs import assert_same_metrics, finished, last_step, metrics, record, sacct_states, wait, wandb_ids

from conddetr import launcher
from conddetr.launch_cli import main
from conddetr.launch_status import collect_status

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        shutil.which("sbatch") is None,
        reason="no sbatch on PATH: start a cluster with `bash scripts/slurm_cluster.sh up`",
    ),
]

SMOKE = str(Path(__file__).resolve().parents[1] / "experiments" / "smoke_synthetic.yaml")
# 1 CPU per job: two jobs share the 2-core test node. 3 epochs of 8 steps (16 images, batch 2) leave time to
# preempt in the middle of epoch 2.
STEPS_PER_EPOCH = 8
COMMON = [
    "optim.epochs=3",
    "data.batch_size=2",
    "checkpoint_every_epochs=0",
    "launch.cpus_per_task=1",
    "launch.mem_gb=2",
    "tracking.wandb_mode=offline",
]


@pytest.fixture(scope="module")
def submitted(tmp_path_factory):
    """Submit the run to preempt (it starts at once), then one array: two good runs and a bad data path.

    The first run is preempted here, early in epoch 2 (after its first checkpoint), while the array runs beside it.
    """
    root = tmp_path_factory.mktemp("slurm")
    requeue_dir = root / "requeue"
    assert main([SMOKE, *COMMON, "optim.lr=0.0001", f"run_dir={requeue_dir}", "--cluster", "slurm"]) == 0
    sweep = root / "array.yaml"
    sweep.write_text(
        f"base: {SMOKE}\nruns:\n  - {{optim.lr: 1.0e-4}}\n  - {{optim.lr: 2.0e-4}}\n"
        "  - {data.dataset: coco, data.root: /nonexistent/coco}\n"
    )
    assert main(["--sweep", str(sweep), *COMMON, f"output_dir={root}", "--cluster", "slurm"]) == 0
    sweep_dir = root / "array"
    runs = {name: sweep_dir / name for name in ("lr0.0001", "lr0.0002", "dataset-coco_root-nonexistent-coco")}
    # Preempt once epoch 2 has logged its first step: the signal then lands among its training steps, and the job
    # must save where it is (a mid-epoch checkpoint) before requeueing.
    wait(lambda: (requeue_dir / "checkpoint.pth").is_file(), "the first checkpoint")
    wait(lambda: last_step(requeue_dir) > STEPS_PER_EPOCH, "epoch 2's first step", poll=0.02)
    assert not finished(requeue_dir), "the job ended before it could be preempted: give it more epochs"
    job_id = record(requeue_dir)["job_id"]
    submitit.SlurmJob(folder=requeue_dir / launcher.SUBMITIT_DIR, job_id=job_id)._interrupt()  # SIGTERM, then USR2
    return {"requeue": requeue_dir, "sweep_dir": sweep_dir, **runs}


def test_sweep_is_one_array_and_completes(submitted, capsys):
    good = [submitted["lr0.0001"], submitted["lr0.0002"]]
    bad = submitted["dataset-coco_root-nonexistent-coco"]
    ids = [record(d)["job_id"] for d in [*good, bad]]
    array_id = ids[0].split("_")[0]
    assert ids == [f"{array_id}_0", f"{array_id}_1", f"{array_id}_2"]
    for run_dir in good:
        wait(lambda d=run_dir: finished(d), f"{run_dir.name} to finish")
        for name in ("config.yaml", "metrics.jsonl", "checkpoint.pth"):
            assert (run_dir / name).is_file(), f"{run_dir.name}: {name}"
        assert len(wandb_ids(run_dir)) == 1, f"{run_dir.name}: expected one W&B offline run"
        assert (run_dir / launcher.SUBMITIT_DIR).resolve() == Path(record(run_dir)["submitit_folder"])
    wait(lambda: finished(bad), "the failing task to finish")
    assert main(["status", str(submitted["sweep_dir"])]) == 0
    table = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    for run_dir in good:
        ap = [r["val/AP"] for r in metrics(run_dir) if "val/AP" in r][-1]
        assert table[run_dir.name][1:6] == ["slurm", record(run_dir)["job_id"], "COMPLETED", "3.00", f"{ap:.4f}"]


def test_failed_task_reports_its_error_and_spares_the_array(submitted):
    bad = submitted["dataset-coco_root-nonexistent-coco"]
    wait(lambda: finished(bad), "the failing task to finish")
    rows = {r.run: r for r in collect_status(submitted["sweep_dir"])}
    row = rows[bad.name]
    first_line = (bad / launcher.ERROR_FILE).read_text().splitlines()[0]
    assert row.state == "FAILED" and row.error == first_line
    assert first_line.startswith("DatasetError: ") and "/nonexistent/coco" in first_line
    # The same line is what the job printed last in its submitit log.
    assert first_line.split(": ", 1)[1] in (bad / launcher.SUBMITIT_DIR / f"{row.job_id}_0_log.err").read_text()
    for name in ("lr0.0001", "lr0.0002"):
        wait(lambda n=name: finished(submitted[n]), f"{name} to finish")
    rows = {r.run: r for r in collect_status(submitted["sweep_dir"])}
    assert [rows[n].state for n in ("lr0.0001", "lr0.0002")] == ["COMPLETED", "COMPLETED"]


def test_preempted_job_requeues_and_matches_an_uninterrupted_run(submitted):
    run_dir = submitted["requeue"]
    job_id = record(run_dir)["job_id"]  # preempted by the fixture after its first epoch
    wait(lambda: finished(run_dir), "the requeued job to finish")
    states = sacct_states(job_id)
    assert states == ["REQUEUED", "COMPLETED"], states
    log = (run_dir / "train.log").read_text()
    # USR2 came during epoch 2's steps: the job saved at the next step boundary, and the requeued job went on there.
    saved = re.findall(r"saved mid-epoch checkpoint: epoch 2 step (\d+) of 8 \(global step (\d+)\)", log)
    resumed = re.findall(r"resuming \S+ at epoch (\d+) step (\d+) \(global step (\d+);", log)
    assert len(saved) == 1 and resumed == [("2", *saved[0])], (saved, resumed)
    assert 0 < int(saved[0][0]) and int(saved[0][1]) > STEPS_PER_EPOCH  # past the epoch-boundary checkpoint
    # Same run folder and same W&B run, one offline segment per start of the job.
    ids = wandb_ids(run_dir)
    assert len(ids) == 2 and ids[0] == ids[1], ids
    state = torch.load(run_dir / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert state["wandb_run_id"] == ids[0]

    reference = submitted["lr0.0001"]  # same spec and overrides, never interrupted
    wait(lambda: finished(reference), "the uninterrupted run to finish")
    # Exact: both jobs run with one thread (CONDDETR_NUM_THREADS), so the resumed run is bit-identical.
    assert_same_metrics(metrics(run_dir), metrics(reference))
