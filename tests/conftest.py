"""Shared test fixtures: the reference data in tests/fixtures and its seed-determined published weights; every test
leaves the process environment as it found it."""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import pytest
import torch

FIXTURES_DIR = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _restore_environ():
    """Code under test may set variables (MASTER_ADDR, CONDDETR_NUM_THREADS, ...) that monkeypatch does not track;
    left behind, they reach every later subprocess and SLURM job of the session (sbatch exports the environment)."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@functools.cache
def _load(name: str) -> dict:
    return torch.load(FIXTURES_DIR / f"{name}.pt", weights_only=True)


@functools.cache
def _weights_module():
    spec = importlib.util.spec_from_file_location("fixture_weights", FIXTURES_DIR / "weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_fixture():
    """load_fixture("parity_conddetr_small") -> the fixture dict (cached; treat it as read-only)."""
    return _load


@pytest.fixture(scope="session")
def make_state_dict():
    """make_state_dict(keys_and_shapes, seed) from tests/fixtures/weights.py (published key layout)."""
    return _weights_module().make_state_dict
