"""Shared pytest fixtures; tests/ is on the import path so tests can share helper modules (workflow_matrix)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the suite runs as pytest-xdist workers (pyproject addopts: -n 2): one thread each, and for every process a
    # test starts, so that two workers on two cores do not oversubscribe them (two threads each under contention
    # made an iteration ten times slower on this project's 2-core machines)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real datasets in ``../shared/data`` (see its README); skips the test when absent."""
    path = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"../shared/data not present: {path.resolve()} does not exist (real-data test)")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks run fastest on one thread (and do not stall when the cores are shared); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
