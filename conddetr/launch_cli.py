"""Command line of `launch.py`: run a spec or a sweep (local | debug | slurm), `--dry-run`, and `status DIR`."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from conddetr import launcher
from conddetr.config import ConfigError
from conddetr.launch_status import ACTIVE_STATES, collect_status, format_table

USAGE = """launch.py SPEC [key=value ...] [--cluster local|slurm|debug] [--gpus N] [--sweep SWEEP.yaml] [--dry-run]
       launch.py --sweep SWEEP.yaml [key=value ...] [...]   (the sweep names its base spec)
       launch.py status DIR"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.py", usage=USAGE, description=__doc__)
    p.add_argument("items", nargs="*", metavar="SPEC [key=value ...]", help="experiment spec, then config overrides")
    p.add_argument("--cluster", choices=launcher.CLUSTERS, help="default: slurm when sbatch is on PATH, else local")
    p.add_argument("--gpus", type=int, help="local: processes started with torchrun (default launch.tasks_per_node "
                   "or 1); slurm: launch.gpus_per_node")  # fmt: skip
    p.add_argument("--sweep", help="sweep YAML: one run per override set, one SLURM job array")
    p.add_argument("--dry-run", action="store_true", help="print the runs and sbatch settings, submit nothing")
    p.add_argument("--wait", action="store_true", help="slurm: wait for the jobs, then print their status")
    return p


def pick_cluster(requested: str | None) -> tuple[str, str]:
    if requested:
        return requested, "--cluster"
    if shutil.which("sbatch"):
        return "slurm", "sbatch found on PATH; --cluster local to run here"
    return "local", "no sbatch on PATH"


def split_items(items: list[str]) -> tuple[str | None, list[str]]:
    """First item is the spec unless it is an override (key=value); every other item must be an override."""
    spec = items[0] if items and "=" not in items[0] else None
    overrides = items[1:] if spec is not None else items
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"command line: expected key=value overrides after the spec, got {', '.join(bad)}")
    return spec, overrides


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["status"]:
        if len(argv) != 2:
            print("usage: launch.py status DIR", file=sys.stderr)
            return 2
        try:
            print(format_table(collect_status(argv[1])))
        except FileNotFoundError as e:
            print(f"launch.py: error: {e}", file=sys.stderr)
            return 2
        return 0
    args = build_parser().parse_intermixed_args(argv)  # overrides may follow --options
    try:
        spec, overrides = split_items(args.items)
        cluster, why = pick_cluster(args.cluster)
        if args.gpus is not None and args.gpus < 1:
            raise ConfigError(f"--gpus must be >= 1, got {args.gpus}")
        if cluster == "slurm" and args.gpus is not None:
            overrides = [*overrides, f"launch.gpus_per_node={args.gpus}"]
        plans, sweep_name = launcher.plan_runs(spec, overrides, args.sweep)
        procs = max(local_processes(p, args.gpus) for p in plans)
        if cluster == "debug" and procs > 1:
            raise ConfigError(
                "--cluster debug runs one process in this one; use local or slurm for --gpus > 1 or "
                "launch.tasks_per_node > 1"
            )
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"launch.py: error: {e}", file=sys.stderr)
        return 2
    print(f"cluster: {cluster} ({why})")
    params = None
    if cluster == "slurm":
        launches = {str(p.config["launch"]) for p in plans}
        if len(launches) > 1:
            print("launch.py: error: a sweep is one job array; launch.* must be equal in all its runs", file=sys.stderr)
            return 2
        params = launcher.sbatch_parameters(plans[0].config["launch"], name=sweep_name or plans[0].config["name"])
    describe(plans, sweep_name, cluster, params, procs)
    if args.dry_run:
        return 0
    if cluster == "slurm":
        return submit(plans, params, sweep_name, args.wait)
    return run_here(plans, cluster, args.gpus)


def describe(plans, sweep_name, cluster, params, gpus) -> None:
    if sweep_name:
        print(f"sweep {sweep_name}: {len(plans)} runs" + (" as one job array" if cluster == "slurm" else ""))
    for i, p in enumerate(plans):
        print(f"  [{i}] {p.name}\n      run dir:   {p.run_dir}\n      overrides: {' '.join(p.overrides) or '-'}")
    if cluster == "slurm":
        print("sbatch settings:\n  " + "\n  ".join(launcher.sbatch_lines(params, len(plans))))
        print(f"tasks started with: srun {' '.join(params['srun_args'])}")
    elif cluster == "debug":
        print("submitit DebugExecutor: runs in this process, one run after the other")
    elif gpus > 1:
        cmd = launcher.torchrun_command(gpus, Path("<run dir>/submitit/local_config.json"))
        print("torchrun: " + " ".join(cmd))
    else:
        print("local: runs in this process, one run after the other")


def submit(plans, params, sweep_name, wait: bool) -> int:
    sweep_dir = plans[0].run_dir.parent if sweep_name else None
    jobs = launcher.submit_slurm(plans, params, sweep_dir)
    for p, job in zip(plans, jobs, strict=True):
        print(f"submitted {job.job_id}: {p.run_dir}")
    root = sweep_dir or plans[0].run_dir
    print(f"follow with: python launch.py status {root}")
    if not wait:
        return 0
    for job in jobs:
        job.wait()
    # submitit sees the result file a moment before SLURM's accounting records the end of the job.
    deadline = time.monotonic() + 60
    rows = collect_status(root)
    while any(r.state in ACTIVE_STATES for r in rows) and time.monotonic() < deadline:
        time.sleep(1)
        rows = collect_status(root)
    print(format_table(rows))
    return 0 if all(r.state == "COMPLETED" for r in rows) else 1


def local_processes(plan, gpus: int | None) -> int:
    """Processes of a local run: --gpus, else the spec's launch.tasks_per_node (CPU processes with gloo), else 1."""
    return gpus or plan.config["launch"].get("tasks_per_node") or 1


def run_here(plans, cluster: str, gpus: int | None) -> int:
    failed = []
    for p in plans:
        print(f"== {p.name}: {p.run_dir}", flush=True)
        try:
            if cluster == "debug":
                metrics = launcher.run_debug(p)
            else:
                metrics = launcher.run_local(p, local_processes(p, gpus))
        except Exception as e:
            if len(plans) == 1:
                raise
            print(f"run {p.name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            failed.append(p.name)
            continue
        if metrics:
            print("final: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, int | float)))
    if failed:
        print(f"{len(failed)} of {len(plans)} runs failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
