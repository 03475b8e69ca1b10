"""Mid-epoch stops: the loop's saved position continues an epoch exactly, and stop signals (plain, submitit)."""

from __future__ import annotations

import copy
import io
import os
import signal

import pytest
import torch
from torch import nn

from conddetr.engine import preempt
from conddetr.engine.loop import StepConfig, TrainingInterrupted, train_one_epoch

STEPS = 7


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, images, mask):
        return {"pred": self.lin(images.flatten(1))}  # [B, 1]


class _Criterion(nn.Module):
    weight_dict = {"loss_a": 1.0, "loss_b": 0.5}

    def forward(self, outputs, targets):
        y = torch.stack([t["y"] for t in targets])  # [B, 1]
        return {"loss_a": ((outputs["pred"] - y) ** 2).mean(), "loss_b": (outputs["pred"] - y).abs().mean()}


def _batches() -> list:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        images = torch.randn(2, 1, 2, 2, generator=g)  # [B, 1, 2, 2]
        targets = [{"y": torch.randn(1, generator=g), "boxes": torch.zeros(1, 4)} for _ in range(2)]
        out.append((images, torch.zeros(2, 2, 2, dtype=torch.bool), targets))
    return out


def _epoch(model, optimizer, batches, *, stop_after=None, position=None, saved=None):
    logged, polls = [], []
    done = int(position["steps_done"]) if position else 0

    def stop_requested() -> bool:  # polled once per step, after its backward: stop after step `stop_after`
        polls.append(1)
        return len(polls) == stop_after

    means, step = train_one_epoch(
        model, _Criterion(), optimizer, batches, device=torch.device("cpu"), epoch=1, global_step=STEPS + done,
        steps_per_epoch=STEPS, cfg=StepConfig("conditional", log_every_steps=3), scaler=None,
        log_fn=lambda m, step, epoch: logged.append((step, epoch, m)), position=position,
        stop_requested=stop_requested,
        save_fn=saved.append if saved is not None else None,
    )  # fmt: skip
    return means, step, logged


@pytest.mark.parametrize("stop_after", [4, STEPS])  # mid-window (log every 3 steps), and the epoch's last step
def test_position_continues_the_epoch_with_identical_logs(stop_after):
    torch.manual_seed(0)
    ref_model = _Toy()
    model = copy.deepcopy(ref_model)
    ref_opt, opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref_model, model))
    ref_means, ref_step, ref_logged = _epoch(ref_model, ref_opt, _batches())

    saved: list[dict] = []
    with pytest.raises(TrainingInterrupted):
        _epoch(model, opt, _batches(), stop_after=stop_after, saved=saved)
    (position,) = saved
    buf = io.BytesIO()
    torch.save(position, buf)
    buf.seek(0)
    position = torch.load(buf, weights_only=True)  # plain data, as in a checkpoint
    assert (position["steps_done"], position["global_step"]) == (stop_after, STEPS + stop_after)
    assert len(position["window"]) == (STEPS + stop_after) % 3 == 2  # logged at the next multiple of 3
    first_logs = [row for row in ref_logged if row[0] <= STEPS + stop_after]
    means, step, logged = _epoch(model, opt, _batches()[stop_after:], position=position)
    assert step == ref_step and means == ref_means
    assert logged == ref_logged[len(first_logs) :]
    torch.testing.assert_close(model.lin.weight, ref_model.lin.weight, rtol=0, atol=0)


@pytest.fixture
def fake_submitit(monkeypatch):
    """SUBMITIT_EXECUTOR set and a USR2 handler that, like submitit's on rank 0, records and exits."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    calls = []

    def handler(signum, frame):
        calls.append(signum)
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, handler)
    yield calls
    signal.signal(signal.SIGUSR2, previous)


def test_submitit_signal_during_training_steps_is_handed_over_after_the_stop(fake_submitit):
    with pytest.raises(SystemExit), preempt.watch() as stop:
        with stop.training():
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop.is_set() and fake_submitit == []  # deferred: the loop still has to save
        raise TrainingInterrupted("saved at the step boundary")
    assert fake_submitit == [signal.SIGUSR2]
    assert signal.getsignal(signal.SIGUSR2).__name__ == "handler"  # submitit's own handler is back


def test_submitit_signal_outside_training_steps_requeues_at_once(fake_submitit):
    with pytest.raises(SystemExit), preempt.watch() as stop:
        os.kill(os.getpid(), signal.SIGUSR2)  # e.g. during evaluation: no step boundary comes soon
    assert fake_submitit == [signal.SIGUSR2] and not stop.is_set()


def test_plain_run_sigterm_sets_the_flag_and_handlers_come_back(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted), preempt.watch() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.is_set()
        raise TrainingInterrupted("stopped")
    assert signal.getsignal(signal.SIGTERM) is before


def test_rank_stopped_by_another_ranks_signal_still_requeues(fake_submitit):
    # The stop reached this rank (rank 0 here) only through the per-step all-reduce: SLURM's USR2 landed on another
    # rank just after this one's poll. Rank 0 must still requeue, or the whole job would fail on TrainingInterrupted.
    with pytest.raises(SystemExit), preempt.watch():
        raise TrainingInterrupted("another rank's signal stopped the step")
    assert fake_submitit == [signal.SIGUSR2]


def test_non_main_rank_waits_for_the_requeue_instead_of_failing_the_job(monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    calls, waits = [], []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))  # submitit, rank > 0
    monkeypatch.setattr(preempt.time, "sleep", waits.append)
    try:
        with pytest.raises(TrainingInterrupted), preempt.watch() as stop:
            with stop.training():
                os.kill(os.getpid(), signal.SIGUSR2)
            raise TrainingInterrupted("saved at the step boundary")
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert calls == [signal.SIGUSR2] and waits == [preempt.NON_MAIN_WAIT_S]
