"""Plan runs (one spec or a sweep), then run them in-process, through submitit's DebugExecutor, or on SLURM.

The SLURM job callable only resubmits itself on preemption or timeout; the engine resumes from the run folder.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import submitit

from conddetr.config import config_from_dict, config_to_dict, load_config, load_sweep_runs, run_dir_of
from conddetr.launch_status import ERROR_FILE, LAUNCH_RECORD, START_MARKER, SUBMITIT_DIR  # the files status reads

CLUSTERS = ("local", "debug", "slurm")
SRUN_ARGS = ("--kill-on-bad-exit=1",)  # passed to the srun that starts the tasks (see sbatch_parameters)


@dataclass
class RunPlan:
    name: str  # run name (from the sweep overrides) or the experiment name
    run_dir: Path  # absolute
    overrides: list[str]  # command-line overrides, then the sweep's
    config: dict  # resolved config, plain data (what the job rebuilds and runs)


def plan_runs(spec: str | None, overrides: list[str], sweep: str | None = None) -> tuple[list[RunPlan], str | None]:
    """Resolve every run: its config, overrides and deterministic run folder. Returns (plans, sweep name or None).

    Sweep runs live in `output_dir/<sweep file stem>/<run name>`; a single run in `run_dir` or `output_dir/<name>`.
    """
    if sweep is None:
        if spec is None:
            raise ValueError("give an experiment spec (experiments/*.yaml) or --sweep SWEEP.yaml")
        cfg = load_config(spec, overrides)
        run_dir = run_dir_of(cfg).absolute()
        cfg.run_dir = str(run_dir)
        return [RunPlan(cfg.name, run_dir, list(overrides), config_to_dict(cfg))], None
    base_spec, runs = load_sweep_runs(sweep)
    spec = spec or base_spec
    sweep_name = Path(sweep).stem
    plans = []
    for name, run_overrides in runs:
        # Sweep values come last so a command-line override of the same key cannot collapse the sweep.
        all_overrides = [*overrides, *run_overrides]
        cfg = load_config(spec, all_overrides)
        run_dir = (Path(cfg.output_dir) / sweep_name / name).absolute()
        cfg.run_dir = str(run_dir)
        plans.append(RunPlan(name, run_dir, all_overrides, config_to_dict(cfg)))
    return plans, sweep_name


def _rank() -> int:
    return int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0")))


def write_record(run_dir: Path, **fields) -> None:
    """Merge fields into the run's launch record (atomic replace: `status` may read it at any time)."""
    path = run_dir / LAUNCH_RECORD
    record = json.loads(path.read_text()) if path.is_file() else {}
    record.update(fields)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def set_rendezvous_env() -> None:
    """In a SLURM job: MASTER_ADDR/PORT of a multi-task job (engine.distributed), threads from --cpus-per-task."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return
    from conddetr.engine.distributed import set_slurm_rendezvous

    env = submitit.JobEnvironment()
    if env.num_tasks > 1:
        set_slurm_rendezvous(env.hostnames[0])
    # Same thread count on every (re)start of a run: CPU reductions are then bit-identical across a requeue. From
    # this allocation, not from the submitting shell (sbatch exports its environment).
    os.environ["CONDDETR_NUM_THREADS"] = os.environ.get("SLURM_CPUS_PER_TASK", "1")


class TrainJob(submitit.helpers.Checkpointable):
    """One run: rebuild the config and call `engine.run`. A failure leaves `error.txt` in the run folder."""

    def __init__(self, config: dict) -> None:
        self.config = config

    def __call__(self) -> dict:
        from conddetr.engine import run  # heavy imports (torch, models) happen in the job, not in the launcher
        from conddetr.engine.allocator import tune_malloc

        set_rendezvous_env()
        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            # A requeued job appends to the same logs: this line separates its starts (what `status` reads after).
            print(f"{START_MARKER}: rank {_rank()} on {socket.gethostname()}", file=sys.stderr, flush=True)
        run_dir = Path(self.config["run_dir"])
        main = _rank() == 0
        if main:
            (run_dir / ERROR_FILE).unlink(missing_ok=True)  # a resubmitted run starts clean
            write_record(run_dir, state="RUNNING", started_at=_now())
        try:
            cfg = config_from_dict(self.config, source=f"submitted config of {run_dir}")
            if cfg.perf.tune_malloc:
                tune_malloc()
            metrics = run(cfg)
        except Exception as e:  # not SystemExit: submitit exits that way after a requeue
            if main:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                text = f"{type(e).__name__}: {first}\n\n{traceback.format_exc()}"
                (run_dir / ERROR_FILE).write_text(text)
                write_record(run_dir, state="FAILED", ended_at=_now())
            raise
        if main:
            write_record(run_dir, state="COMPLETED", ended_at=_now())
        return metrics

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        # Only resubmit: the engine finds run_dir/checkpoint.pth and resumes the same run and W&B id by itself.
        # During training steps submitit's USR2 handler (which calls this) is deferred by engine/preempt.py until
        # the loop has saved a mid-epoch checkpoint at a step boundary; this runs after that save.
        return submitit.helpers.DelayedSubmission(self)


def sbatch_parameters(launch: dict, *, name: str) -> dict:
    """submitit SlurmExecutor parameters (sbatch option names) from a config's `launch` section."""
    gpus_per_node = launch["gpus_per_node"]
    params = {
        "job_name": name,
        "nodes": launch["nodes"],
        "ntasks_per_node": tasks_per_node(launch),
        "cpus_per_task": launch["cpus_per_task"],
        "mem": f"{launch['mem_gb']}GB",
        "time": launch["timeout_min"],
        "array_parallelism": launch["array_parallelism"],
    }
    if gpus_per_node > 0:
        params["gpus_per_node"] = gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if launch.get(key):
            params[key] = launch[key]
    if launch.get("extra_sbatch"):
        params["additional_parameters"] = dict(launch["extra_sbatch"])
    # One task dying (killed, out of memory, an exception on one rank) ends the job step at once: the others would
    # otherwise wait in a collective for a peer that is gone, until the process group times out (30 min).
    params["srun_args"] = list(SRUN_ARGS)
    return params


