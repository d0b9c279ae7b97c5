"""One composer: (workflow, method, dataset, variant, profile) -> the bundle's config files, merged and launched.

Every tool of the project that builds a config list or starts a bundle run goes through here (tools/reproduce.py,
the matrix tests, the MONAI Label export, the benchmarks, the annotation loop), so the order rules live in one place:

    workflow base(s)  ->  method overlay  ->  dataset overlay  ->  paper or profile of the pair  ->  variant profile

The bases take their default method and dataset slots from the overlays by MONAI macros (``%configs/...#key``), which
MONAI resolves from the working directory: bundle commands run from the bundle root (:data:`BUNDLE_ROOT`), and
:func:`compose` resolves them from there wherever it is called.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from monai.bundle.reference_resolver import ReferenceResolver
from monai.bundle.utils import merge_kv

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = BUNDLE_ROOT / "configs"

# workflow -> its base files, in order (the id MONAI runs is the workflow's name)
WORKFLOWS: dict[str, tuple[str, ...]] = {
    "training": ("train.yaml",),
    "evaluating": ("train.yaml", "evaluate.yaml"),
    "inference": ("inference.yaml",),
}
VARIANTS = ("2d", "2.5d", "3d")


def overlay(kind: str, name: str) -> Path:
    """``configs/<kind>/<name>.yaml``; an unknown name raises ValueError listing the known ones."""
    path = CONFIGS / kind / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIGS / kind).glob("*.yaml"))
        raise ValueError(f"{path}: no such {kind.rstrip('s')} overlay; available: {', '.join(known)}")
    return path


def config_files(
    workflow: str,
    method: str | None = None,
    dataset: str | None = None,
    *,
    paper: bool = False,
    profile: bool = False,
    variant: str = "2d",
    workflow_files: Sequence[str] = (),
    method_first: bool = True,
) -> list[Path]:
    """The config files of one run, in order.

    Args:
        workflow: ``training``, ``evaluating`` or ``inference`` (its base files, :data:`WORKFLOWS`).
        method, dataset: the overlays (None: the bases' defaults, cDAL on the synthetic tiles).
        paper: add ``configs/paper/<method>_<dataset>.yaml`` (GPU scale).
        profile: add ``configs/profiles/<method>_<dataset>.yaml`` (a CPU reproduction profile) and, for a variant
            other than 2d, ``<method>_<dataset>_<variant>.yaml`` when there is one.
        variant: ``2d``, ``2.5d`` or ``3d`` (the switches themselves are :func:`variant_overrides`).
        workflow_files: further workflow overlays after the bases (e.g. ``multi_gpu_train.yaml``).
        method_first: the method overlay before the dataset overlay (they commute; the matrix test checks it).
    """
    if workflow not in WORKFLOWS:
        raise ValueError(f"unknown workflow {workflow!r}; choose one of {sorted(WORKFLOWS)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    if (paper or profile) and (method is None or dataset is None):
        raise ValueError("a paper or profile overlay needs both a method and a dataset")
    files = [CONFIGS / f for f in (*WORKFLOWS[workflow], *workflow_files)]
    overlays = [overlay("methods", method)] if method else []
    if dataset:
        overlays = (
            overlays + [overlay("datasets", dataset)] if method_first else [overlay("datasets", dataset), *overlays]
        )
    files += overlays
    if paper:
        files.append(overlay("paper", f"{method}_{dataset}"))
    if profile:
        files.append(overlay("profiles", f"{method}_{dataset}"))
        extra = CONFIGS / "profiles" / f"{method}_{dataset}_{variant}.yaml"
        if variant != "2d" and extra.is_file():
            files.append(extra)
    return files


def variant_overrides(variant: str, context_slices: int = 1) -> dict[str, Any]:
    """The overrides that select a variant: 2.5-D context slices as channels, or 3-D networks."""
    if variant == "2.5d":
        return {"context_slices": context_slices}
    if variant == "3d":
        return {"spatial_dims": 3}
    return {}


def compose(files: Sequence[str | os.PathLike], overrides: Mapping[str, Any] | None = None) -> ConfigParser:
    """The files merged as ``monai.bundle run --config_file [...]`` merges them, the macros resolved from the bundle
    root (so the content is self-contained and can be written out as one file), then ``overrides`` set.

    Unlike MONAI's own merge, a nested key (``network_def#num_channels``), in a later file or in ``overrides``, also
    reaches a slot that the bases take by macro: the macro is resolved first. (On the command line, name the method
    overlay before a file or override that changes one of its nested settings.)"""
    parser = ConfigParser(config={})
    with contextlib.chdir(BUNDLE_ROOT):
        for path in files:
            for key, value in ConfigParser.load_config_file(str(path)).items():
                if _into_macro(parser, key):  # a nested key into a slot still taken by macro: take it first
                    parser.resolve_macro_and_relative_ids()
                merge_kv(parser, key, value)
        parser.resolve_macro_and_relative_ids()
    for key, value in (overrides or {}).items():  # after the macros: a nested key reaches a default slot's content
        parser[key] = value
    return parser


def _into_macro(parser: ConfigParser, key: str) -> bool:
    """Whether ``key`` is nested (``a#b``) inside a top-level value that is still a macro string."""
    ids = ReferenceResolver.normalize_id(key.removeprefix("+")).split(ReferenceResolver.sep)
    parent = parser.get().get(ids[0]) if len(ids) > 1 else None
    return isinstance(parent, str) and parent.startswith("%")


def bundle_command(
    run_id: str,
    files: Sequence[str | os.PathLike],
    overrides: Mapping[str, Any] | None = None,
    nproc_per_node: int | None = None,
) -> list[str]:
    """``python -m monai.bundle run <run_id> --config_file [...] --key value ...`` (under ``torchrun`` with
    ``nproc_per_node`` processes when given); run it from :data:`BUNDLE_ROOT`."""
    launcher = [sys.executable]
    if nproc_per_node is not None:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc_per_node)]
    cmd = [
        *launcher,
        "-m",
        "monai.bundle",
        "run",
        run_id,
        "--config_file",
        "[" + ",".join(f"'{f}'" for f in files) + "]",
    ]
    for key, value in (overrides or {}).items():
        cmd += [f"--{key}", str(value)]
    return cmd


def run_bundle(
    run_id: str,
    files: Sequence[str | os.PathLike],
    overrides: Mapping[str, Any] | None = None,
    *,
    nproc_per_node: int | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    **popen: Any,
) -> subprocess.CompletedProcess:
    """Run one bundle workflow in a fresh process from the bundle root; ``popen`` goes to :func:`subprocess.run`
    (e.g. ``stdout=``, ``capture_output=True``, ``text=True``)."""
    cmd = bundle_command(run_id, files, overrides, nproc_per_node)
    return subprocess.run(cmd, cwd=BUNDLE_ROOT, env={**os.environ, **(env or {})}, timeout=timeout, **popen)
