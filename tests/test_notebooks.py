"""Execute the analysis notebooks end to end (jupytext -> nbclient, venv python3 kernel) on tiny inputs."""

from __future__ import annotations

import json
from pathlib import Path

import jupytext
import nbformat
import pytest
import torch
from nbclient import NotebookClient

from conddetr.config import load_config, save_config
from conddetr.tracking import read_wandb_history

REPO = Path(__file__).resolve().parents[1]
SMOKE_SPEC = str(REPO / "experiments" / "smoke_synthetic.yaml")


def execute(name: str, params: dict, tmp_path: Path) -> str:
    """Run analysis/<name>.py as a notebook with `params` injected after its parameters cell; return its text output.

    Any cell error raises nbclient's CellExecutionError, failing the test. The executed .ipynb is kept in tmp_path.
    """
    nb = jupytext.read(REPO / "analysis" / f"{name}.py")
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{key} = {value!r}" for key, value in params.items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    nbformat.write(nb, tmp_path / f"{name}.ipynb")
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def write_run(folder: Path, aps: dict[int, float]) -> str:
    folder.mkdir(parents=True)
    lines = []
    for epoch, ap in aps.items():
        lines.append({"step": 10 * epoch, "epoch": epoch - 0.5, "train/loss": 10.0 / epoch})
        lines.append({"step": 10 * epoch, "epoch": float(epoch), "val/AP": ap, "val/AP50": min(1.0, 2 * ap)})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(folder)


def assert_pngs(folder: Path, names: list[str]):
    for name in names:
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_convergence_notebook_on_run_folders(tmp_path, monkeypatch):
    runs = {
        "Conditional DETR": write_run(tmp_path / "cond", {1: 0.10, 2: 0.30, 3: 0.38, 4: 0.40}),
        "DETR": write_run(tmp_path / "detr", {2: 0.05, 4: 0.10, 6: 0.20, 8: 0.30}),
        "slow": write_run(tmp_path / "slow", {4: 0.10, 8: 0.20}),
    }
    study = tmp_path / "study"
    seed_runs = [
        ("c1", "conditional", 1, {1: 0.2, 2: 0.4}),
        ("c2", "conditional", 2, {1: 0.3, 2: 0.5}),
        ("d1", "detr", 1, {3: 0.1, 6: 0.3}),
        ("d2", "detr", 2, {3: 0.2, 6: 0.25}),
    ]
    for folder, variant, seed, aps in seed_runs:
        write_run(study / folder, aps)
        save_config(load_config(None, [f"model.variant={variant}", f"optim.seed={seed}"]), study / folder)
    out = tmp_path / "figs"
    # The kernel inherits this environment: W&B writes only under tmp_path and reaches no server.
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    params = {"run_dirs": runs, "output_dir": str(out), "wandb_mode": "offline", "wandb_group": "cmp",
              "study_dir": str(study)}  # fmt: skip
    text = execute("convergence", params, tmp_path)
    assert_pngs(out, ["convergence_AP.png", "train_loss.png", "published_ap.png", "convergence_seeds_AP.png"])
    assert "Conditional DETR reaches AP 30.0 in 2 epochs vs 8: 4.00x fewer" in text
    assert "slow never reached AP 30.0" in text
    assert "Training tiny fallback runs" not in text
    assert "Conditional DETR: 2 seeds, final val AP 45.0 +- 7.1 at epoch 2" in text
    assert "seed 1: Conditional DETR reaches AP 30.0 in 1.5 epochs vs 6: 4.00x fewer" in text
    assert "seed 2: Conditional DETR reaches AP 25.0 in 1 epochs vs 6: 6.00x fewer" in text
    assert "W&B report run" in text and "(offline, project conddetr, group cmp)" in text
    # The report run, read back from its offline file: the three figures and the speed-up table.
    (row,) = read_wandb_history(out / "wandb_report", include_media=True)
    figures = {k: v for k, v in row.items() if k.startswith("convergence/") and v["_type"] == "image-file"}
    assert sorted(figures) == [
        "convergence/convergence_AP",
        "convergence/convergence_seeds_AP",
        "convergence/published_ap",
        "convergence/train_loss",
    ]
    pattern = f"wandb/*/files/{row['convergence/speedups']['path']}"
    (table_file,) = {p.resolve() for p in (out / "wandb_report").glob(pattern)}  # latest-run links to the run
    table = json.loads(table_file.read_text())
    speedups = {r[0]: r[6] for r in table["data"]}
    assert speedups["Conditional DETR"] == 4.0 and speedups["slow"] is None
    assert speedups["Conditional DETR DC5-R50"] == 10.0  # the published row: DETR 500 epochs vs 50


