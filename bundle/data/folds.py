"""Cross-validation folds and the JSON datalists that record them.

A dataset reader returns its labelled cases as a list of dicts (``image``, ``label``, ``name``, ...). This module
assigns every case a fold id, turns one fold into a ``{"training", "validation", "test"}`` datalist and writes it
as JSON so users can read and edit the split:

- the cases of fold ``k`` form ``test`` (the held-out partition; the reference code calls it the validation
  fold) and are only ever evaluated;
- the cases of the other folds are split once more, with a seeded permutation, into ``training`` and a small
  ``validation`` share that selects the model, so no model is selected on the fold it is scored on.

Fold assignment uses MONAI's ``partition_dataset``: unshuffled, case ``i`` (in the given order) goes to fold
``i % num_folds`` (the cDAL Hippocampus protocol: 4 unshuffled partitions of the MSD ``dataset.json`` order);
with ``shuffle_seed`` the order is first permuted with ``numpy.random.RandomState(seed)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import partition_dataset

from bundle.data.errors import DataFormatError
from bundle.files import write_text_atomic
from bundle.runtime import as_bool

__all__ = ["assign_folds", "fold_datalist", "write_datalist_json"]


def assign_folds(
    cases: Sequence[dict[str, Any]], num_folds: int, shuffle_seed: int | None = None
) -> list[dict[str, Any]]:
    """Copies of ``cases`` with an integer ``"fold"`` in [0, num_folds), in the input order.

    Args:
        cases: the labelled cases (dicts); their order defines the unshuffled partition.
        num_folds: K >= 2, at most ``len(cases)``.
        shuffle_seed: None for the unshuffled partition (case i -> fold i % K); a seed permutes first.

    Raises:
        ValueError: K < 2 or fewer cases than folds.
    """
    num_folds = int(num_folds)
    if num_folds < 2:
        raise ValueError(f"num_folds must be >= 2, got {num_folds}")
    if len(cases) < num_folds:
        raise ValueError(f"cannot split {len(cases)} cases into {num_folds} folds")
    indices = list(range(len(cases)))
    shuffle = shuffle_seed is not None
    parts = partition_dataset(indices, num_partitions=num_folds, shuffle=shuffle, seed=int(shuffle_seed or 0))
    fold_of = {index: fold for fold, part in enumerate(parts) for index in part}
    return [{**case, "fold": fold_of[i]} for i, case in enumerate(cases)]


def _validation_share(cases: list[dict[str, Any]], val_fraction: float, seed: int) -> set[int]:
    """Indices of ``cases`` for validation: ``max(1, round(f * n))`` of them (at most n - 1), seeded."""
    n = len(cases)
    if n < 2 or val_fraction == 0:
        return set()
    n_val = min(n - 1, max(1, int(round(val_fraction * n))))
    return {int(i) for i in np.random.default_rng(seed).permutation(n)[:n_val]}


def fold_datalist(
    cases: Sequence[dict[str, Any]],
    fold: int,
    num_folds: int,
    val_fraction: float = 0.1,
    seed: int = 0,
    shuffle_seed: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The datalist of one cross-validation fold.

    Args:
        cases: labelled cases in their canonical order (see :func:`assign_folds`).
        fold: the held-out fold k in [0, num_folds).
        num_folds: K.
        val_fraction: share of the non-held-out cases used for model selection, in [0, 1).
        seed: seed of the training/validation permutation.
        shuffle_seed: passed to :func:`assign_folds`.
        extra: further top-level entries to record (e.g. the class names); must not use the list keys.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...], "fold": k, "num_folds": K,
        "folds": {name: fold id}, **extra}``; every case carries its ``"fold"``; lists keep the canonical order.
    """
    fold, num_folds = int(fold), int(num_folds)
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in [0, {num_folds}), got {fold}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    assigned = assign_folds(cases, num_folds, shuffle_seed)
    rest = [case for case in assigned if case["fold"] != fold]
    validation = _validation_share(rest, float(val_fraction), seed)
    datalist: dict[str, Any] = {
        "training": [case for i, case in enumerate(rest) if i not in validation],
        "validation": [case for i, case in enumerate(rest) if i in validation],
        "test": [case for case in assigned if case["fold"] == fold],
        "fold": fold,
        "num_folds": num_folds,
        "folds": {str(case.get("name", i)): case["fold"] for i, case in enumerate(assigned)},
    }
    for key, value in (extra or {}).items():
        if key in datalist:
            raise ValueError(f"extra datalist entry {key!r} would replace a reserved one")
        datalist[key] = value
    return datalist


def write_datalist_json(path: str | os.PathLike, content: dict[str, Any], overwrite: bool = False) -> Path:
    """Write a datalist as JSON atomically; an identical file is left alone, a different one needs ``overwrite``.

    Raises:
        DataFormatError: ``path`` holds different content (e.g. a split the user edited) and ``overwrite`` is False.
    """
    path = Path(path).expanduser().absolute()
    overwrite = as_bool(overwrite, "overwrite")
    if path.exists():
        try:
            existing = json.loads(path.read_text())
        except (OSError, ValueError):
            existing = None
        if existing == json.loads(json.dumps(content)):
            return path
        if not overwrite:
            raise DataFormatError(
                path,
                "exists with different content (another split or an edited file); pass overwrite=True "
                "('--overwrite true') or another datalist_file",
            )
    return write_text_atomic(path, json.dumps(content, indent=2) + "\n")
