"""Two CPU processes (gloo, torchrun) give the first-step loss and gradients of one process with the same batch;
the distributed environment is read from torchrun or SLURM; ranks must agree on the checkpoint they resume from.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conddetr.config import load_config
from conddetr.engine import debug_first_step
from conddetr.engine.distributed import DistEnv, read_dist_env
from conddetr.engine.run import check_same_resume_point

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "experiments" / "smoke_synthetic.yaml"


def common(tmp_path: Path) -> list[str]:
    # dropout 0: the ranks' dropout streams differ (seed + rank); a trainable backbone adds its gradients.
    return [
        f"data.synthetic.cache_dir={tmp_path / 'cache'}",
        "model.dropout=0",
        "optim.lr_backbone=1e-5",
        f"run_dir={tmp_path / 'run'}",
        "tracking.wandb_mode=disabled",
    ]


def test_two_gloo_processes_match_one_process_with_the_global_batch(tmp_path):
    out = tmp_path / "ddp.pth"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        "-m",
        "conddetr",
        "first-step",
        str(SPEC),
        "--out",
        str(out),
        "data.batch_size=2",
        *common(tmp_path),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)
    assert ddp["world_size"] == 2

    loss, grads = debug_first_step(load_config(SPEC, ["data.batch_size=4", *common(tmp_path)]))
    assert any(k.startswith("backbone.") for k in grads) and any(k.startswith("transformer.") for k in grads)
    assert ddp["grads"].keys() == grads.keys()
    torch.testing.assert_close(torch.tensor(ddp["loss"]), torch.tensor(loss), rtol=0, atol=1e-5)
    torch.testing.assert_close(ddp["grads"], grads, rtol=1e-4, atol=1e-5)


def test_dist_env_reads_torchrun_variables(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(key, raising=False)
    assert read_dist_env() == DistEnv()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert read_dist_env() == DistEnv(rank=3, world_size=4, local_rank=1, source="torchrun")


def test_dist_env_reads_submitit_job_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    # The variables a 2-task SLURM job step exports; submitit's SlurmJobEnvironment reads them.
    slurm = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "4321",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NODELIST": "node7",
    }
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    assert read_dist_env() == DistEnv(rank=1, world_size=2, local_rank=1, source="submitit")
    assert os.environ["MASTER_ADDR"] == "node7" and os.environ["MASTER_PORT"] == str(20000 + 4321)
    # sbatch exports the submitting shell's environment: a process group of its own there is not this job's.
    inherited = {"RANK": "5", "WORLD_SIZE": "8", "MASTER_ADDR": "login2", "MASTER_PORT": "29500"}
    for key, value in inherited.items():
        monkeypatch.setenv(key, value)
    assert read_dist_env() == DistEnv(rank=1, world_size=2, local_rank=1, source="submitit")
    assert os.environ["MASTER_ADDR"] == "node7" and os.environ["MASTER_PORT"] == str(20000 + 4321)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # torchrun started inside the job: its variables count
    assert read_dist_env() == DistEnv(rank=5, world_size=8, local_rank=0, source="torchrun")


def test_ranks_that_see_different_checkpoints_fail_alike():
    check_same_resume_point([("checkpoint.pth", 11), ("checkpoint.pth", 11)])
    check_same_resume_point([None, None])  # a fresh start everywhere
    with pytest.raises(RuntimeError, match="rank 0: checkpoint.pth at global step 11; rank 1: none"):
        check_same_resume_point([("checkpoint.pth", 11), None])
    with pytest.raises(RuntimeError, match="rank 1: checkpoint_prev.pth at global step 8"):
        check_same_resume_point([("checkpoint.pth", 11), ("checkpoint_prev.pth", 8)])
