"""DICOM series for the tests: a volume written slice by slice with ITK's GDCM writer, its geometry in the tags."""

from __future__ import annotations

import locale
from pathlib import Path

import itk
import numpy as np


def write_dicom_series(
    array: np.ndarray, folder: Path, spacing, origin, uid: str = "1.2.826.0.1.3680043.2.1125.7"
) -> None:
    """``array`` (i, j, k) as an axial DICOM series (one file per k, MR, int16), positions and spacing in the tags."""
    folder.mkdir(parents=True)
    saved = locale.setlocale(locale.LC_ALL)  # GDCM's writer sets the C locale for the whole process; put it back
    try:
        _write_slices(array, folder, spacing, origin, uid)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_slices(array: np.ndarray, folder: Path, spacing, origin, uid: str) -> None:
    for k in range(array.shape[2]):
        image = itk.image_from_array(np.ascontiguousarray(array[:, :, k].T.astype(np.int16)))
        image.SetSpacing((float(spacing[0]), float(spacing[1])))  # GDCM writes the image's own pixel spacing
        tags = image.GetMetaDataDictionary()
        position = (origin[0], origin[1], origin[2] + k * spacing[2])
        for tag, value in {
            "0020|0032": "\\".join(f"{v:.4f}" for v in position),  # image position (patient), LPS
            "0020|0037": "-1\\0\\0\\0\\-1\\0",  # row and column directions: the NIfTI's RAS axes, in LPS
            "0028|0030": f"{spacing[1]:.4f}\\{spacing[0]:.4f}",  # pixel spacing: row, column
            "0018|0050": f"{spacing[2]:.4f}",
            "0020|0013": str(k + 1),
            "0008|0060": "MR",
            "0020|000d": f"{uid}.1",
            "0020|000e": f"{uid}.2",
            "0008|0018": f"{uid}.3.{k + 1}",
        }.items():
            tags[tag] = value
        io = itk.GDCMImageIO.New()
        io.KeepOriginalUIDOn()
        itk.ImageFileWriter[type(image)].New(
            Input=image, FileName=str(folder / f"slice_{k:03d}.dcm"), ImageIO=io
        ).Update()
