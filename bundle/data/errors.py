"""The one error type the data readers raise for bad input files."""

from __future__ import annotations

import os

__all__ = ["DataFormatError"]


class DataFormatError(ValueError):
    """A data file is missing, unreadable or holds content the readers cannot use.

    The message always starts with the offending file path, then the problem, e.g.
    ``/data/MoNuSeg/Annotations/a.xml: Vertex 3 of Region 17 has non-numeric X='abc'``.

    Args:
        path: the offending file (or folder). When ``problem`` is omitted, ``path`` is taken as the
            complete message; this single-argument form is what ``pickle`` and PyTorch's DataLoader
            use to re-raise the error from a worker process.
        problem: what is wrong with it.

    Attributes:
        path: the offending path as a string, or ``None`` when built from a bare message.
        problem: the problem text, or ``None`` when built from a bare message.
    """

    def __init__(self, path: str | os.PathLike, problem: str | None = None) -> None:
        if problem is None:
            self.path: str | None = None
            self.problem: str | None = None
            super().__init__(str(path))
        else:
            self.path = os.fspath(path)
            self.problem = problem
            super().__init__(f"{self.path}: {problem}")
