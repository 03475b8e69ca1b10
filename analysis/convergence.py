# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # DETR vs Conditional DETR: training convergence
#
# The paper's claim: Conditional DETR reaches DETR's AP in far fewer epochs (6.7x for R50/R101, 10x for DC5).
# This notebook reads the `metrics.jsonl` of run folders, plots val AP per epoch and the training loss, and computes
# how many times fewer epochs each run needs to reach the AP the baseline reaches at the end of its schedule.
# A run that never reaches that AP gets no speedup (nothing is extrapolated).
#
# Run it with `.venv/bin/python analysis/convergence.py`, or convert it with
# `.venv/bin/jupytext --to ipynb analysis/convergence.py` and open it in Jupyter.

# %%
import os
import sys
from pathlib import Path

import conddetr
from conddetr.analysis import convergence

# %% tags=["parameters"]
run_dirs = {"Conditional DETR": "runs/demo_synthetic", "DETR": "runs/demo_synthetic_detr"}  # name -> run folder
baseline = "DETR"  # the run whose final AP is the target
target_ap = None  # None: the baseline's final AP (a fraction, e.g. 0.42); or a fixed target
metric = "AP"  # any val/<metric> the runs logged: AP, AP50, AP75, APs, ...
output_dir = "runs/analysis"  # PNGs go here (runs/ is git-ignored)
# Used only when a run folder above has no metrics.jsonl: tiny runs are trained so the notebook always runs.
fallback_spec = "experiments/smoke_synthetic.yaml"
fallback_root = "runs/analysis_fallback"
fallback_overrides = []  # extra key=value overrides for both fallback runs (e.g. "optim.epochs=3")
# The DETR fallback changes what demo_synthetic_detr.yaml changes: the variant and DETR's class loss / matcher weights.
detr_overrides = ["model.variant=detr", "loss.set_cost_class=1", "loss.cls_loss_coef=1", "loss.eos_coef=0.1"]
study_dir = None  # a sweep's output folder (e.g. "runs/convergence_study"): the same comparison over its seeds
wandb_mode = None  # "offline" | "online": also log the figures and speed-up table to a W&B report run
wandb_project = None  # None: the compared runs' W&B project when they share one, else "conddetr"
wandb_group = None  # None: the compared runs' W&B group when they share one (e.g. a sweep's runs)

# %%
# Relative paths (here and inside the configs: run folders, the synthetic data cache) mean the same as for
# launch.py run from the repository root, wherever this notebook is executed from.
os.chdir(Path(conddetr.__file__).resolve().parents[1])
if "ipykernel" not in sys.modules and "--wandb" in sys.argv:  # as a script: --wandb [online|offline]
    after = sys.argv[sys.argv.index("--wandb") + 1 :]
    wandb_mode = after[0] if after and after[0] in ("online", "offline") else "online"
out = Path(output_dir)
out.mkdir(parents=True, exist_ok=True)
folders = {name: Path(path) for name, path in run_dirs.items()}
if baseline not in folders:
    raise KeyError(f"baseline {baseline!r} is not one of run_dirs {sorted(folders)}")

# %%
missing = [name for name, folder in folders.items() if not (folder / convergence.METRICS_FILE).is_file()]
if missing:
    from conddetr.config import load_config
    from conddetr.engine import run as train

    print(
        f"No metrics.jsonl for {missing} in {[str(folders[n]) for n in missing]}.\n"
        f"Training tiny fallback runs from {fallback_spec} under {fallback_root} instead: their curves show that the "
        "pipeline works, not the paper's result (train the demo specs for that)."
    )
    for name in missing:
        folders[name] = Path(fallback_root) / name.lower().replace(" ", "_")
        if (folders[name] / convergence.METRICS_FILE).is_file():
            continue  # trained by an earlier execution of this notebook
        variant = detr_overrides if name == baseline else []
        overrides = [*variant, *fallback_overrides, f"run_dir={folders[name]}", "tracking.wandb_mode=disabled"]
        train(load_config(fallback_spec, overrides))

