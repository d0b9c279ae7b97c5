"""A DICOM series sent to the MONAI Label app as a ZIP archive (apps/monailabel/lib/dicom_series.py), without a
server: what is unpacked, what is refused, and that a refusal leaves nothing behind. The server test
(test_monailabel.py) sends a real series through ``/infer`` and reads the DICOM SEG it gets back."""

from __future__ import annotations

import os
import stat
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from dicom_helpers import write_dicom_series

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "monailabel"))

from lib.dicom_series import unpack_series  # noqa: E402
from lib.request_checks import RequestRefusedError  # noqa: E402

SPACING, ORIGIN = (0.9, 1.1, 2.5), (-40.0, 25.0, 7.5)
NAME = "the uploaded image (.zip)"


@pytest.fixture()
def temp(tmp_path, monkeypatch):
    folder = tmp_path / "temp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> tuple[Path, np.ndarray]:
    array = np.random.default_rng(0).integers(0, 1000, size=(12, 10, 6)).astype(np.int16)
    folder = tmp_path_factory.mktemp("series") / "scan"
    write_dicom_series(array, folder, SPACING, ORIGIN)
    return folder, array


def _zip(path: Path, members: dict[str, bytes], links: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {f"scan/{p.name}": p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_zipped_series_unpacks_into_a_folder_the_model_reader_loads_as_the_volume(series, temp, tmp_path):
    from monai.data import ITKReader

    folder, array = series
    members = {**_files(folder), "scan/README.txt": b"exported by a viewer", "__MACOSX/._x": b"\0" * 200}
    unpacked = unpack_series(str(_zip(tmp_path / "s.zip", members)), NAME, max_bytes=10 * 2**20)
    assert Path(unpacked).parent == temp and len(os.listdir(unpacked)) == array.shape[2]  # non-DICOM files left out
    reader = ITKReader()
    volume, meta = reader.get_data(reader.read(unpacked))
    np.testing.assert_array_equal(volume, array)
    np.testing.assert_allclose(np.abs(np.diag(meta["original_affine"]))[:3], SPACING, atol=1e-4)


def test_member_names_never_become_paths(series, temp, tmp_path):
    folder, array = series
    files = list(_files(folder).values())
    members = {"../../escaped.dcm": files[0], "/abs/escaped.dcm": files[1], **dict(zip(["a/../../b.dcm"], files[2:3]))}
    members.update({f"ok/{i}.dcm": data for i, data in enumerate(files[3:])})
    unpacked = unpack_series(str(_zip(tmp_path / "s.zip", members)), NAME, max_bytes=10 * 2**20)
    assert sorted(os.listdir(unpacked)) == [f"{i:05d}.dcm" for i in range(array.shape[2])]
    everywhere = [p.name for p in tmp_path.rglob("*escaped*")] + [p.name for p in tmp_path.rglob("b.dcm")]
    assert everywhere == []


def _refused(archive: Path, temp: Path, **limits) -> RequestRefusedError:
    with pytest.raises(RequestRefusedError) as err:
        unpack_series(str(archive), NAME, **{"max_bytes": 10 * 2**20, **limits})
    assert NAME in err.value.message
    assert list(temp.iterdir()) == []  # nothing unpacked is left behind
    return err.value


def test_refusals_name_the_upload_and_the_problem(series, temp, tmp_path):
    folder, _ = series
    files = _files(folder)
    not_zip = tmp_path / "x.zip"
    not_zip.write_bytes(b"PK\x03\x04 but not really a zip archive")
    err = _refused(not_zip, temp)
    assert err.status == 422 and "not a ZIP archive" in err.message
    err = _refused(_zip(tmp_path / "none.zip", {"a.txt": b"hello", "b.dcm": b"\0" * 300}), temp)
    assert err.status == 422 and "no DICOM file" in err.message
    err = _refused(_zip(tmp_path / "link.zip", files, links=("scan/link.dcm",)), temp)
    assert err.status == 422 and "symbolic links" in err.message
    err = _refused(_zip(tmp_path / "many.zip", files), temp, max_files=3)
    assert err.status == 413 and f"{len(files)} files" in err.message
    err = _refused(_zip(tmp_path / "big.zip", files), temp, max_bytes=1000)
    assert err.status == 413 and "max_upload_mb" in err.message


def test_a_zip_bomb_stops_at_the_limit(temp, tmp_path):
    bomb = _zip(tmp_path / "bomb.zip", {"a.dcm": b"\0" * (8 * 2**20)})  # 8 MB of zeros, ~8 kB compressed
    assert bomb.stat().st_size < 100_000
    err = _refused(bomb, temp, max_bytes=2**20)
    assert err.status == 413


def test_two_series_in_one_archive_are_refused(series, temp, tmp_path):
    folder, array = series
    other = tmp_path / "other"
    write_dicom_series(array[:, :, :3], other, SPACING, (0.0, 0.0, 0.0), uid="1.2.826.0.1.3680043.2.1125.8")
    members = {**_files(folder), **{f"other/{p.name}": p.read_bytes() for p in sorted(other.iterdir())}}
    err = _refused(_zip(tmp_path / "two.zip", members), temp)
    assert err.status == 422 and "2 DICOM series" in err.message
