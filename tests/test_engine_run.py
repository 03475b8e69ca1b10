"""engine.run in-process: fine-tuning across class counts, the non-finite loss guard, gradient accumulation."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

import conddetr.models
from conddetr.config import load_config
from conddetr.engine import CHECKPOINT_NAME, NonFiniteLossError, debug_first_step, precision, run
from conddetr.engine.checkpoint import load_latest_checkpoint
from conddetr.engine.setup import model_kwargs_from_config
from conddetr.models import build_model
from conddetr.tracking import read_metrics

SPEC = Path(__file__).resolve().parents[1] / "experiments" / "smoke_synthetic.yaml"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic_cache")


def tiny(cache: Path, run_dir: Path, *extra: str):
    return load_config(
        SPEC,
        [
            f"run_dir={run_dir}",
            f"data.synthetic.cache_dir={cache}",
            "optim.lr_backbone=0",
            "checkpoint_every_epochs=100",
            "tracking.wandb_mode=disabled",
            *extra,
        ],
    )


def coco_checkpoint(path: Path, cfg, num_classes: int) -> dict:
    """A released-style checkpoint ({"model": state_dict}) of the tiny architecture with another class count."""
    torch.manual_seed(123)
    model = build_model(cfg.model.variant, **model_kwargs_from_config(cfg, num_classes))
    state = model.state_dict()
    torch.save({"model": state, "epoch": 49}, path)
    return state


def test_fine_tune_from_91_classes_on_synthetic_and_mismatch_without_fine_tune(cache, tmp_path):
    cfg = tiny(cache, tmp_path / "ft", "optim.epochs=1", "optim.lr=0")  # lr 0: weights stay as loaded
    source = coco_checkpoint(tmp_path / "coco91.pth", cfg, num_classes=91)
    cfg.eval.checkpoint = str(tmp_path / "coco91.pth")
    cfg.eval.fine_tune = True
    metrics = run(cfg)
    assert 0.0 <= metrics["val/AP"] <= 1.0
    ckpt, _ = load_latest_checkpoint(tmp_path / "ft")
    tuned = ckpt["model"]
    assert tuned["class_embed.weight"].shape[0] == 9  # synthetic: category ids up to 8 -> 9 logits
    assert source["class_embed.weight"].shape[0] == 91
    assert tuned.keys() == source.keys()
    torch.testing.assert_close(
        {k: v for k, v in tuned.items() if not k.startswith("class_embed.")},
        {k: v for k, v in source.items() if not k.startswith("class_embed.")},
        rtol=0,
        atol=0,
    )
    # Evaluating (or starting from) the 91-class weights on the 9-logit dataset without fine_tune must fail clearly.
    cfg_eval = tiny(cache, tmp_path / "ev", "eval.eval_only=true", f"eval.checkpoint={tmp_path / 'coco91.pth'}")
    with pytest.raises(
        ValueError,
        match=r"class-count mismatch: checkpoint .*coco91.pth has a class head of 91 "
        r"logits .* but the model has 9",
    ):
        run(cfg_eval)


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_non_finite_loss_stops_with_step_and_terms_and_keeps_last_checkpoint(cache, tmp_path, monkeypatch, where):
    """NaN injected at the 6th criterion call (epoch 2, step 2 with 4 steps per epoch): into loss_bbox's value,
    or only into its gradient (sqrt'(0) * 0 = nan while the value stays finite)."""
    real_build = conddetr.models.build_criterion

    def build_poisoned(*args, **kwargs):
        criterion = real_build(*args, **kwargs)
        forward, calls = criterion.forward, [0]

        def poisoned(outputs, targets, *a, **k):
            losses = forward(outputs, targets, *a, **k)
            calls[0] += 1
            if calls[0] == 6:
                x = losses["loss_bbox"]
                losses["loss_bbox"] = x * float("nan") if where == "loss" else x + torch.sqrt(x * 0) * 0
            return losses

        criterion.forward = poisoned
        return criterion

    monkeypatch.setattr(conddetr.models, "build_criterion", build_poisoned)
    run_dir = tmp_path / "nan"
    bad = r"\['loss', 'loss_bbox'\]; all terms: loss=nan, .*loss_ce=" if where == "loss" else r"\['grad_norm'\]"
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 6 \(epoch 2\): non-finite terms " + bad) as err:
        run(tiny(cache, run_dir, "optim.epochs=3"))
    assert err.value.step == 6 and err.value.epoch == 1
    ckpt, path = load_latest_checkpoint(run_dir)
    assert path.name == CHECKPOINT_NAME and (ckpt["epoch"], ckpt["global_step"]) == (0, 4)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not list(run_dir.glob(".checkpoint*")) and not (run_dir / "checkpoint_prev.pth").exists()
    assert max(r["step"] for r in read_metrics(run_dir)) == 5  # step 6 was never logged


def test_gradient_accumulation_equals_the_big_batch(cache, tmp_path):
    """Two micro-batches of 2 give the loss and gradients of one batch of 4 (same images, dropout 0)."""
    common = ("model.dropout=0", "optim.lr_backbone=1e-5")  # trainable backbone: its gradients are compared too
    big_loss, big = debug_first_step(tiny(cache, tmp_path / "a", *common, "data.batch_size=4"))
    acc_loss, acc = debug_first_step(tiny(cache, tmp_path / "b", *common, "data.batch_size=2", "optim.accum_steps=2"))
    assert any(k.startswith("backbone.") for k in big) and big.keys() == acc.keys()
    torch.testing.assert_close(acc_loss, big_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc, big, rtol=1e-4, atol=1e-5)


def test_fresh_start_drops_stale_metrics_and_a_finished_run_is_not_retrained(cache, tmp_path):
    run_dir = tmp_path / "fresh"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 3, "epoch": 0.75, "train/loss": 1.0}\n')
    first = run(tiny(cache, run_dir, "optim.epochs=1", "eval.every_epochs=1"))
    assert run(tiny(cache, run_dir, "optim.epochs=1")) == first  # already complete: reported, nothing retrained
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 4] and rows[2]["train/loss"] != 1.0
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoint.pth",
        "config.yaml",
        "metrics.jsonl",
        "results",
        "train.log",
    ]
    assert [p.name for p in (run_dir / "results").iterdir()] == ["val_epoch001.json"]