runs = convergence.load_runs(folders)
for run in runs:
    ap = run.ap(metric)
    print(f"{run.name}: {len(ap)} evaluations, final val {metric} {100 * ap.final:.2f} at epoch {ap.epochs[-1]:g}")

# %% [markdown]
# ## Convergence speedup
# How many times fewer epochs each run needs to reach the baseline's target AP.

# %%
base = next(r for r in runs if r.name == baseline)
target = base.ap(metric).final if target_ap is None else target_ap
speedups = {}
for run in runs:
    if run is not base:
        speedups[run.name] = convergence.convergence_speedup(base, run, target_ap, metric)
        print(speedups[run.name].describe(base.name, run.name))
# Published COCO figures: DETR's 500 epochs vs the listed 50-epoch Conditional DETR models. None: 50 epochs fall short
# of DETR's 500-epoch AP (the paper's 6.7x for R50/R101 uses a 75-epoch Conditional DETR schedule, not listed).
for backbone, ratio in convergence.published_speedups().items():
    print(f"published {backbone}: " + (f"{ratio:g}x fewer epochs" if ratio else "not reached within 50 epochs"))


# %%
def save(fig, name):
    fig.savefig(out / name, dpi=120)
    if "ipykernel" in sys.modules:  # inline in Jupyter; plain `python` only writes the file
        from IPython.display import Image, display

        display(Image(filename=out / name))


save(convergence.plot_ap_curves(runs, metric=metric, target=target), f"convergence_{metric}.png")
save(convergence.plot_train_loss(runs), "train_loss.png")
save(convergence.plot_published(), "published_ap.png")
print("figures written to", out)


# %% [markdown]
# ## Over seeds
# With `study_dir` set to a sweep's output folder (experiments/sweeps/convergence_study.yaml: seeds x models, DETR on a
# 3x longer schedule), each model's val AP is averaged over seeds (band: +-1 standard deviation) and the speed-up is
# computed per seed: epochs DETR needs for its own final AP over the epochs Conditional DETR needs for it.

# %%
if study_dir is not None:
    from conddetr.analysis import seeds

    study = seeds.load_study(study_dir)
    labels = {"conditional": "Conditional DETR", "detr": "DETR"}
    groups = {labels[v]: list(runs.values()) for v, runs in sorted(study.items())}
    for name, group in groups.items():
        stats = seeds.aggregate(group, metric)
        print(f"{name}: {stats.seeds} seeds, final val {metric} {100 * stats.mean[-1]:.1f} +- "
              f"{100 * stats.std[-1]:.1f} at epoch {stats.epochs[-1]:g}")  # fmt: skip
    if {"conditional", "detr"} <= set(study):
        per_seed = seeds.speedups_per_seed(study["detr"], study["conditional"], metric)
        for seed, speedup in per_seed.items():
            print(f"seed {seed}: " + speedup.describe("DETR", "Conditional DETR"))
    save(seeds.plot_seed_curves(groups, metric=metric), f"convergence_seeds_{metric}.png")


# %% [markdown]
# ## W&B report (optional)
# With `wandb_mode` set (`--wandb` as a script), the figures and the speed-up table go to one W&B run, tagged
# "report", in the group the compared runs share, so the comparison sits next to their curves.

# %%
if wandb_mode:
    from conddetr.analysis import report

    shared = report.shared_tracking(folders.values())
    names = [f"convergence_{metric}.png", "train_loss.png", "published_ap.png"]
    names += [f"convergence_seeds_{metric}.png"] if study_dir is not None else []
    figures = {f"convergence/{name.removesuffix('.png')}": out / name for name in names}
    tables = {"convergence/speedups": report.speedup_table(speedups, baseline)}
    project, group = wandb_project or shared["project"], wandb_group or shared["group"]
    run_id = report.log_report(out / "wandb_report", figures, tables, mode=wandb_mode, project=project, group=group)
    where = f"{wandb_mode}, project {project or 'conddetr'}, group {group}"
    print(f"W&B report run {run_id} ({where}) written under {out / 'wandb_report'}")
