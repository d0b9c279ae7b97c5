"""A bundle the MONAI ecosystem accepts: metadata on the 20240725 schema, and a deployable segmenter that passes the
model zoo's shape check, exports to TorchScript (MONAI's ``ckpt_export``) and to ONNX (run by onnxruntime), each
reproducing the eager ensemble output."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out
from workflow_matrix import CONFIGS, TINY_METHOD

pytestmark = pytest.mark.usefixtures("one_thread")
META = CONFIGS / "metadata.json"
SCHEMA_KEYS = (
    "version",
    "changelog",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
)
FORMAT_KEYS = (
    "type",
    "format",
    "num_channels",
    "spatial_shape",
    "dtype",
    "value_range",
    "is_patch_data",
    "channel_def",
)


def test_metadata_is_on_the_current_schema_with_every_required_key():
    meta = json.loads(META.read_text())
    assert meta["schema"].endswith("/meta_schema_20240725.json")
    missing = [k for k in SCHEMA_KEYS if k not in meta]
    assert not missing, missing
    assert meta["version"] in meta["changelog"]
    assert meta["monai_version"] == importlib_metadata.version("monai")
    assert meta["supported_apps"] == {"monai-label": "0.8.5"}
    for kind in ("inputs", "outputs"):
        for name, entry in meta["network_data_format"][kind].items():
            assert not [k for k in FORMAT_KEYS if k not in entry], (kind, name)
    assert all(isinstance(v, float) and 0 < v <= 1 for v in meta["eval_metrics"].values())


def _name(requirement: str) -> str:
    return re.split(r"[ ;<>=!\[~(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _requirements_of(roots: set[str]) -> set[str]:
    """The installed distributions that ``roots`` require, transitively (extras left out)."""
    seen, stack = set(), list(roots)
    while stack:
        try:
            requires = importlib_metadata.requires(stack.pop()) or []
        except importlib_metadata.PackageNotFoundError:
            continue
        for dep in (_name(r) for r in requires if "extra ==" not in r):
            if dep not in seen:
                seen.add(dep)
                stack.append(dep)
    return seen


def test_every_package_that_import_bundle_needs_is_listed():
    """The project's runtime dependencies are all in ``required_packages_version`` (torch, MONAI and NumPy have their
    own keys), and a fresh ``import bundle`` loads no third-party distribution that is neither one of them nor
    required by one of them."""
    import tomllib

    meta = json.loads(META.read_text())
    listed = {_name(n) for n in meta["required_packages_version"]} | {"torch", "monai", "numpy"}
    project = tomllib.loads((CONFIGS.parent / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]}
    assert declared <= listed, f"dependencies missing from the metadata: {sorted(declared - listed)}"
    code = (
        "import sys, json, importlib.metadata as m; import bundle; owners = m.packages_distributions(); "
        "mods = {n.split('.')[0] for n in sys.modules} - set(sys.stdlib_module_names); "
        "print(json.dumps(sorted({d for n in mods for d in owners.get(n, [])})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = {_name(d) for d in json.loads(out.strip().splitlines()[-1])} - {_name(project["name"])}
    unexplained = loaded - listed - _requirements_of(listed)
    assert not unexplained, f"import bundle loads undeclared packages: {sorted(unexplained)}"


def test_the_deployable_segmenter_passes_the_zoo_shape_check():
    verify_net_in_out(
        net_id="deploy_network_def", meta_file=str(META), config_file=str(CONFIGS / "inference.yaml"), device="cpu"
    )


def _deployable(tmp_path: Path, method: str, **overrides):
    """The inference composition of ``method`` with the matrix test's tiny networks (and ``overrides``), its
    deployable module and a model.pt."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "inference.yaml"), str(CONFIGS / "methods" / f"{method}.yaml")])
    settings = {**TINY_METHOD[method], "bundle_root": str(tmp_path), "num_generations": 3, **overrides}
    for key, value in settings.items():
        parser[key] = value
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    with torch.no_grad():  # zero-initialised output layers would make every sample the same
        for p in network.parameters():
            if p.ndim > 1 and float(p.abs().sum()) == 0:
                p.normal_(0, 0.05)
    model = tmp_path / "model.pt"
    torch.save(network.state_dict(), model)
    deploy = parser.get_parsed_content("deploy_network_def", instantiate=True)
    deploy.load_state_dict(torch.load(model, weights_only=True))
    return parser, deploy.eval(), model


@torch.no_grad()
def test_deployed_output_is_the_ensemble_mean_and_uncertainty_of_fixed_noise(tmp_path):
    _, deploy, _ = _deployable(tmp_path, "cdal")
    images = torch.randn(2, 3, 64, 64)
    out = deploy(images)
    assert out.shape == (2, 2, 64, 64) and out.dtype == torch.float32
    mean, uncertainty = out[:, :1], out[:, 1:]
    assert 0 <= float(mean.min()) and float(mean.max()) <= 1 and float(mean.std()) > 0
    assert 0 < float(uncertainty.max()) <= 0.5
    torch.testing.assert_close(deploy(images), out)  # the noise is fixed: a pure function of the image
    torch.testing.assert_close(deploy(images[1:]), out[1:])  # and of the image alone, not of its batch
    with pytest.raises(ValueError, match="windows"):
        deploy(torch.randn(1, 3, 32, 32))


def test_torchscript_export_reproduces_the_eager_output(tmp_path):
    parser, deploy, model = _deployable(tmp_path, "cdal")
    config = tmp_path / "inference.yaml"
    ConfigParser.export_config_file(parser.get(), str(config), fmt="yaml", sort_keys=False)
    exported = tmp_path / "model.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt_export(
            net_id="deploy_network_def",
            filepath=str(exported),
            ckpt_file=str(model),
            meta_file=str(META),
            config_file=str(config),
            use_trace=True,
            bundle_root=str(tmp_path),
        )
    loaded = torch.jit.load(str(exported))
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), deploy(images), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["cdal", "segdiff"])
def test_onnx_export_runs_under_onnxruntime_with_the_same_output(tmp_path, method):
    onnxruntime = pytest.importorskip("onnxruntime")
    # cDAL at its fewest steps (T = 2, the paper's range is 2-4): the exporter unrolls every step of every window,
    # and the step count changes the graph's length, not the operators it must translate
    _, deploy, _ = _deployable(tmp_path, method, **({"num_timesteps": 2} if method == "cdal" else {}))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = deploy(images).numpy()
    path = tmp_path / f"{method}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            deploy,
            (images,),
            str(path),
            opset_version=18,
            dynamo=True,
            input_names=["image"],
            output_names=["pred"],
            dynamic_shapes={"image": {0: torch.export.Dim("batch", max=64)}},
            verbose=False,
        )
    session = onnxruntime.InferenceSession(str(path))
    for batch in (images, images[:1]):
        got = session.run(None, {"image": batch.numpy()})[0]
        assert np.abs(got - expected[: len(batch)]).max() < 1e-4
