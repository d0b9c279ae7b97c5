"""The MONAI Label app's request checks (apps/monailabel/lib/request_checks.py) on real files, without a server:
which images a request may name, and which files are refused before decoding. The server test
(test_monailabel.py) sends the same cases over HTTP."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "request_checks", REPO / "apps" / "monailabel" / "lib" / "request_checks.py"
)
checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(checks)


@pytest.fixture()
def store(tmp_path):
    studies = tmp_path / "studies"
    uploads = tmp_path / "uploads"
    studies.mkdir()
    uploads.mkdir()
    (tmp_path / "secret.nii.gz").write_bytes(b"not for clients")
    return studies, uploads


@pytest.mark.parametrize(
    ("image", "status", "words"),
    [
        ("../secret", 400, ["'../secret'", "path"]),
        ("..", 400, ["path"]),
        ("sub\\dir", 400, ["path"]),
        ("case_9", 404, ["case_9", "not in the datastore"]),
        ("", 400, ["no image"]),
    ],
)
def test_ids_with_paths_or_unknown_ids_are_refused(store, image, status, words):
    studies, uploads = store
    with pytest.raises(checks.RequestRefusedError) as err:
        checks.resolve_image(image, ["case_1"], [str(studies)], str(uploads))
    assert err.value.status == status
    assert all(w in err.value.message for w in words), err.value.message


def test_paths_are_allowed_only_inside_the_servers_folders(store, tmp_path):
    studies, uploads = store
    upload = uploads / "tmpab12.nii.gz"
    upload.write_bytes(b"x")
    (studies / "case_1.nii.gz").write_bytes(b"x")
    (uploads / "kept").mkdir()
    (uploads / "kept" / "tmpold.nii.gz").write_bytes(b"x")
    roots = [str(studies)]
    assert checks.resolve_image(str(upload), ["case_1"], roots, str(uploads)) == str(upload)
    assert checks.resolve_image("case_1", ["case_1"], roots, str(uploads)) == "case_1"
    inside = str(studies / "case_1.nii.gz")
    assert checks.resolve_image(inside, ["case_1"], roots, str(uploads)) == inside
    outside = [tmp_path / "secret.nii.gz", uploads / ".." / "secret.nii.gz", Path("/etc/passwd")]
    outside += [uploads / "kept" / "tmpold.nii.gz"]  # below the temp folder is not an upload
    for path in outside:
        with pytest.raises(checks.RequestRefusedError) as err:
            checks.resolve_image(str(path), ["case_1"], roots, str(uploads))
        assert err.value.status == 403 and "outside" in err.value.message, path
    # a link inside the upload folder that points outside is outside
    link = uploads / "tmplink.nii.gz"
    link.symlink_to(tmp_path / "secret.nii.gz")
    with pytest.raises(checks.RequestRefusedError) as err:
        checks.resolve_image(str(link), [], roots, str(uploads))
    assert err.value.status == 403


def test_uploads_are_named_as_the_client_knows_them(tmp_path):
    assert checks.display_name(str(tmp_path / "tmpx1y2.nii.gz"), str(tmp_path)) == "the uploaded image (.nii.gz)"
    assert checks.display_name("case_1") == "image 'case_1'"
    # a datastore that happens to live below the temp folder is not an upload
    inner = tmp_path / "studies" / "tmp_case.nii.gz"
    assert checks.display_name(str(inner), str(tmp_path)) == f"image '{inner}'"


def test_empty_and_oversize_files_are_refused_from_the_header(tmp_path):
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    refused = checks.size_problem(str(empty), "image 'empty'", 10**6, 10)
    assert refused.status == 422 and "empty (0 bytes)" in refused.message

    volume = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((60, 60, 60), np.uint8), np.eye(4)), volume)
    assert checks.header_shape(str(volume)) == (60, 60, 60)
    refused = checks.size_problem(str(volume), "image 'big'", 200_000, 10)
    assert refused.status == 413 and "216000 voxels" in refused.message and "max_image_voxels" in refused.message
    assert checks.size_problem(str(volume), "image 'big'", 216_000, 10) is None

    tile = tmp_path / "tile.tif"
    Image.fromarray(np.zeros((300, 200, 3), np.uint8)).save(tile)
    assert checks.header_shape(str(tile)) == (300, 200)  # the colour channels are not voxels
    assert checks.size_problem(str(tile), "t", 60_000, 10) is None
    assert checks.size_problem(str(tile), "t", 59_999, 10).status == 413

    raw = tmp_path / "raw.nii.gz"
    raw.write_bytes(b"\0" * (2 * 2**20 + 1))
    refused = checks.size_problem(str(raw), "the uploaded image (.nii.gz)", 10**9, 2)
    assert refused.status == 413 and "max_upload_mb" in refused.message


def test_an_unreadable_header_is_left_to_the_reader(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not a png at all")
    assert checks.header_shape(str(garbage)) is None
    assert checks.size_problem(str(garbage), "g", 10, 10) is None


def test_limits_from_the_app_configuration():
    assert checks.conf_limit({}, "max_upload_mb", 5) == 5
    assert checks.conf_limit({"max_upload_mb": "8"}, "max_upload_mb", 5) == 8
    for bad in ("eight", "0", "-1"):
        with pytest.raises(ValueError, match="max_upload_mb"):
            checks.conf_limit({"max_upload_mb": bad}, "max_upload_mb", 5)
