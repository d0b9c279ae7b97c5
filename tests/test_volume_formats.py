"""Volumes as viewers hold them: NRRD and MetaImage in, labels back in the same format and physical geometry;
a DICOM series (a sub-folder of ``.dcm`` files) in, a NIfTI label in the series' grid back.

3D Slicer saves the volume it sends as NRRD by default, and ITK tools use MetaImage. MONAI's ``LoadImaged`` reads
both through ``ITKReader`` (the ``itk-io`` package) with the same RAS affine that nibabel gives a NIfTI file;
``bundle.transforms.writers.save_label_volume`` writes the label back in the input's voxel grid with its origin,
spacing and direction.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
from dicom_helpers import write_dicom_series
from monai.transforms import Compose, LoadImaged, Orientationd

from bundle.transforms.writers import label_extension, save_label_volume, volume_file_stem

REPO = Path(__file__).resolve().parents[1]
CASE = "hippocampus_001"  # fold 0: never trained on by the shipped models


def _itk_volume(array: np.ndarray, spacing, origin, direction) -> itk.Image:
    """An ITK image whose index (i, j, k) holds ``array[i, j, k]``."""
    image = itk.image_from_array(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(itk.matrix_from_array(np.asarray(direction, dtype=np.float64)))
    return image


def _geometry(image: itk.Image) -> tuple:
    return (
        tuple(itk.size(image)),
        tuple(np.round(image.GetSpacing(), 6)),
        tuple(np.round(image.GetOrigin(), 6)),
        tuple(np.round(itk.array_from_matrix(image.GetDirection()), 6).ravel()),
    )


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_a_label_goes_back_into_an_oblique_anisotropic_volume_exactly(tmp_path, suffix):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (7, 9, 11)).astype(np.uint8)
    # axes permuted and flipped, anisotropic spacing, an origin away from zero
    direction = [[0, -1, 0], [0, 0, 1], [-1, 0, 0]]
    source = tmp_path / f"scan{suffix}"
    itk.imwrite(_itk_volume(labels, (0.7, 1.2, 2.5), (12.0, -30.5, 4.25), direction), str(source))
    # the bundle's inference path: read (ITKReader, RAS), reorient to the processing orientation
    load = Compose(
        [
            LoadImaged(keys="image", reader="NibabelReader", ensure_channel_first=True, image_only=True),
            Orientationd(keys="image", axcodes="LPI", labels=[["L", "R"], ["P", "A"], ["I", "S"]]),
        ]
    )
    loaded = load({"image": str(source)})["image"]
    assert tuple(loaded.shape[1:]) != labels.shape  # the processing grid really is another voxel order
    out = tmp_path / "masks" / f"{volume_file_stem(source)}{label_extension(source)}"
    save_label_volume(loaded[0].numpy().astype(np.uint8), loaded.meta["affine"].numpy(), source, out)
    assert out.name == f"scan{suffix}"
    written, reference = itk.imread(str(out)), itk.imread(str(source))
    assert _geometry(written) == _geometry(reference)
    assert np.array_equal(itk.array_from_image(written), itk.array_from_image(reference))
    with pytest.raises(FileExistsError, match="exists already"):
        save_label_volume(loaded[0].numpy().astype(np.uint8), loaded.meta["affine"].numpy(), source, out)


def test_label_extensions_follow_the_input():
    assert label_extension("a/x.nii.gz") == ".nii.gz" and label_extension("x.nii") == ".nii.gz"
    assert label_extension("x.nrrd") == ".nrrd" and label_extension("x.nhdr") == ".nrrd"
    assert label_extension("x.mha") == ".mha" and label_extension("x.mhd") == ".mha"
    assert volume_file_stem("a/x.nhdr") == "x" and volume_file_stem("a/x.nii.gz") == "x"


@pytest.mark.realdata
def test_the_documented_command_answers_nrrd_and_metaimage_in_their_own_format(shared_data_dir, tmp_path):
    """The exact two-overlay inference command on a folder holding a real volume as NRRD, as MetaImage and as a
    DICOM series (moved to another origin): each label comes back in its input's format (NIfTI for the series) and
    geometry and segments the volume."""
    root = shared_data_dir / "hippocampus" / "Task04_Hippocampus"
    nifti = nib.load(root / "imagesTr" / f"{CASE}.nii.gz")
    truth = np.asarray(nib.load(root / "labelsTr" / f"{CASE}.nii.gz").dataobj)
    inputs, out = tmp_path / "volumes", tmp_path / "out"
    inputs.mkdir()
    # RAS identity affine = LPS direction diag(-1, -1, 1); the origin moved (a viewer's own frame)
    lps = [[-1, 0, 0], [0, -1, 0], [0, 0, 1]]
    volume = _itk_volume(np.asarray(nifti.dataobj).astype(np.float32), (1.0, 1.0, 1.0), (-40.0, 25.0, 7.5), lps)
    for name in ("scan_a.nrrd", "scan_b.mha"):
        itk.imwrite(volume, str(inputs / name), compression=True)
    write_dicom_series(np.asarray(nifti.dataobj), inputs / "scan_c", (1.0, 1.0, 1.0), (-40.0, 25.0, 7.5))
    configs = ["configs/inference.yaml", "configs/datasets/hippocampus.yaml"]
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs)]
    command += ["--input_dir", str(inputs), "--output_dir", str(out), "--bundle_root", str(tmp_path / "bundle")]
    command += ["--num_generations", "2", "--whole_slices", "true"]  # the fast protocol: seconds per volume
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["scan_a.nrrd", "scan_b.mha", "scan_c.nii.gz"]
    assert sorted(p.name for p in (out / "uncertainty").iterdir()) == ["scan_a.nrrd", "scan_b.mha", "scan_c.nii.gz"]
    # the DICOM series: a NIfTI label in the series' own grid (its RAS affine, as MONAI's ITKReader gives it)
    from monai.data import ITKReader

    reader = ITKReader()
    series, meta = reader.get_data(reader.read(str(inputs / "scan_c")))
    label = nib.load(out / "masks" / "scan_c.nii.gz")
    assert label.shape == series.shape and np.allclose(label.affine, meta["original_affine"])
    assert np.allclose(label.affine[:3, 3], [40.0, -25.0, 7.5])  # the series' origin, LPS -> RAS
    predicted = np.asarray(label.dataobj)
    dice = [2 * np.sum((predicted == c) & (truth == c)) / (np.sum(predicted == c) + np.sum(truth == c)) for c in (1, 2)]
    assert min(dice) > 0.75, ("scan_c (DICOM)", dice)
    for name in ("scan_a.nrrd", "scan_b.mha"):
        mask = itk.imread(str(out / "masks" / name))
        assert _geometry(mask) == _geometry(itk.imread(str(inputs / name)))
        predicted = np.transpose(itk.array_from_image(mask), (2, 1, 0))  # back to (i, j, k) = the NIfTI's order
        dice = [
            2 * np.sum((predicted == c) & (truth == c)) / (np.sum(predicted == c) + np.sum(truth == c)) for c in (1, 2)
        ]
        assert min(dice) > 0.75, (name, dice)
        uncertainty = itk.array_from_image(itk.imread(str(out / "uncertainty" / name)))
        assert uncertainty.dtype == np.float32 and 0 <= uncertainty.min() and uncertainty.max() <= 0.5