def tasks_per_node(launch: dict) -> int:
    """Processes per node: `launch.tasks_per_node`, else one per GPU, else one (a CPU node)."""
    return launch.get("tasks_per_node") or max(launch["gpus_per_node"], 1)


def sbatch_lines(params: dict, n_runs: int) -> list[str]:
    """The #SBATCH settings submitit writes for these parameters (printed by --dry-run)."""
    flags = {k: v for k, v in params.items() if k not in ("array_parallelism", "additional_parameters", "srun_args")}
    flags["signal"] = "USR2@90"  # submitit's default: USR2 90 s before the time limit -> checkpoint and requeue
    if n_runs > 1:
        flags["array"] = f"0-{n_runs - 1}%{min(n_runs, params['array_parallelism'])}"
    flags.update(params.get("additional_parameters", {}))
    return [f"#SBATCH --{k.replace('_', '-')}={v}" for k, v in flags.items()]


def submit_slurm(plans: list[RunPlan], params: dict, sweep_dir: Path | None) -> list[submitit.Job]:
    """Submit one job (submitit folder: run_dir/submitit), or for a sweep ONE job array.

    submitit gives an array one folder, so a sweep's tasks share `sweep_dir/.submitit/<submission time>`, linked
    from each run folder as `submitit`; a fresh folder per submission keeps job ids that SLURM reuses apart.
    """
    if sweep_dir is None:
        folder = plans[0].run_dir / SUBMITIT_DIR
    else:
        folder = sweep_dir / ".submitit" / dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.SlurmExecutor(folder=folder)
    executor.update_parameters(**params)
    with executor.batch():
        jobs = [executor.submit(TrainJob(p.config)) for p in plans]
    for p, job in zip(plans, jobs, strict=True):
        link = p.run_dir / SUBMITIT_DIR
        if folder != link:
            p.run_dir.mkdir(parents=True, exist_ok=True)
            if link.is_symlink():
                link.unlink()
            if not link.exists():
                link.symlink_to(folder, target_is_directory=True)
        write_record(p.run_dir, cluster="slurm", job_id=job.job_id, submitted_at=_now(), state="PENDING",
                     submitit_folder=str(folder), overrides=p.overrides)  # fmt: skip
    return jobs


def run_debug(plan: RunPlan) -> dict:
    """submitit's DebugExecutor: the job runs in this process when its result is asked for."""
    executor = submitit.DebugExecutor(folder=plan.run_dir / SUBMITIT_DIR)
    job = executor.submit(TrainJob(plan.config))
    write_record(plan.run_dir, cluster="debug", job_id=str(job.job_id), submitted_at=_now(), overrides=plan.overrides)
    return job.result()


def run_local(plan: RunPlan, gpus: int = 1) -> dict | None:
    """In-process for one device; `gpus` > 1 starts that many processes with torch.distributed.run (torchrun)."""
    write_record(plan.run_dir, cluster="local", job_id=f"local-{os.getpid()}", submitted_at=_now(),
                 overrides=plan.overrides)  # fmt: skip
    if gpus <= 1:
        return TrainJob(plan.config)()
    config_file = plan.run_dir / SUBMITIT_DIR / "local_config.json"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(json.dumps(plan.config))
    subprocess.run(torchrun_command(gpus, config_file), check=True)
    return None


def torchrun_command(gpus: int, config_file: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
            "-m", "conddetr.launcher", str(config_file)]  # fmt: skip


if __name__ == "__main__":  # a torchrun worker of `run_local`: RANK/WORLD_SIZE come from torchrun
    TrainJob(json.loads(Path(sys.argv[1]).read_text()))()
