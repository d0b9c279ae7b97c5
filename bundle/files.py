"""Atomic file output: every file the bundle writes (labels, uncertainty maps, reports, tables, checkpoints,
datalists) is written under a temporary name in its own folder and moved over the final name with ``os.replace``.
A crash, a full disk or a killed process therefore leaves either the previous file or the complete new one, never
a half-written file under the final name; the temporary file is removed when the write fails.

The temporary name ends with the final name (``.tmp-<random>-<name>``), so writers that choose the format by the
extension (PIL, nibabel) write the right one, and it is unique per call, so threads and processes writing into
one folder (a MONAI Label server, data-loader workers) never share one.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, fsync: bool = False, single_writer: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block ends without an error the file written there
    replaces ``path`` (``fsync``: flushed to the disk first, for files a later run must find intact such as
    checkpoints). On an error the temporary file is removed and ``path`` is left as it was.

    ``single_writer``: only one process ever writes ``path`` (a training's checkpoints), so temporary files of it
    that a killed process left behind are removed first; never for files that threads or workers write together.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if single_writer:
        for stale in path.parent.glob(f".tmp-*-{path.name}"):
            with contextlib.suppress(OSError):
                stale.unlink()
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{path.name}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``Path.write_text`` through :func:`atomic_output`."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return Path(path)
