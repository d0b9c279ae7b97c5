"""A DICOM series sent to the MONAI Label app as one upload: a ZIP archive of its files.

MONAI Label's ``/infer`` endpoint takes one file per request, and a DICOM series is a folder of files (one per
slice), so a client zips the series folder (3D Slicer, OHIF exports and PACS downloads hand out such archives) and
uploads ``series.zip``. ``unpack_series`` turns the archive into a folder that MONAI's ``ITKReader`` reads as one
volume, refusing what a server should not unpack:

- not a ZIP archive, or a damaged one (422);
- members that are links, or more than ``max_files`` members, or more than ``max_bytes`` once unpacked (413) --
  the sizes are checked against the archive's directory and again while each member is read, so a member whose
  header understates its size stops at the limit (a ZIP bomb does not fill the disk);
- no DICOM file in it (files without the ``DICM`` preamble are left out: a ``README``, a ``.DS_Store``), or the
  files of more than one series (422, with how many: the client chooses which to send).

Member names are never used as paths: each file is written as ``<n>.dcm`` into a new temporary folder, so
``../../x`` or an absolute name in the archive cannot place a file outside it. The series is identified with ITK's
GDCM series reader, the one MONAI's ``ITKReader`` uses, so what passes here is what the model's reader loads.
The folder is removed by ``remove_series`` once the request is answered. Plain Python and ITK (no FastAPI, no
pydicom): the main test suite checks it without a server.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import zipfile

from .request_checks import RequestRefusedError

#: a series of more files than this is not one volume a viewer sends for annotation
DEFAULT_MAX_FILES = 5000
#: the folder ``unpack_series`` creates: a name that ``request_checks.display_name`` shows as an upload
SERIES_SUFFIX = ".dicom"
CHUNK = 1 << 20


def is_series_archive(path: str) -> bool:
    return isinstance(path, str) and path.lower().endswith(".zip") and os.path.isfile(path)


def _is_link(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _copy_limited(source, target, allowed: int, name: str, total_name: str) -> int:
    """Copy at most ``allowed`` bytes; past it, a 413 (the member's header lied about its size)."""
    written = 0
    while chunk := source.read(CHUNK):
        written += len(chunk)
        if written > allowed:
            raise RequestRefusedError(413, f"{name} unpacks past this server's limit of {total_name}")
        target.write(chunk)
    return written


def unpack_series(archive: str, name: str, max_bytes: int, max_files: int = DEFAULT_MAX_FILES) -> str:
    """The DICOM files of ``archive`` in a new temporary folder (module docstring); ``name`` is how messages call
    the archive. Raises ``RequestRefusedError``; leaves nothing behind when it does."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as err:
        raise RequestRefusedError(422, f"{name} is not a ZIP archive of a DICOM series ({err})") from None
    limit = f"{max_bytes / 2**20:g} MB (--conf max_upload_mb)"
    with zf:
        members = [info for info in zf.infolist() if not info.is_dir()]
        links = [info.filename for info in members if _is_link(info)]
        if links:
            raise RequestRefusedError(422, f"{name} holds symbolic links ({links[0]!r}); send the files themselves")
        if len(members) > max_files:
            raise RequestRefusedError(
                413, f"{name} holds {len(members)} files, past this server's limit of {max_files}"
            )
        declared = sum(info.file_size for info in members)
        if declared > max_bytes:
            raise RequestRefusedError(
                413, f"{name} unpacks to {declared / 2**20:.1f} MB, past this server's limit of {limit}"
            )
        folder = tempfile.mkdtemp(suffix=SERIES_SUFFIX)
        try:
            remaining, kept = max_bytes, 0
            for info in members:
                target = os.path.join(folder, f"{kept:05d}.dcm")
                try:
                    with zf.open(info) as source, open(target, "wb") as out:
                        remaining -= _copy_limited(source, out, remaining, name, limit)
                except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, RuntimeError) as err:
                    raise RequestRefusedError(422, f"{name}: member {info.filename!r} cannot be read ({err})") from None
                if _is_dicom(target):
                    kept += 1
                else:
                    os.remove(target)
            if kept == 0:
                raise RequestRefusedError(422, f"{name} holds no DICOM file (none has the 'DICM' preamble)")
            series = series_identifiers(folder)
            if len(series) != 1:
                raise RequestRefusedError(
                    422,
                    f"{name} holds {len(series)} DICOM series; send one series per request"
                    + (f" (found {', '.join(series[:3])}{', ...' if len(series) > 3 else ''})" if series else ""),
                )
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
    return folder


def _is_dicom(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(128)
        return f.read(4) == b"DICM"


def series_identifiers(folder: str) -> list[str]:
    """The series ITK's GDCM reader finds in ``folder`` (a series UID, refined by geometry tags as ITK does)."""
    import itk

    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.SetDirectory(folder)
    return [str(uid) for uid in names.GetSeriesUIDs()]


def remove_series(folder: str) -> None:
    if folder and folder.endswith(SERIES_SUFFIX) and os.path.dirname(folder) == tempfile.gettempdir():
        shutil.rmtree(folder, ignore_errors=True)