def test_autocast_first_step_is_close_to_float32(cache, tmp_path, monkeypatch):
    common = ("model.dropout=0", "data.batch_size=2")
    ref_loss, ref = debug_first_step(tiny(cache, tmp_path / "fp32", *common))
    # bf16 autocast runs on CPUs with native bf16 kernels; pretend this one has them so the path runs here too.
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)
    for amp in ("bf16", "fp16"):
        loss, grads = debug_first_step(tiny(cache, tmp_path / amp, *common, f"optim.amp={amp}"))
        assert loss != ref_loss  # autocast really ran in low precision
        torch.testing.assert_close(loss, ref_loss, rtol=5e-3, atol=0)
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no native bf16 kernels"):
        loss, _ = debug_first_step(tiny(cache, tmp_path / "bf16_fallback", *common, "optim.amp=bf16"))
    assert loss == ref_loss  # float32: the same step exactly


def test_eval_only_of_a_released_dc5_checkpoint_warns_about_the_batch_size(cache, tmp_path):
    """A released-style file ({"model", "args": Namespace}) evaluates; DC5 trained at 1 image/GPU warns at 4."""
    cfg = tiny(cache, tmp_path / "dc5", "model.backbone=resnet50", "model.dilation=true", "eval.eval_only=true")
    coco_checkpoint(tmp_path / "released.pth", cfg, num_classes=9)
    released = torch.load(tmp_path / "released.pth", weights_only=True)
    torch.save({**released, "args": argparse.Namespace(batch_size=1, dilation=True)}, tmp_path / "released.pth")
    cfg.eval.checkpoint = str(tmp_path / "released.pth")
    with pytest.warns(UserWarning, match="DC5 model trained with 1 image"):
        metrics = run(cfg)
    assert set(metrics) == {f"val/{k}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")} | {
        f"val/{k}" for k in ("AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
    }
