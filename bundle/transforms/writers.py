"""Writing predictions: a mask and an uncertainty map per input image (PNG) or per input volume (its own format).

- ``SaveMaskAndUncertaintyd``: 2-D images -> ``masks/<stem>.png`` and ``uncertainty/<stem>.png``;
- ``SaveVolumeAndUncertaintyd``: volumes -> ``masks/<name><ext>`` (uint8 labels) and ``uncertainty/<name><ext>``
  (float32), both in the input's voxel grid and format: NIfTI with its affine and header, NRRD / MetaImage with
  its origin, spacing and direction (through ITK, the ``itk-io`` package);
- ``save_label_volume`` / ``onehot_to_label_map``: the volume writing they and the evaluation's prediction
  writer (``bundle.handlers.predictions``) share.

Nothing that exists is replaced unless ``overwrite``; every file is written atomically (``bundle.files``).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform
from PIL import Image

from bundle.files import atomic_output
from bundle.runtime import as_bool


class _PredictionWriterd(MapTransform):
    """Shared arguments of the writers: ``output_dir``, the keys of the mask, the uncertainty and the input image
    (whose ``filename_or_obj`` names the outputs), and ``overwrite``."""

    def __init__(
        self,
        output_dir: str,
        mask_key: str = "mask",
        uncertainty_key: str = "uncertainty",
        image_key: str = "image",
        overwrite: bool = False,
    ) -> None:
        super().__init__([mask_key], allow_missing_keys=False)
        self.output_dir = Path(output_dir)
        self.mask_key, self.uncertainty_key, self.image_key = mask_key, uncertainty_key, image_key
        self.overwrite = as_bool(overwrite, "overwrite")


class SaveMaskAndUncertaintyd(_PredictionWriterd):
    """Save ``mask`` (C, H, W) in {0, 1} and ``uncertainty`` (C, H, W) as PNGs named after the input image.

    Files: ``<output_dir>/masks/<stem>.png`` (uint8, 1 = foreground, 0 = background; for several classes the
    class index) and ``<output_dir>/uncertainty/<stem>.png`` (uint8, 255 = a standard deviation of 0.5 between
    generations, the largest possible). An existing file is never replaced unless ``overwrite`` is true.
    """

    def _write(self, array: np.ndarray, path: Path) -> None:
        if path.exists() and not self.overwrite:
            raise FileExistsError(f"{path}: exists already; pass '--overwrite true' or another output_dir")
        with atomic_output(path) as tmp:
            Image.fromarray(array).save(tmp)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        meta = getattr(d[self.image_key], "meta", {})
        stem = Path(str(meta.get("filename_or_obj", "image"))).stem
        mask = torch.as_tensor(d[self.mask_key]).detach().cpu()
        labels = mask[0] if mask.shape[0] == 1 else mask.argmax(0)
        self._write(labels.numpy().astype(np.uint8), self.output_dir / "masks" / f"{stem}.png")
        if self.uncertainty_key in d:
            unc = torch.as_tensor(d[self.uncertainty_key]).detach().cpu().float().amax(0)
            scaled = (unc / 0.5).clamp(0, 1).mul(255).round().byte().numpy()
            self._write(scaled, self.output_dir / "uncertainty" / f"{stem}.png")
        return d


def onehot_to_label_map(onehot: torch.Tensor | np.ndarray, first_class: int = 1) -> np.ndarray:
    """(C, *spatial) disjoint one-hot channels -> uint8 (*spatial) label map; channel c has value first_class + c.

    With ``first_class = 1`` (background channel dropped) a voxel in no channel is background (0).
    """
    array = np.asarray(torch.as_tensor(onehot).detach().cpu().numpy()) > 0.5
    values = np.arange(first_class, first_class + array.shape[0]).reshape(-1, *([1] * (array.ndim - 1)))
    return (array * values).sum(axis=0).astype(np.uint8)


#: single-file volume formats ITK reads and writes (``itk`` package); a detached header (``.nhdr``, ``.mhd``) is
#: answered in the single-file form of its format
ITK_LABEL_FORMATS = {".nrrd": ".nrrd", ".nhdr": ".nrrd", ".mha": ".mha", ".mhd": ".mha"}
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _suffix(path: str | os.PathLike) -> str:
    if os.path.isdir(path):  # a DICOM series
        return ""
    name = Path(str(path)).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def label_extension(source: str | os.PathLike) -> str:
    """The extension a label for ``source`` is written with: its own format (``.nii.gz`` for NIfTI, ``.nrrd`` for
    NRRD, ``.mha`` for MetaImage), NIfTI for anything else (a DICOM series folder)."""
    return ITK_LABEL_FORMATS.get(_suffix(source), ".nii.gz")


def reference_grid(reference_path: str | os.PathLike) -> tuple[tuple[int, ...], np.ndarray]:
    """The spatial shape and the voxel-to-RAS affine of a volume, as MONAI's readers give them (NIfTI: nibabel,
    the header only; other formats and DICOM series folders: MONAI's ``ITKReader``, whose affine is RAS too)."""
    path = os.fspath(reference_path)
    if _suffix(path) in NIFTI_SUFFIXES:
        import nibabel as nib

        reference = nib.load(path)
        return tuple(int(s) for s in reference.shape[:3]), np.asarray(reference.affine, dtype=float)
    from monai.data import ITKReader

    reader = ITKReader()
    array, meta = reader.get_data(reader.read(path))
    return tuple(int(s) for s in np.asarray(array).shape[:3]), np.asarray(meta["original_affine"], dtype=float)


