"""The one error type the data readers raise for bad input files, and the last line a person reads.

Whatever wraps a reader's ``DataFormatError`` on its way out (MONAI's config evaluation raises
``RuntimeError: Failed to evaluate ConfigExpression`` from it, ignite re-raises it, a DataLoader worker rebuilds
it in the main process), ``install_excepthook`` (run on ``import bundle``) prints the usual traceback and then, as
the last line, ``error: <file>: <problem>``; the process still exits non-zero. A training stopped on a non-finite
loss (``FloatingPointError`` from the trainer, naming the iteration) ends the same way.
"""

from __future__ import annotations

import errno
import os
import sys
from types import TracebackType

__all__ = [
    "DataFormatError",
    "LAST_LINE_ERRORS",
    "OutputError",
    "WRITE_ERRNOS",
    "error_chain",
    "find_input_error",
    "install_excepthook",
    "one_line",
]


class _PathMessage:
    """``<path>: <problem>`` errors (mixed into an exception type): ``path`` and ``problem`` attributes, or a bare
    message in the single-argument form that ``pickle`` and PyTorch's DataLoader use to re-raise an error."""

    def __init__(self, path: str | os.PathLike, problem: str | None = None) -> None:
        if problem is None:
            self.path: str | None = None
            self.problem: str | None = None
            super().__init__(str(path))
        else:
            self.path = os.fspath(path)
            self.problem = problem
            super().__init__(f"{self.path}: {problem}")

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DataFormatError(_PathMessage, ValueError):
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


class OutputError(_PathMessage, OSError):
    """An output (a checkpoint, a label volume, a report, a folder) that cannot be written: no permission, a
    read-only file system, a full disk or quota. The message starts with the path, as ``DataFormatError``'s."""


# OSErrors of a write that the excepthook repeats as the last line, with the file they name
WRITE_ERRNOS = frozenset(
    code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG, errno.EROFS) if code is not None
)


def error_chain(error: BaseException | None):
    """``error``, then its ``__cause__`` (else ``__context__``), and so on, each once."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        yield error
        seen.add(id(error))
        error = error.__cause__ or error.__context__


def _write_error(error: BaseException | None) -> str | None:
    """``<file>: <reason>`` of a full disk / quota / file-size limit / read-only file system in ``error``'s chain."""
    for link in error_chain(error):
        if isinstance(link, OSError) and link.errno in WRITE_ERRNOS:
            where = link.filename if link.filename is not None else "an output file"
            return f"{where}: {link.strerror or os.strerror(link.errno)} (nothing was written in its place)"
    return None


def find_input_error(
    error: BaseException | None, kinds: tuple[type[BaseException], ...] = (DataFormatError,)
) -> BaseException | None:
    """The first exception of ``kinds`` in ``error``'s chain (``__cause__``, then ``__context__``), if any."""
    return next((link for link in error_chain(error) if isinstance(link, kinds)), None)


def one_line(error: BaseException) -> str:
    """``<file>: <problem>`` of an input error (or the message of a stop such as a diverged training); a DataLoader
    worker's copy carries the worker's whole traceback as its message, whose last line is the original
    ``...DataFormatError: <file>: <problem>``."""
    if getattr(error, "path", None) is not None:
        return str(error)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    marker = f"{type(error).__name__}: "
    return last.split(marker, 1)[1] if marker in last else last


def _excepthook(kind: type[BaseException], error: BaseException, trace: TracebackType | None) -> None:
    _previous_hook(kind, error, trace)
    cause = find_input_error(error, LAST_LINE_ERRORS)
    line = one_line(cause) if cause is not None else _write_error(error)
    if line is not None:
        print(f"\nerror: {line}", file=sys.stderr, flush=True)


_previous_hook = sys.excepthook
# what the excepthook repeats as the last line: bad input, an output that cannot be written, a path the user gave
# that cannot be used (an output that exists, a folder that does not, no permission), and a training stopped on a
# non-finite loss
LAST_LINE_ERRORS: tuple[type[BaseException], ...] = (
    DataFormatError,
    OutputError,
    FileExistsError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FloatingPointError,
)


def install_excepthook() -> None:
    """Make an input error's one-line message the last thing an uncaught failure prints (module docstring)."""
    global _previous_hook
    if sys.excepthook is not _excepthook:
        _previous_hook = sys.excepthook
        sys.excepthook = _excepthook
