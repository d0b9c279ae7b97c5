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


# The files that take longest (seconds of one worker on the idle 2-core machine, `pytest --durations=0`,
# 2026-12-07). The suite runs as two workers taking whole files (`--dist loadfile`), in collection order; with the
# alphabetical order the two longest files came last and one worker ran them while the other had nothing left
# (about a minute of the wall time). Collected first, they start at once and the short files fill in after them.
LONGEST_FIRST = (
    "test_distributed.py",
    "test_workflows.py",
    "test_workflow_matrix.py",
    "test_pretrained.py",
    "test_deploy.py",
    "test_gpu_check.py",
    "test_volume_context.py",
    "test_seed_spread.py",
    "test_output_errors.py",
    "test_resume.py",
)


def pytest_collection_modifyitems(items):
    """Stable reordering: the longest files first (LONGEST_FIRST's order), every other file after them in its
    collected order; the tests inside a file keep theirs. Every worker collects the same order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_configure(config):
    """One empty MLflow store per test session, migrated once by this MLflow version (made by the first pytest
    process; the xdist workers and every process a test starts inherit the variable): the suite's runs start their
    SQLite stores as copies of it instead of running MLflow's migrations again, about 3 s each
    (bundle/handlers/tracking.py). Real stores either way."""
    import tempfile

    from bundle.handlers.tracking import TEMPLATES_ENV, make_sqlite_template

    if not os.environ.get(TEMPLATES_ENV):
        folder = tempfile.mkdtemp(prefix="mlflow_templates_")
        make_sqlite_template(folder)
        os.environ[TEMPLATES_ENV] = config._mlflow_templates = folder


def pytest_unconfigure(config):
    import shutil

    folder = getattr(config, "_mlflow_templates", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
