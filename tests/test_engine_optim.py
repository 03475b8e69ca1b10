"""Optimizer groups, the lr schedule, accumulation weights, the progress-bar switch and the NaN error message."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conddetr.engine.loop import NonFiniteLossError, progress_enabled
from conddetr.engine.optim import accumulation_weights, build_lr_scheduler, build_optimizer


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(2, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(2, 1)


def test_two_param_groups_with_backbone_lr_and_weight_decay():
    model = Toy()
    opt = build_optimizer(model, lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4)
    groups = {g["name"]: g for g in opt.param_groups}
    assert [p is q for p, q in zip(groups["backbone"]["params"], model.backbone.parameters(), strict=True)] == [1, 1]
    assert [p is q for p, q in zip(groups["transformer"]["params"], model.head.parameters(), strict=True)] == [1, 1]
    assert (groups["backbone"]["lr"], groups["transformer"]["lr"]) == (1e-5, 1e-4)
    assert all(g["weight_decay"] == 1e-4 for g in opt.param_groups)


def test_step_lr_divides_by_ten_after_lr_drop_epoch():
    opt = build_optimizer(Toy(), lr=1e-4, lr_backbone=1e-5, weight_decay=0)
    sched = build_lr_scheduler(opt, lr_drop_epoch=2)
    lrs = []
    for _ in range(3):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    expected = [[1e-4, 1e-5], [1e-4, 1e-5], [1e-5, 1e-6]]  # [transformer, backbone] per epoch
    torch.testing.assert_close(torch.tensor(lrs, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_accumulation_weights_reproduce_the_big_batch_normalisation(world):
    """Criterion convention: a box-normalised term is S / max(n / world, 1) for n boxes over all ranks."""
    gen = torch.Generator().manual_seed(world)
    for counts in ([3.0, 5.0, 0.0], [1.0, 1.0], [0.0, 0.0, 0.0, 2.0], [40.0, 7.0]):
        sums = torch.rand(len(counts), generator=gen, dtype=torch.float64) * 10  # S_m: summed per-box losses
        micro = [s / max(n / world, 1.0) for s, n in zip(sums.tolist(), counts, strict=True)]
        box_w, mean_w = accumulation_weights(counts, world)
        big = sums.sum().item() / max(sum(counts) / world, 1.0)
        assert sum(w * v for w, v in zip(box_w, micro, strict=True)) == pytest.approx(big, rel=1e-12)
        assert mean_w == 1 / len(counts)
    with pytest.raises(ValueError, match="at least one micro-batch"):
        accumulation_weights([], 1)


def test_progress_bar_switch_names_its_reason(monkeypatch):
    monkeypatch.delenv("CONDDETR_NO_TQDM", raising=False)
    assert progress_enabled(is_main=False) == (False, "not rank 0")
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert progress_enabled(is_main=True) == (True, "stderr is a terminal")
    monkeypatch.setenv("CONDDETR_NO_TQDM", "1")
    assert progress_enabled(is_main=True) == (False, "CONDDETR_NO_TQDM is set")
    monkeypatch.delenv("CONDDETR_NO_TQDM")
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    assert progress_enabled(is_main=True) == (False, "stderr is not a terminal")


def test_non_finite_error_names_step_epoch_and_terms():
    err = NonFiniteLossError(17, 2, {"loss": math.inf, "loss_ce": 0.5, "loss_giou_0": math.nan})
    assert str(err) == (
        "non-finite loss at optimizer step 17 (epoch 3): non-finite terms ['loss', 'loss_giou_0']; "
        "all terms: loss=inf, loss_ce=0.5, loss_giou_0=nan"
    )
