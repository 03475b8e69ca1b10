"""`make demo` at toy size: pretrain the backbone, train both models side by side, compare, draw the bands."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conddetr.demo import plan
from conddetr.tracking import read_wandb_runs

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def toy_overrides(tmp: Path) -> list[str]:
    """The demo specs shrunk to seconds: tiny images, counts, model, pretraining; everything under `tmp`."""
    return [
        f"output_dir={tmp / 'runs'}", f"data.synthetic.cache_dir={tmp / 'synthetic'}",
        f"pretrain.cache_dir={tmp / 'bb'}",
        "data.synthetic.image_size=64", "data.synthetic.num_train=8", "data.synthetic.num_val=4",
        "data.synthetic.min_object_size=16", "data.train_scales=[64]", "data.val_scale=64", "data.max_size=107",
        "model.hidden_dim=32", "model.dim_feedforward=32", "model.enc_layers=1", "model.dec_layers=2",
        "model.num_queries=6", "optim.epochs=2", "optim.lr_drop_epoch=1", "pretrain.num_images=8",
        "pretrain.steps=2", "pretrain.images_per_step=4",
    ]  # fmt: skip


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path):
    out = tmp_path / "figures"
    cmd = [sys.executable, "-m", "conddetr", "demo", *toy_overrides(tmp_path), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "backbone: " in text and len(list((tmp_path / "bb").glob("*.pth"))) == 1  # pretrained once, for both
    for name in ("Conditional DETR", "DETR"):
        assert re.search(rf"{name} +epoch 2: val AP", text), text  # progress echoed from each run
        assert re.search(rf"{name} +final val AP", text), text
        assert re.search(rf"{name} +spatial maps: \d/\d heads banded", text), text
    assert re.search(r"Conditional DETR (reaches|never reached) AP", text) or "DETR never reached" in text, text
    for png in ("convergence_AP.png", "train_loss.png", "attention_bands_conditional.png", "attention_bands_detr.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC, png
        assert str(out / png) in text  # the figure paths are printed
    for run in ("demo_synthetic", "demo_synthetic_detr"):
        rows = [json.loads(line) for line in (tmp_path / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows if "val/AP" in r] == [1.0, 2.0]
        (segment,) = read_wandb_runs(tmp_path / "runs" / run / "wandb")  # offline, read back from the run file
        assert segment["group"] == "demo", segment  # both runs in one group: side by side after `wandb sync`
    assert "wandb sync" in text and "demo done in" in text


def test_demo_refuses_an_unfair_pair(tmp_path):
    spec = tmp_path / "other_backbone.yaml"
    spec.write_text(f"base: {REPO / 'experiments' / 'demo_synthetic_detr.yaml'}\npretrain:\n  steps: 7\n")
    with pytest.raises(ValueError, match="start from different backbones"):
        plan([str(REPO / "experiments" / "demo_synthetic.yaml"), str(spec)], [])
    with pytest.raises(ValueError, match="one spec per variant"):
        plan([str(REPO / "experiments" / "demo_synthetic.yaml")] * 2, [])
