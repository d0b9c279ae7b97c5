"""Security review checks (docs/security.md): weights-only checkpoint loading, the LIDC unpickler's allow-list."""

import ast
import inspect
import os
import pickle
from pathlib import Path

import pytest
from monai.handlers import CheckpointLoader

from bundle.data.errors import DataFormatError
from bundle.data.lidc import read_lidc_pickle

REPO = Path(__file__).resolve().parents[1]


def _torch_load_calls(path: Path) -> list[tuple[int, bool]]:
    """(line, passes weights_only=True) for every ``torch.load(...)`` call in a Python file."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "load"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch"
        ):
            safe = any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in node.keywords
            )
            calls.append((node.lineno, safe))
    return calls


def test_every_checkpoint_is_loaded_weights_only():
    files = [p for folder in ("bundle", "tools", "apps", "tests") for p in (REPO / folder).rglob("*.py")]
    calls = {f"{p.relative_to(REPO)}:{line}": safe for p in files for line, safe in _torch_load_calls(p)}
    assert len(calls) >= 10  # the scan finds the calls it is meant to check
    assert [where for where, safe in calls.items() if not safe] == []
    # the configs load checkpoints through MONAI's CheckpointLoader, which does the same
    source = inspect.getsource(CheckpointLoader.__call__)
    assert "weights_only=True" in source
    # and the scan itself catches an unsafe call
    probe = REPO / "tests" / "data" / "_probe_unsafe_load.py"
    try:
        probe.write_text("import torch\nstate = torch.load('x.pt')\nsafe = torch.load('y.pt', weights_only=True)\n")
        assert _torch_load_calls(probe) == [(2, False), (3, True)]
    finally:
        probe.unlink(missing_ok=True)


class _Exploit:
    """A pickle payload that would run a shell command when unpickled by a plain ``pickle.load``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_the_lidc_reader_refuses_a_pickle_that_imports_os(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "data_lidc.pickle"
    path.write_bytes(pickle.dumps({"case_slice_0": _Exploit(marker)}))
    with pytest.raises(DataFormatError, match="refusing to load (posix|os|nt).system") as caught:
        read_lidc_pickle(path)
    assert str(caught.value).startswith(str(path))
    assert not marker.exists()  # nothing ran
