"""Choosing the part of a datalist a workflow runs on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

SUBSETS = ("training", "validation", "test")


def select_subset(datalist: Mapping[str, Sequence[dict]], subset: str) -> list[dict]:
    """The entries of ``subset`` (``training``, ``validation``, ``test`` or ``all`` = every entry once).

    Raises a ValueError naming the subset when it is unknown or empty, so an evaluation never runs on nothing.
    """
    if subset == "all":
        items = [item for name in SUBSETS for item in datalist.get(name, [])]
    elif subset in SUBSETS:
        items = list(datalist.get(subset, []))
    else:
        raise ValueError(f"unknown subset {subset!r}; choose one of {SUBSETS + ('all',)}")
    if not items:
        sizes = {name: len(datalist.get(name, [])) for name in SUBSETS}
        raise ValueError(f"the datalist has no {subset!r} images (sizes: {sizes}); choose another --eval_subset")
    return items


IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
VOLUME_SUFFIXES = (".nii.gz", ".nii")


#: the suffix that makes a sub-folder of an inference folder one DICOM series (read by MONAI's ITKReader)
DICOM_SERIES = ".dcm"


def image_folder_datalist(folder: str, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[dict]:
    """``[{"image": path}, ...]`` for the files directly in ``folder`` whose names end in one of ``suffixes``
    (case-insensitive, so ``.nii.gz`` works), sorted; with ``.dcm`` among the suffixes, each sub-folder holding
    ``.dcm`` files is one item (a DICOM series, read as one volume). An error names the folder if there are none."""
    from pathlib import Path

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: input folder does not exist")
    wanted = tuple(s.lower() for s in suffixes if s.lower() != DICOM_SERIES)
    items = [p for p in root.iterdir() if p.is_file() and wanted and p.name.lower().endswith(wanted)]
    if DICOM_SERIES in (s.lower() for s in suffixes):
        items += [
            p for p in root.iterdir() if p.is_dir() and any(f.name.lower().endswith(DICOM_SERIES) for f in p.iterdir())
        ]
    if not items:
        raise ValueError(f"{root}: no images with suffix {', '.join(suffixes)}")
    return [{"image": str(p)} for p in sorted(items)]
