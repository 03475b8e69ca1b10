"""launch.py without SLURM: --dry-run on every spec, run planning, sbatch settings, local/debug runs, `status`."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conddetr import launcher
from conddetr.launch_cli import main
from conddetr.launch_status import collect_status, format_table

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "experiments").glob("*.yaml"))
SWEEPS = sorted((ROOT / "experiments" / "sweeps").glob("*.yaml"))
SMOKE = str(ROOT / "experiments" / "smoke_synthetic.yaml")


def test_experiments_exist():
    assert any(p.name == "smoke_synthetic.yaml" for p in SPECS) and SWEEPS


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_dry_run_every_spec(spec, tmp_path, capsys):
    # COCO specs need data.root (where COCO lives); the dry run never looks at it.
    rc = main([str(spec), "data.root=/datasets/coco", f"output_dir={tmp_path}", "--cluster", "slurm", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0, out
    name = spec.stem
    assert f"run dir:   {tmp_path / name}" in out
    assert f"#SBATCH --job-name={name}" in out
    assert "#SBATCH --signal=USR2@90" in out
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing submitted


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.stem)
def test_dry_run_every_sweep(sweep, tmp_path, capsys):
    plans, sweep_name = launcher.plan_runs(None, ["data.root=/datasets/coco", f"output_dir={tmp_path}"], str(sweep))
    rc = main(
        ["--sweep", str(sweep), "data.root=/datasets/coco", f"output_dir={tmp_path}", "--cluster=slurm", "--dry-run"]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert sweep_name == sweep.stem and len(plans) >= 2
    assert f"sweep {sweep.stem}: {len(plans)} runs as one job array" in out
    assert f"#SBATCH --array=0-{len(plans) - 1}%{len(plans)}" in out
    for p in plans:
        assert f"run dir:   {tmp_path / sweep.stem / p.name}" in out
    assert list(tmp_path.iterdir()) == []


def test_dry_run_script_picks_a_cluster():
    out = subprocess.run(
        [sys.executable, "launch.py", "experiments/smoke_synthetic.yaml", "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    expected = "cluster: slurm (sbatch found" if shutil.which("sbatch") else "cluster: local (no sbatch on PATH)"
    assert expected in out


def test_dry_run_local_multi_gpu_prints_torchrun(capsys):
    assert main([SMOKE, "--cluster", "local", "--gpus", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "torch.distributed.run --standalone --nproc-per-node=2 -m conddetr.launcher" in out


def test_sweep_plan_is_deterministic(tmp_path):
    sweep = str(ROOT / "experiments" / "sweeps" / "smoke_lr.yaml")
    plans, name = launcher.plan_runs(None, [f"output_dir={tmp_path}", "optim.lr=0.5"], sweep)
    again, _ = launcher.plan_runs(None, [f"output_dir={tmp_path}", "optim.lr=0.5"], sweep)
    assert name == "smoke_lr"
    assert [p.name for p in plans] == ["lr0.0001", "lr0.0002"]
    assert [p.run_dir for p in plans] == [tmp_path / "smoke_lr" / "lr0.0001", tmp_path / "smoke_lr" / "lr0.0002"]
    # The sweep's value wins over a command-line override of the same key.
    assert [p.config["optim"]["lr"] for p in plans] == [1e-4, 2e-4]
    assert [p.config["run_dir"] for p in plans] == [str(p.run_dir) for p in plans]
    assert [p.config for p in plans] == [p.config for p in again]


def test_sbatch_parameters_from_launch_section():
    launch = {
        "partition": "gpu", "account": "vision", "qos": None, "nodes": 2, "gpus_per_node": 8, "cpus_per_task": 10,
        "mem_gb": 240, "timeout_min": 2880, "constraint": "volta32gb", "array_parallelism": 4,
        "extra_sbatch": {"exclude": "node7"},
    }  # fmt: skip
    params = launcher.sbatch_parameters(launch, name="conddetr_r50")
    assert params == {
        "job_name": "conddetr_r50", "nodes": 2, "ntasks_per_node": 8, "cpus_per_task": 10, "mem": "240GB",
        "time": 2880, "array_parallelism": 4, "gpus_per_node": 8, "partition": "gpu", "account": "vision",
        "constraint": "volta32gb", "additional_parameters": {"exclude": "node7"},
        "srun_args": ["--kill-on-bad-exit=1"],  # a dead task ends the step instead of leaving peers in a collective
    }  # fmt: skip
    lines = launcher.sbatch_lines(params, n_runs=6)
    assert "#SBATCH --array=0-5%4" in lines and "#SBATCH --exclude=node7" in lines
    assert "#SBATCH --gpus-per-node=8" in lines and "#SBATCH --ntasks-per-node=8" in lines
    cpu = launcher.sbatch_parameters({**launch, "gpus_per_node": 0, "extra_sbatch": {}}, name="x")
    assert cpu["ntasks_per_node"] == 1 and "gpus_per_node" not in cpu and "additional_parameters" not in cpu
    cpu2 = launcher.sbatch_parameters({**launch, "gpus_per_node": 0, "tasks_per_node": 2}, name="x")
    assert cpu2["ntasks_per_node"] == 2 and "gpus_per_node" not in cpu2


def test_tasks_per_node_reaches_sbatch_and_local_runs(capsys):
    assert main([SMOKE, "launch.tasks_per_node=2", "launch.cpus_per_task=1", "--cluster", "slurm", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --ntasks-per-node=2" in out and "gpus-per-node" not in out
    assert "srun --kill-on-bad-exit=1" in out
    assert main([SMOKE, "launch.tasks_per_node=2", "--cluster", "local", "--dry-run"]) == 0
    assert "--nproc-per-node=2" in capsys.readouterr().out  # gloo processes through torchrun
    assert main([SMOKE, "launch.tasks_per_node=2", "--cluster", "debug", "--dry-run"]) == 2
    assert "launch.tasks_per_node" in capsys.readouterr().err
    # More processes than GPUs: each process takes the GPU of its local rank, so this cannot run.
    assert main([SMOKE, "launch.gpus_per_node=2", "launch.tasks_per_node=4", "--dry-run", "--cluster", "slurm"]) == 2
    err = capsys.readouterr().err
    assert "launch.tasks_per_node=4" in err and "launch.gpus_per_node=2" in err


def test_launch_overrides_reach_sbatch(capsys):
    args = [SMOKE, "launch.partition=long", "launch.mem_gb=3", "--cluster", "slurm", "--gpus", "2", "--dry-run"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --partition=long" in out and "#SBATCH --mem=3GB" in out
    assert "#SBATCH --gpus-per-node=2" in out and "#SBATCH --ntasks-per-node=2" in out


def test_cli_errors_name_the_culprit(tmp_path, capsys):
    assert main([SMOKE, "optim.lrr=1", "--dry-run", "--cluster", "local"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert main([SMOKE, "oops", "--dry-run"]) == 2
    assert "oops" in capsys.readouterr().err
    assert main(["--dry-run"]) == 2
    assert "--sweep" in capsys.readouterr().err
    assert main(["status", str(tmp_path / "missing")]) == 2
    assert "missing is not a folder" in capsys.readouterr().err


def test_rendezvous_env_from_slurm(monkeypatch):
    for key in ("MASTER_ADDR", "MASTER_PORT", "CONDDETR_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    env = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[3-4]",
           "SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_CPUS_PER_TASK": "10"}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    launcher.set_rendezvous_env()
    import os

    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("gpu3", str(20000 + 123456 % 20000))
    assert os.environ["CONDDETR_NUM_THREADS"] == "10"


def test_train_job_failure_writes_error_and_checkpoint_resubmits(tmp_path):
    plans, _ = launcher.plan_runs(SMOKE, [f"run_dir={tmp_path / 'bad'}", "data.dataset=coco", "data.root=/no/coco"])
    job = launcher.TrainJob(plans[0].config)
    with pytest.raises(Exception, match="/no/coco"):
        job()
    error = (tmp_path / "bad" / launcher.ERROR_FILE).read_text().splitlines()
    assert error[0].split(":")[0].endswith("Error") and "/no/coco" in error[0]
    assert json.loads((tmp_path / "bad" / launcher.LAUNCH_RECORD).read_text())["state"] == "FAILED"
    delayed = job.checkpoint()
    again = pickle.loads(pickle.dumps(delayed.function))
    assert isinstance(again, launcher.TrainJob) and again.config == plans[0].config
    assert delayed.args == () and delayed.kwargs == {}


def _check_completed_run(run_dir: Path, cluster: str, epochs: int) -> list[dict]:
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pth", "launch.json"):
        assert (run_dir / name).is_file(), name
    record = json.loads((run_dir / "launch.json").read_text())
    assert (record["cluster"], record["state"]) == (cluster, "COMPLETED")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/AP" in r]
    assert [r["epoch"] for r in val] == [float(e) for e in range(1, epochs + 1)]
    (status,) = collect_status(run_dir)
    assert (status.cluster, status.state, status.epoch, status.val_ap) == (
        cluster,
        "COMPLETED",
        epochs,
        val[-1]["val/AP"],
    )
    return rows


SMALL = ["optim.epochs=1", "checkpoint_every_epochs=0"]


def test_local_cluster_runs_smoke_spec(tmp_path, capsys):
    assert main([SMOKE, f"output_dir={tmp_path}", *SMALL, "--cluster", "local"]) == 0
    assert "cluster: local (--cluster)" in capsys.readouterr().out
    _check_completed_run(tmp_path / "smoke_synthetic", "local", epochs=1)


def test_debug_cluster_runs_smoke_spec(tmp_path):
    assert main([SMOKE, f"run_dir={tmp_path / 'dbg'}", *SMALL, "--cluster", "debug"]) == 0
    _check_completed_run(tmp_path / "dbg", "debug", epochs=1)
    assert (tmp_path / "dbg" / launcher.SUBMITIT_DIR).is_dir()


def test_status_table_from_run_folders(tmp_path, capsys):
    done, failed, crashed = tmp_path / "sweep" / "a", tmp_path / "sweep" / "b", tmp_path / "c"
    for d in (done, failed, crashed / launcher.SUBMITIT_DIR, done / "wandb" / "nested"):
        d.mkdir(parents=True)
    (done / "wandb" / "nested" / "config.yaml").write_text("")  # inside wandb/: not a run folder
    launcher.write_record(done, cluster="local", job_id="local-1", state="COMPLETED")
    rows = [{"step": 2, "epoch": 0.5, "train/loss": 3.0}, {"step": 4, "epoch": 1.0, "val/AP": 0.125},
            {"step": 8, "epoch": 2.0, "val/AP": 0.25}]  # fmt: skip
    (done / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "ep')
    launcher.write_record(failed, cluster="debug", job_id="77", state="FAILED")
    (failed / "config.yaml").write_text("")
    (failed / launcher.ERROR_FILE).write_text("FileNotFoundError: no such file: /x\n\nTraceback ...\n")
    # A SLURM job unknown to sacct (or no sacct here): the job's own record gives the state.
    launcher.write_record(crashed, cluster="slurm", job_id="987654_3", state="FAILED",
                          submitit_folder=str(crashed / launcher.SUBMITIT_DIR))  # fmt: skip
    log = "Traceback (most recent call last):\n  File x\nRuntimeError: CUDA out of memory\nsrun: error: task 0\n"
    (crashed / launcher.SUBMITIT_DIR / "987654_3_0_log.err").write_text(log)
    (crashed / launcher.SUBMITIT_DIR / "987654_31_0_log.err").write_text("ValueError: another job\n")
    got = [(s.run, s.cluster, s.job_id, s.state, s.epoch, s.val_ap, s.error) for s in collect_status(tmp_path)]
    assert got == [
        ("c", "slurm", "987654_3", "FAILED", None, None, "RuntimeError: CUDA out of memory"),
        ("sweep/a", "local", "local-1", "COMPLETED", 2.0, 0.25, ""),
        ("sweep/b", "debug", "77", "FAILED", None, None, "FileNotFoundError: no such file: /x"),
    ]
    assert main(["status", str(tmp_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["RUN", "CLUSTER", "JOB", "STATE", "EPOCH", "VAL", "AP", "ERROR"]
    assert table[2].split() == ["sweep/a", "local", "local-1", "COMPLETED", "2.00", "0.2500"]
    assert table == format_table(collect_status(tmp_path)).splitlines()


def test_metrics_values_survive_the_status_round_trip(tmp_path):
    # Whole-tensor check that status reads the latest AP and furthest epoch, not the first ones.
    run = tmp_path / "r"
    run.mkdir()
    aps = torch.tensor([0.01, 0.2, 0.15])
    lines = [json.dumps({"step": i, "epoch": float(i + 1), "val/AP": float(a)}) for i, a in enumerate(aps)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    launcher.write_record(run, cluster="local", job_id="local-2", state="RUNNING")
    (s,) = collect_status(run)
    torch.testing.assert_close(torch.tensor([s.epoch, s.val_ap]), torch.tensor([3.0, float(aps[-1])]))


def test_status_names_the_rank_that_died_first(tmp_path):
    """A 2-task job: rank 1 SIGKILLed, then rank 0 failed in a collective; an earlier start left its own lines.

    The job id is one no test cluster gives out (the record's own state counts, not sacct's)."""
    run = tmp_path / "r"
    logs = run / launcher.SUBMITIT_DIR
    logs.mkdir(parents=True)
    launcher.write_record(run, cluster="slurm", job_id="987655_1", state="FAILED", submitit_folder=str(logs))
    earlier = "srun: error: vm: task 0: Exited with exit code 255\nsrun: error: vm: task 1: Killed\n"  # the requeue
    rank0 = "[rank0]: RuntimeError: [gloo] Read error: Connection reset by peer\n"
    srun = "srun: error: vm: task 1: Killed\nsrun: error: vm: task 0: Exited with exit code 1\n"
    start = f"{launcher.START_MARKER}: rank 0 on vm\n"
    (logs / "987655_1_0_log.err").write_text(start + earlier + start + rank0 + srun)
    (logs / "987655_1_1_log.err").write_text(f"{launcher.START_MARKER}: rank 1 on vm\n")
    (run / launcher.ERROR_FILE).write_text("RuntimeError: [gloo] Read error: Connection reset by peer\n")
    (row,) = collect_status(run)
    assert row.error == "rank 1 on vm: Killed"
    # A rank other than 0 raised: its own exception line, from its own log.
    (logs / "987655_1_0_log.err").write_text(start + "srun: error: vm: task 1: Exited with exit code 1\n")
    (logs / "987655_1_1_log.err").write_text("Traceback (most recent call last):\nOSError: image 7 is truncated\n")
    (row,) = collect_status(run)
    assert row.error == "rank 1 on vm: OSError: image 7 is truncated"
    # Every rank failed alike (or only rank 0): rank 0's error.txt says why.
    (logs / "987655_1_0_log.err").write_text(start + "srun: error: vm: tasks 0-1: Exited with exit code 1\n")
    (run / launcher.ERROR_FILE).write_text("DatasetError: no train images\n")
    (row,) = collect_status(run)
    assert row.error == "DatasetError: no train images"
    (run / launcher.ERROR_FILE).unlink()
    (row,) = collect_status(run)
    assert row.error == "ranks 0-1 on vm: Exited with exit code 1"
