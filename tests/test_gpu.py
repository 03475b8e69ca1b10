"""CUDA: the smoke spec trained 2 epochs with bf16 autocast, SIGTERM'd in epoch 2 and resumed, equals an
uninterrupted run to 1e-4. Skipped, with the reason, where no CUDA device is visible."""

from __future__ import annotations

import math
import signal

import pytest
import torch
from test_resume import finish, start, wait_mid_epoch_2  # tests/ is on sys.path under pytest

from conddetr.engine import CHECKPOINT_NAME
from conddetr.tracking import read_metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible (torch.cuda.is_available())"),
]
GPU = ("device=cuda", "optim.amp=bf16", "optim.epochs=2", "perf.tf32=true")


def test_bf16_cuda_run_resumed_after_sigterm_matches_uninterrupted(tmp_path):
    ref, term = tmp_path / "reference", tmp_path / "sigterm"
    p_ref = start(tmp_path, ref, GPU)
    assert finish(p_ref) == 0, f"see {p_ref.log.name}"  # type: ignore[attr-defined]
    p_term = start(tmp_path, term, GPU)
    wait_mid_epoch_2(p_term, term)
    p_term.send_signal(signal.SIGTERM)
    assert finish(p_term) == 143
    stopped = torch.load(term / CHECKPOINT_NAME, weights_only=True)
    assert stopped["position"] is not None and stopped["epoch"] == 0  # a mid-epoch-2 checkpoint
    assert finish(start(tmp_path, term, GPU)) == 0

    expected, got = read_metrics(ref), read_metrics(term)
    assert [r["step"] for r in got] == [r["step"] for r in expected] and len(expected) > 2
    assert any("val/AP" in r for r in expected)
    for want, have in zip(expected, got, strict=True):
        assert set(want) == set(have)
        for key, value in want.items():
            assert math.isclose(have[key], value, rel_tol=1e-4, abs_tol=1e-4), (want["step"], key, have[key], value)