def _write_itk(array: np.ndarray, reference_path: str, output_path: Path) -> None:
    """``array`` in the reference's voxel index order (i, j, k), written with the reference's origin, spacing and
    direction (its full physical geometry, whatever the orientation) in the format of ``output_path``'s suffix."""
    import itk

    reference = itk.imread(reference_path)
    image = itk.image_from_array(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    image.SetOrigin(reference.GetOrigin())
    image.SetSpacing(reference.GetSpacing())
    image.SetDirection(reference.GetDirection())
    with atomic_output(output_path) as tmp:
        itk.imwrite(image, str(tmp), compression=True)


def save_label_volume(
    label_map: np.ndarray,
    affine: np.ndarray,
    reference_path: str | os.PathLike,
    output_path: str | os.PathLike,
    overwrite: bool = False,
    dtype: type | np.dtype = np.uint8,
) -> Path:
    """Write a label map computed in a reoriented space back in the voxel order of ``reference_path``.

    Args:
        label_map: (H, W, D) integer labels in the processing orientation.
        affine: the 4x4 voxel-to-world (RAS) affine of ``label_map`` (the image's ``meta["affine"]`` after
            ``Orientationd``).
        reference_path: the input volume: NIfTI (its affine and header are copied), NRRD or MetaImage (its origin,
            spacing and direction are copied, through ITK).
        output_path: the file to write, atomically: ``.nii.gz`` / ``.nii`` (needs a NIfTI reference), ``.nrrd`` or
            ``.mha`` (``label_extension`` gives the input's own).
        overwrite: replace an existing file.
        dtype: stored data type (uint8 for labels; float32 for a map such as the ensemble's uncertainty).

    Raises:
        ValueError: the label map does not map onto the reference grid by an axis permutation/flip (the message
            names the reference file), e.g. because it was cropped or resampled.
        FileExistsError: ``output_path`` exists and ``overwrite`` is False.
    """
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    shape, reference_affine = reference_grid(reference_path)
    affine = np.asarray(affine, dtype=float)
    transform = ornt_transform(io_orientation(affine), io_orientation(reference_affine))
    restored = apply_orientation(np.asarray(label_map), transform)
    restored_affine = affine @ inv_ornt_aff(transform, np.asarray(label_map).shape)
    if restored.shape != shape or not np.allclose(restored_affine, reference_affine, atol=1e-3):
        raise ValueError(
            f"{reference_path}: prediction of shape {np.asarray(label_map).shape} with affine\n{affine}\ndoes not map "
            f"onto this image's grid {shape} by reorientation alone (was it cropped or resampled?)"
        )
    output_path = Path(output_path)
    if output_path.exists() and not overwrite:
        raise FileExistsError(f"{output_path}: exists already; pass '--overwrite true' or another output folder")
    restored = np.ascontiguousarray(restored.astype(dtype))
    if _suffix(output_path) not in NIFTI_SUFFIXES:
        _write_itk(restored, os.fspath(reference_path), output_path)
        return output_path
    import nibabel as nib

    if _suffix(reference_path) in NIFTI_SUFFIXES:
        reference = nib.load(os.fspath(reference_path))
        header = reference.header.copy()
        header.set_data_dtype(dtype)
        image = nib.Nifti1Image(restored, reference.affine, header)
        image.header.set_slope_inter(1.0, 0.0)
    else:  # NIfTI for a volume of another format (a DICOM series): its RAS affine, a fresh header
        image = nib.Nifti1Image(restored, reference_affine)
    with atomic_output(output_path) as tmp:
        nib.save(image, str(tmp))
    return output_path


def volume_file_stem(path: str | os.PathLike) -> str:
    """``a/b/x.nii.gz`` -> ``x`` (also ``.nii``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``); a DICOM series folder's
    own name."""
    name = Path(str(path)).name
    if os.path.isdir(path):
        return name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


class SaveVolumeAndUncertaintyd(_PredictionWriterd):
    """Save a volume's labels and uncertainty named after the input, in the input's format and voxel grid.

    Reads ``mask`` (1, H, W, D) integer labels (0 background) and ``uncertainty`` (1, H, W, D) float, both already
    in the input's orientation (after ``Invertd``), and the input file from the image's ``filename_or_obj``; writes
    ``<output_dir>/masks/<stem><ext>`` (uint8) and ``<output_dir>/uncertainty/<stem><ext>`` (float32) with the
    input's geometry: ``.nii.gz`` with the affine and header of a NIfTI input, ``.nrrd`` / ``.mha`` with the origin,
    spacing and direction of a NRRD / MetaImage input (``label_extension``). An existing file is never replaced unless ``overwrite`` is true.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        meta = getattr(d[self.image_key], "meta", {})
        source = meta.get("filename_or_obj")
        if not source:
            raise ValueError("SaveVolumeAndUncertaintyd needs the input image's file name (filename_or_obj)")
        stem, ext = volume_file_stem(source), label_extension(source)
        affine = torch.as_tensor(getattr(d[self.mask_key], "meta", {}).get("affine", meta.get("affine"))).cpu().numpy()
        labels = torch.as_tensor(d[self.mask_key]).detach().cpu()[0].numpy().round().astype(np.uint8)
        save_label_volume(labels, affine, source, self.output_dir / "masks" / f"{stem}{ext}", self.overwrite)
        if self.uncertainty_key in d:
            unc = torch.as_tensor(d[self.uncertainty_key]).detach().cpu().float().amax(0).numpy()
            save_label_volume(
                unc, affine, source, self.output_dir / "uncertainty" / f"{stem}{ext}", self.overwrite, dtype=np.float32
            )
        return d
