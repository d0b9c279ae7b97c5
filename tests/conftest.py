"""Shared pytest fixtures; tests/ is on the import path so tests can share helper modules (workflow_matrix)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real datasets in ``../shared/data`` (see its README); skips the test when absent."""
    path = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"../shared/data not present: {path.resolve()} does not exist (real-data test)")
    return path
