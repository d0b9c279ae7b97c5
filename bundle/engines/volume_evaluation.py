"""Evaluating a 2-D diffusion model on 3-D volumes: slice-wise ensemble inference and NIfTI prediction files.

``SliceEnsembleInferer`` runs ``EnsembleDiffusionInferer`` over the axial slices of a volume through MONAI's
``SliceInferer`` (2-D windows of ``roi_size`` slid over every slice with ``overlap``; overlapping windows are
averaged) and returns the reassembled (B, C, H, W, D) mean probabilities (and uncertainty). With the cDAL
Hippocampus protocol (32x32 windows, overlap 0.75) every voxel is covered by the same windows a 32^3 sliding
window with overlap 0.75 would give it in-plane; depth overlap would only repeat identical slice computations
with fresh noise.

``NiftiPredictionWriter`` (an evaluator handler) writes each volume's predicted label map back in the input
file's voxel order, with the input's affine and header (data type set to uint8), so the prediction overlays the
image in any viewer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.inferers import Inferer, SliceInferer
from torch import nn

from bundle.diffusion.ensemble_inferer import EnsembleDiffusionInferer
from bundle.diffusion.samplers import DiffusionSampler
from bundle.engines.flags import as_bool

__all__ = ["SliceEnsembleInferer", "onehot_to_label_map", "save_label_volume", "NiftiPredictionWriter"]


class SliceEnsembleInferer(Inferer):
    """Ensemble diffusion inference of a 2-D model on 3-D volumes, slice by slice.

    Args:
        sampler, num_generations, label_channels, outputs, generation_batch_size, seed: as
            ``EnsembleDiffusionInferer`` (which runs on each batch of 2-D windows).
        autocast: reduced-precision network forwards, as ``EnsembleDiffusionInferer``.
        roi_size: 2-D window (H, W) slid over each slice (the training crop size, 32x32 for Hippocampus).
        overlap: window overlap in-plane (0.75 in the reference protocol).
        sw_batch_size: 2-D windows per network batch (each runs ``num_generations`` rows).
        spatial_dim: the slicing axis among (H, W, D) = (0, 1, 2); 2 = axial for LPI/RAS-oriented volumes.

    ``inferer(volumes, network)`` takes (B, C_img, H, W, D) and returns what ``outputs`` asks for, each
    (B, C, H, W, D); a 4-D (B, C_img, H, W) input is passed to the 2-D ensemble inferer unchanged.
    """

    def __init__(
        self,
        sampler: DiffusionSampler,
        num_generations: int = 5,
        label_channels: int = 1,
        outputs: str | Sequence[str] = ("mean", "uncertainty"),
        roi_size: Sequence[int] = (32, 32),
        overlap: float = 0.75,
        sw_batch_size: int = 32,
        spatial_dim: int = 2,
        generation_batch_size: int | None = None,
        seed: int | None = None,
        autocast: str | torch.dtype | bool | None = None,
    ) -> None:
        super().__init__()
        if len(roi_size) != 2:
            raise ValueError(f"roi_size must be a 2-D window (H, W), got {roi_size}")
        self.ensemble = EnsembleDiffusionInferer(
            sampler, num_generations=num_generations, label_channels=label_channels, outputs=outputs,
            roi_size=None, generation_batch_size=generation_batch_size, seed=seed, autocast=autocast,
        )
        self.slicer = SliceInferer(
            spatial_dim=spatial_dim, roi_size=tuple(int(s) for s in roi_size), sw_batch_size=sw_batch_size,
            overlap=overlap, mode="constant",
        )

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if inputs.ndim not in (4, 5):
            raise ValueError(f"expected volumes (B, C, H, W, D) or images (B, C, H, W), got {tuple(inputs.shape)}")
        # the noise stream of this call, from the seed and the volume's file name (as the 2-D inferer does)
        stream = self.ensemble.noise_stream(inputs)
        if isinstance(inputs, MetaTensor):  # the untiled ensemble cannot slice a MetaTensor's batched metadata
            inputs = inputs.as_tensor()
        if inputs.ndim == 4:
            return self.ensemble.ensemble(inputs, network, stream=stream)
        return self.slicer(inputs, partial(self.ensemble.ensemble, network=network, stream=stream))


def onehot_to_label_map(onehot: torch.Tensor | np.ndarray, first_class: int = 1) -> np.ndarray:
    """(C, *spatial) disjoint one-hot channels -> uint8 (*spatial) label map; channel c has value first_class + c.

    With ``first_class = 1`` (background channel dropped) a voxel in no channel is background (0).
    """
    array = np.asarray(torch.as_tensor(onehot).detach().cpu().numpy()) > 0.5
    values = np.arange(first_class, first_class + array.shape[0]).reshape(-1, *([1] * (array.ndim - 1)))
    return (array * values).sum(axis=0).astype(np.uint8)


def save_label_volume(
    label_map: np.ndarray, affine: np.ndarray, reference_path: str | os.PathLike, output_path: str | os.PathLike,
    overwrite: bool = False, dtype: type | np.dtype = np.uint8,
) -> Path:
    """Write a label map computed in a reoriented space back in the voxel order of ``reference_path``.

    Args:
        label_map: (H, W, D) integer labels in the processing orientation.
        affine: the 4x4 voxel-to-world affine of ``label_map`` (the image's ``meta["affine"]`` after
            ``Orientationd``).
        reference_path: the input NIfTI image; its affine and header are copied (data type uint8).
        output_path: ``.nii.gz`` (or ``.nii``) file to write, atomically.
        overwrite: replace an existing file.
        dtype: stored data type (uint8 for labels; float32 for a map such as the ensemble's uncertainty).

    Raises:
        ValueError: the label map does not map onto the reference grid by an axis permutation/flip (the message
            names the reference file), e.g. because it was cropped or resampled.
        FileExistsError: ``output_path`` exists and ``overwrite`` is False.
    """
    import nibabel as nib
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    reference = nib.load(os.fspath(reference_path))
    affine = np.asarray(affine, dtype=float)
    transform = ornt_transform(io_orientation(affine), io_orientation(reference.affine))
    restored = apply_orientation(np.asarray(label_map), transform)
    restored_affine = affine @ inv_ornt_aff(transform, np.asarray(label_map).shape)
    if restored.shape != reference.shape[:3] or not np.allclose(restored_affine, reference.affine, atol=1e-3):
        raise ValueError(
            f"{reference_path}: prediction of shape {np.asarray(label_map).shape} with affine\n{affine}\ndoes not map "
            f"onto this image's grid {reference.shape[:3]} by reorientation alone (was it cropped or resampled?)"
        )
    output_path = Path(output_path)
    if output_path.exists() and not overwrite:
        raise FileExistsError(f"{output_path}: exists already; pass '--overwrite true' or another output folder")
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    image = nib.Nifti1Image(np.ascontiguousarray(restored.astype(dtype)), reference.affine, header)
    image.header.set_slope_inter(1.0, 0.0)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if output_path.name.endswith(".gz") else ".nii"
    tmp = output_path.with_name(f".{output_path.name}.{os.getpid()}.tmp{suffix}")
    try:
        nib.save(image, str(tmp))
        os.replace(tmp, output_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return output_path


class NiftiPredictionWriter:
    """Evaluator handler: write every volume's predicted labels to ``<output_dir>/<input file name>``.

    Reads, per output item, ``pred_key`` (one-hot class channels, as from ``VoteArgmaxd``; channel c is label
    ``first_class + c``) and ``image_key`` (the input ``MetaTensor``: ``filename_or_obj`` and the processing
    ``affine``). A file that exists before this handler first writes it is only replaced with ``overwrite``;
    files it wrote itself are refreshed at every run of the evaluator (e.g. every validation).
    """

    def __init__(
        self, output_dir: str | os.PathLike, pred_key: str = "pred", image_key: str = "image", first_class: int = 1,
        overwrite: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.pred_key, self.image_key = pred_key, image_key
        self.first_class = first_class
        self.overwrite = as_bool(overwrite, "overwrite")
        self._written: set[Path] = set()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._write)

    def _write(self, engine: Engine) -> None:
        output = engine.state.output
        for item in output if isinstance(output, list) else [output]:
            image = item[self.image_key]
            meta = getattr(image, "meta", None)
            if not meta or "filename_or_obj" not in meta or "affine" not in meta:
                raise ValueError("NiftiPredictionWriter needs the input image's metadata (filename_or_obj, affine)")
            source = os.fspath(meta["filename_or_obj"])
            target = self.output_dir / Path(source).name
            label_map = onehot_to_label_map(item[self.pred_key], self.first_class)
            allowed = self.overwrite or target in self._written
            save_label_volume(label_map, torch.as_tensor(meta["affine"]).cpu().numpy(), source, target, allowed)
            self._written.add(target)