@pytest.fixture(scope="module")
def fallback(tmp_path_factory):
    """The convergence notebook pointed at missing run folders: it trains tiny Conditional DETR and DETR runs."""
    tmp = tmp_path_factory.mktemp("fallback")
    tiny = ["optim.epochs=1", "data.synthetic.num_train=4", "data.synthetic.num_val=2"]
    params = {
        "run_dirs": {"Conditional DETR": str(tmp / "nope_cond"), "DETR": str(tmp / "nope_detr")},
        "metric": "AP50",
        "output_dir": str(tmp / "figs"),
        "fallback_spec": SMOKE_SPEC,
        "fallback_root": str(tmp / "runs"),
        "fallback_overrides": [*tiny, f"data.synthetic.cache_dir={tmp / 'synthetic'}"],
    }
    return tmp, execute("convergence", params, tmp)


def test_convergence_notebook_trains_fallback_runs(fallback):
    tmp, text = fallback
    assert "Training tiny fallback runs" in text
    assert_pngs(tmp / "figs", ["convergence_AP50.png", "train_loss.png", "published_ap.png"])
    for run, variant in (("conditional_detr", "conditional"), ("detr", "detr")):
        ckpt = torch.load(tmp / "runs" / run / "checkpoint.pth", map_location="cpu", weights_only=True)
        assert ckpt["model_kwargs"]["variant"] == variant
        assert "1 evaluations, final val AP50" in text


def test_attention_notebook_random_model_warns(tmp_path):
    params = {
        "checkpoint": str(tmp_path / "absent.pth"),
        "spec": SMOKE_SPEC,
        "overrides": ["data.synthetic.num_train=4", "data.synthetic.num_val=2", f"data.synthetic.cache_dir={tmp_path}"],
        "output_dir": str(tmp_path / "figs"),
        "compare_checkpoint": None,  # not the repository's own demo run, whatever runs/ holds
    }
    text = execute("attention_bands", params, tmp_path)
    assert "WARNING: no checkpoint" in text and "bands appear after training" in text
    assert text.count("band score") == 4  # smoke model: 4 heads
    assert "this model: no checkpoint at" in text and "compared model: no checkpoint at None, skipped" in text
    assert_pngs(tmp_path / "figs", ["attention_bands.png"])


def test_attention_notebook_loads_trained_checkpoint(fallback, tmp_path):
    # The DETR variant's query scoring is covered by tests/test_analysis.py; one notebook run keeps the suite fast.
    checkpoint = fallback[0] / "runs" / "conditional_detr" / "checkpoint.pth"
    compare = fallback[0] / "runs" / "detr" / "checkpoint.pth"
    params = {"checkpoint": str(checkpoint), "spec": SMOKE_SPEC, "output_dir": str(tmp_path / "figs"), "layer": 0,
              "compare_checkpoint": str(compare), "summary_images": 2}  # fmt: skip
    text = execute("attention_bands", params, tmp_path)
    assert "WARNING" not in text
    assert f"loaded {checkpoint} (1 epochs trained)" in text
    assert "at decoder layer 0" in text
    assert f"this model (conditional, {checkpoint}): spatial maps:" in text
    assert f"compared model (detr, {compare}): spatial maps:" in text and "band score medians over 2 val images" in text
    assert_pngs(tmp_path / "figs", ["attention_bands.png"])
