"""A real MONAI Label server on loopback serving freshly trained bundles and the shipped models (apps/monailabel).

Marked ``monailabel``: not in the default run (``-m "not monailabel"`` in pyproject); ``.ci/run`` runs it after the
main suite. It builds or reuses MONAI Label's own virtual environment (tools/monailabel_env.sh; the path comes
from ``MONAILABEL_VENV``, default ``.venv-monailabel``), trains a cDAL MoNuSeg-format model (built-in synthetic
tiles) and a chest X-ray U-Net (the radiographs of ../shared/data but one) for a few iterations with the bundle's
own training workflow and exports them with tools/export_monailabel_bundle.py; the app itself exports the
repository's shipped Hippocampus cDAL models (2-D and 3-D) at start-up. It starts ``monailabel start_server`` on
127.0.0.1, and then, through HTTP and MONAI Label's own Python client: reads /info; infers a MoNuSeg tile, a
radiograph and a Hippocampus volume from ../shared/data (the real files; synthetic ones in the same formats when
../shared/data is absent, said in the test output) by datastore id and by upload, the volume also as NRRD and
MetaImage; checks the labels, their formats and geometry, and the uncertainty maps; asks the uncertainty strategy
for the next image; sends malformed and abusive requests and 20 concurrent ones and checks the server's answers
and memory; and runs a short training request on the datastore's labelled tiles. Request times go to
$MONAILABEL_TIMINGS (JSON) when that is set.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.monailabel
TILE = "TCGA-21-5784-01Z-00-DX1"
TRAIN_TILES = ["TCGA-21-5786-01Z-00-DX1", "TCGA-50-5931-01Z-00-DX1"]
VOLUME = "hippocampus_001"
CXR_OVERRIDES = {"image_size": 128, "patch_size": 128, "batch_size": 4}
TIMINGS: dict[str, float] = {}
THREADS = os.environ.get("OMP_NUM_THREADS", "2")
# the server's limits in this test (the defaults are far larger): the 1000 x 1000 tiles and the volumes pass
MAX_IMAGE_VOXELS = 2_000_000
MAX_UPLOAD_MB = 8
# every method x dataset the bundle trains, besides the trained / shipped models above (monuseg_cdal, cxr_unet,
# hippocampus_cdal[_3d]): exported from untrained weights, so their tests check the serving path of each (label,
# format, uncertainty summary), not its quality; Hippocampus served with whole slices (the fast protocol)
METHOD_CONFIGS = {
    "cdal": [],
    "segdiff": ["methods/segdiff.yaml"],
    "unet": ["methods/unet.yaml"],
    "prob_unet": ["methods/prob_unet.yaml"],
    "mose": ["methods/mose.yaml"],
}
DATASET_OVERRIDES = {"monuseg": {}, "cxr": CXR_OVERRIDES, "lidc": {}, "hippocampus": {"whole_slices": True}}
MATRIX = [
    (dataset, method)
    for dataset in DATASET_OVERRIDES
    for method in METHOD_CONFIGS
    if (dataset, method) not in {("cxr", "unet"), ("hippocampus", "cdal")}
]


# ------------------------------------------------------------------------------------------------ HTTP helpers
def _request(
    url: str,
    method: str = "GET",
    fields: dict | None = None,
    files: dict | None = None,
    body: dict | None = None,
    timeout: float = 600,
):
    """(status, headers, bytes) of a request; multipart form for ``fields``/``files``, JSON for ``body``."""
    data, headers = None, {}
    if fields is not None or files is not None:
        boundary = uuid.uuid4().hex
        parts = []
        for name, value in (fields or {}).items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        for name, path in (files or {}).items():
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{Path(path).name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n".encode()
                + Path(path).read_bytes()
                + b"\r\n"
            )
        data = b"".join(parts) + f"--{boundary}--\r\n".encode()
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    elif body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def _multipart(headers: dict, payload: bytes) -> dict[str, bytes]:
    """Parts of a multipart response by field name (MONAI Label's ``output=all``: params + image)."""
    content_type = headers.get("content-type") or headers.get("Content-Type")
    boundary = content_type.split("boundary=")[1].strip().encode()
    parts = {}
    for chunk in payload.split(b"--" + boundary):
        if b"\r\n\r\n" not in chunk:
            continue
        head, content = chunk.split(b"\r\n\r\n", 1)
        name = head.split(b'name="')[1].split(b'"')[0].decode()
        parts[name] = content.rstrip(b"\r\n")
    return parts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(name: str, fn):
    start = time.perf_counter()
    result = fn()
    TIMINGS[name] = round(time.perf_counter() - start, 2)
    return result


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def monailabel_venv() -> Path:
    venv = Path(os.environ.get("MONAILABEL_VENV", REPO / ".venv-monailabel"))
    proc = subprocess.run(
        ["bash", str(REPO / "tools" / "monailabel_env.sh"), str(venv)], capture_output=True, text=True, timeout=3600
    )
    assert proc.returncode == 0, (
        f"building MONAI Label's environment failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    assert (venv / "bin" / "monailabel").exists()
    return venv


def _train(root: Path, configs: list[str], overrides: dict) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        "[" + ",".join(f"'{REPO / 'configs' / c}'" for c in configs) + "]",
        "--bundle_root",
        str(root),
    ]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": THREADS, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, f"training failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    model = root / "models" / "model.pt"
    assert model.is_file()
    return model


def _export_untrained(dataset: str, method: str, output: Path, work: Path) -> None:
    """``method`` on ``dataset`` exported with freshly initialised weights (tools/export_monailabel_bundle.py)."""
    import importlib.util

    import torch
    from monai.bundle import ConfigParser

    spec = importlib.util.spec_from_file_location("export_ml", REPO / "tools" / "export_monailabel_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    overrides = DATASET_OVERRIDES[dataset]
    parser = ConfigParser()
    configs = ["inference.yaml", *METHOD_CONFIGS[method], f"datasets/{dataset}.yaml", "monailabel/infer.yaml"]
    parser.read_config([str(REPO / "configs" / c) for c in configs])
    for key, value in overrides.items():
        parser[key] = value
    torch.manual_seed(0)
    weights = work / f"untrained_{dataset}_{method}.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), weights)
    module.export(dataset, weights, output, method_configs=METHOD_CONFIGS[method], overrides=overrides)


def _export(dataset: str, checkpoint: Path, output: Path, *extra: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "export_monailabel_bundle.py"),
            "--dataset",
            dataset,
            "--checkpoint",
            str(checkpoint),
            "--output",
            str(output),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def source_files(tmp_path_factory) -> dict:
    """The tile, its label, two labelled training tiles and the volume: real ones when ../shared/data exists."""
    shared = REPO.parent / "shared" / "data"
    monuseg, hippo = shared / "monuseg" / "MoNuSegTrainingData", shared / "hippocampus" / "Task04_Hippocampus"
    if monuseg.is_dir() and hippo.is_dir():
        files = {
            "real": True,
            "tile": monuseg / "Tissue_Images" / f"{TILE}.tif",
            "tile_mask": monuseg / "Binary_masks" / f"{TILE}.png",
            "train": [
                (monuseg / "Tissue_Images" / f"{t}.tif", monuseg / "Binary_masks" / f"{t}.png") for t in TRAIN_TILES
            ],
            "volume": hippo / "imagesTr" / f"{VOLUME}.nii.gz",
            "volume_label": hippo / "labelsTr" / f"{VOLUME}.nii.gz",
            "cxr": shared / "cxr" / "Lung_Segmentation",
            "radiograph": "CHNCXR_0010_0",  # held out of the U-Net's training radiographs
        }
    else:  # same formats, written by the bundle's generators (MoNuSeg TIFF + Aperio XML; MSD NIfTI)
        from bundle.data.hippocampus import write_synthetic_hippocampus
        from bundle.data.synthetic import write_synthetic_monuseg

        root = tmp_path_factory.mktemp("synthetic_sources")
        write_synthetic_monuseg(root / "monuseg", num_train=3, num_test=0, size=512, seed=11)
        tiles = sorted((root / "monuseg").rglob("*.tif"))
        xmls = {p.stem: p for p in (root / "monuseg").rglob("*.xml")}
        msd = write_synthetic_hippocampus(root / "msd", num_cases=1, seed=5)
        vol = sorted((msd / "imagesTr").glob("*.nii.gz"))[0]
        from bundle.data.cxr import write_synthetic_cxr

        cxr = write_synthetic_cxr(root / "cxr", num_shenzhen=10, num_montgomery=0, size=256, seed=3)
        files = {
            "real": False,
            "cxr": cxr,
            "radiograph": sorted(p.stem for p in (cxr / "CXR_png").glob("*.png"))[-1],
            "tile": tiles[0],
            "tile_mask": xmls[tiles[0].stem],
            "train": [(t, xmls[t.stem]) for t in tiles[1:3]],
            "volume": vol,
            "volume_label": msd / "labelsTr" / vol.name,
        }
    print(
        f"MONAI Label test inputs: {'real files from ../shared/data' if files['real'] else 'synthetic (no ../shared/data)'}"
    )
    return files


@pytest.fixture(scope="module")
def server(monailabel_venv, source_files, tmp_path_factory):
    work = tmp_path_factory.mktemp("monailabel")
    # a MoNuSeg-format bundle trained briefly by the bundle's own training workflow; the Hippocampus bundle is the
    # repository's shipped model (pretrained/hippocampus_cdal), which the app exports itself at start-up
    m_run = work / "train_monuseg"
    m_run.mkdir()
    monuseg_model = _train(
        m_run,
        ["train.yaml"],
        {
            "dataset_root": "$bundle.data.synthetic.ensure_synthetic_monuseg(@dataset_dir, num_train=8, num_test=2, "
            "size=256, seed=0)",
            "max_epochs": 2,
            "epoch_length": 20,
            "val_interval": 2,
            "num_generations": 2,
            "val_fraction": 0.25,
        },
    )
    bundles = work / "bundles"
    _export("synthetic", monuseg_model, bundles / "monuseg_cdal")
    # a chest X-ray U-Net (not a diffusion model), trained briefly on the radiographs except the served one
    cxr_data = work / "cxr_data"
    for sub in ("CXR_png", "masks"):
        (cxr_data / sub).mkdir(parents=True)
        for f in (source_files["cxr"] / sub).iterdir():
            if not f.name.startswith(source_files["radiograph"]):
                shutil.copy(f, cxr_data / sub / f.name)
    u_run = work / "train_cxr_unet"
    u_run.mkdir()
    unet_model = _train(
        u_run,
        ["train.yaml", "methods/unet.yaml", "datasets/cxr.yaml"],
        {"dataset_dir": cxr_data, "max_epochs": 10, "epoch_length": 20, "val_interval": 5, **CXR_OVERRIDES},
    )
    _export(
        "cxr", unet_model, bundles / "cxr_unet", "--method_configs", "methods/unet.yaml",
        "--set", *(f"{k}={v}" for k, v in CXR_OVERRIDES.items()),
    )  # fmt: skip

    for dataset, method in MATRIX:
        _export_untrained(dataset, method, bundles / f"x_{dataset}_{method}", work)

    studies = work / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    shutil.copy(source_files["tile"], studies / f"{TILE}.tif")
    for i, (image, label) in enumerate(source_files["train"]):
        name = TRAIN_TILES[i]
        shutil.copy(image, studies / f"{name}.tif")
        shutil.copy(label, studies / "labels" / "final" / f"{name}{''.join(Path(label).suffixes)}")
    shutil.copy(source_files["volume"], studies / f"{VOLUME}.nii.gz")
    radiograph = source_files["radiograph"]
    shutil.copy(source_files["cxr"] / "CXR_png" / f"{radiograph}.png", studies / f"{radiograph}.png")

    port = _free_port()
    env = {
        **os.environ,
        "PATH": f"{monailabel_venv / 'bin'}:{os.environ['PATH']}",
        "OMP_NUM_THREADS": THREADS,
        "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false",
        "PYTHONWARNINGS": "ignore",
    }
    env.pop("PYTHONPATH", None)
    log = open(work / "server.log", "w")
    cmd = [
        "monailabel",
        "start_server",
        "--app",
        str(REPO / "apps" / "monailabel"),
        "--studies",
        str(studies),
        "--conf",
        "bundles",
        str(bundles),
        "--conf",
        "zoo_source",
        "github",
        "--conf",
        "max_image_voxels",
        str(MAX_IMAGE_VOXELS),
        "--conf",
        "max_upload_mb",
        str(MAX_UPLOAD_MB),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            if proc.poll() is not None:
                break
            try:
                if _request(f"{url}/info/", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        TIMINGS["server_start"] = round(time.perf_counter() - start, 1)
        assert proc.poll() is None, f"server exited:\n{(work / 'server.log').read_text()[-5000:]}"
        yield {
            "url": url,
            "pid": proc.pid,
            "studies": studies,
            "bundles": bundles,
            "log": work / "server.log",
            **source_files,
        }
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()
        if os.environ.get("MONAILABEL_TIMINGS"):
            Path(os.environ["MONAILABEL_TIMINGS"]).write_text(
                json.dumps({"inputs": "real" if source_files["real"] else "synthetic", **TIMINGS}, indent=2)
            )


# ------------------------------------------------------------------------------------------------------ tests
def _read_png(payload: bytes) -> np.ndarray:
    from PIL import Image

    return np.array(Image.open(io.BytesIO(payload)))


def _read_nifti(payload: bytes, tmp: Path):
    import nibabel as nib

    path = tmp / f"{uuid.uuid4().hex}.nii.gz"
    path.write_bytes(payload)
    image = nib.load(path)
    return image, np.asarray(image.dataobj)


def _offline_tile_mask(bundle: Path, tile: Path, generations: int) -> np.ndarray:
    """The exported bundle's inference config run in this process (no server): the mask of ``tile``."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.yaml"))
    parser["bundle_root"], parser["num_generations"], parser["device"] = str(bundle), generations, "$'cpu'"
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    network.eval()
    data = parser.get_parsed_content("preprocessing")({"image": str(tile)})
    with torch.no_grad():
        out = parser.get_parsed_content("inferer")(data["image"][None], network)
    data["pred"] = {k: v[0] for k, v in out.items()}
    data = parser.get_parsed_content("postprocessing")(data)
    return np.rint(np.asarray(data["pred"][0])).astype(np.uint8)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def test_info_lists_every_model_with_its_dimension(server):
    status, _, body = _request(f"{server['url']}/info/")
    assert status == 200
    info = json.loads(body)
    models = info["models"]
    trained = {"monuseg_cdal", "hippocampus_cdal", "hippocampus_cdal_3d", "cxr_unet"}
    matrix = {f"x_{d}_{m}": d for d, m in MATRIX}
    assert set(models) == trained | set(matrix)
    assert all(models[name]["dimension"] == (3 if d == "hippocampus" else 2) for name, d in matrix.items())
    assert models["cxr_unet"]["dimension"] == 2 and models["cxr_unet"]["labels"] == {"lung": 1}
    assert models["monuseg_cdal"]["dimension"] == 2 and models["monuseg_cdal"]["labels"] == {"nucleus": 1}
    assert models["hippocampus_cdal"]["dimension"] == 3
    assert models["hippocampus_cdal"]["labels"] == {"anterior": 1, "posterior": 2}
    assert models["monuseg_cdal"]["config"]["num_generations"] == 5  # the few-step cDAL default ensemble
    assert models["hippocampus_cdal_3d"]["dimension"] == 3
    # the fast protocol is an option of the slice-wise volume models only, with the bundle's value as default
    assert models["hippocampus_cdal"]["config"]["whole_slices"] is False
    assert models["x_hippocampus_segdiff"]["config"]["whole_slices"] is True  # exported with whole_slices true
    assert "whole_slices" not in models["monuseg_cdal"]["config"]
    assert "whole_slices" not in models["hippocampus_cdal_3d"]["config"]
    assert "whole_slices" in models["hippocampus_cdal"]["description"]
    assert set(info["trainers"]) == trained | set(matrix)
    assert set(info["strategies"]) == {"uncertain", "random", "first"}
    assert set(info["scoring"]) == {"uncertainty"}


def test_tile_inference_returns_a_binary_label_and_stores_the_uncertainty(server, tmp_path):
    from PIL import Image

    url = f"{server['url']}/infer/monuseg_cdal?image={TILE}&output=all"
    status, headers, body = _timed(
        "infer_tile_N3", lambda: _request(url, "POST", fields={"params": json.dumps({"num_generations": 3})})
    )
    assert status == 200, body[:500]
    parts = _multipart(headers, body)
    params = json.loads(parts["params"])
    label = _read_png(parts["image"])
    height, width = Image.open(server["tile"]).size[::-1]
    assert label.shape == (height, width) and label.dtype == np.uint8
    assert set(np.unique(label)) <= {0, 1}
    assert params["num_generations"] == 3 and params["sampling_steps"] == 4
    # the server's label is the bundle's own inference of that file (same seed and file name, so the same noise)
    offline = _offline_tile_mask(server["bundles"] / "monuseg_cdal", server["studies"] / f"{TILE}.tif", 3)
    assert offline.shape == label.shape
    assert (offline == label).mean() > 0.999
    # the uncertainty map sits in the datastore next to the image's labels, under its own tag
    u = params["uncertainty"]
    assert u["tag"] == "uncertainty" and 0 < u["mean"] < u["max"] <= 0.5
    status, _, payload = _request(f"{server['url']}/datastore/label?label={TILE}&tag=uncertainty")
    assert status == 200
    stored = np.array(Image.open(io.BytesIO(payload)))
    assert stored.shape == (height, width) and stored.dtype == np.float32
    assert stored.min() >= 0 and abs(float(stored.mean()) - u["mean"]) < 1e-5
    # the ensemble size changes the result's spread, and the default (5) is used when the request says nothing
    status, _, body5 = _timed(
        "infer_tile_N5", lambda: _request(f"{server['url']}/infer/monuseg_cdal?image={TILE}&output=json", "POST")
    )
    assert status == 200 and json.loads(body5)["num_generations"] == 5
    if server["real"]:
        truth = np.array(Image.open(server["tile_mask"])) > 0
        TIMINGS["tile_dice_vs_binary_mask"] = round(_dice(label > 0, truth), 4)


def test_uploaded_tile_is_inferred_without_touching_the_datastore(server):
    url = f"{server['url']}/infer/monuseg_cdal?output=image"
    status, _, body = _timed("infer_tile_upload", lambda: _request(url, "POST", files={"file": server["tile"]}))
    assert status == 200, body[:500]
    label = _read_png(body)
    assert label.ndim == 2 and set(np.unique(label)) <= {0, 1}


def test_a_radiograph_is_served_by_the_unet(server, tmp_path):
    """A model that is not a diffusion ensemble (the U-Net: one deterministic generation) on a real chest X-ray."""
    from PIL import Image

    radiograph = server["radiograph"]
    url = f"{server['url']}/infer/cxr_unet?image={radiograph}&output=all"
    status, headers, body = _timed("infer_radiograph_unet", lambda: _request(url, "POST"))
    assert status == 200, body[:500]
    parts = _multipart(headers, body)
    params, label = json.loads(parts["params"]), _read_png(parts["image"])
    source = Image.open(server["cxr"] / "CXR_png" / f"{radiograph}.png")
    assert label.shape == source.size[::-1] and set(np.unique(label)) <= {0, 1}
    assert params["num_generations"] == 1 and params["sampling_steps"] is None
    assert params["uncertainty"]["max"] == 0.0  # one deterministic generation: no spread
    truth = np.array(Image.open(server["cxr"] / "masks" / f"{radiograph}_mask.png")) > 127
    dice = _dice(label > 0, truth)
    TIMINGS["radiograph_unet_dice"] = round(dice, 4)
    if server["real"]:  # 200 iterations on the other radiographs at 128 x 128 (validation Dice 0.87 offline)
        assert dice > 0.7, dice


def test_the_shipped_model_is_exported_at_start_up(server):
    bundle = server["bundles"] / "hippocampus_cdal"
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata["monailabel"]["source_checkpoint"].endswith("pretrained/hippocampus_cdal/model.pt")
    assert "exported the shipped model hippocampus_cdal" in server["log"].read_text()


def _infer_volume(server, tmp_path, timing: str, params: dict) -> tuple:
    """The shipped 2-D model on the datastore's volume: (label, its result JSON, the reference image, the truth);
    the label checked to be in the input's grid."""
    import nibabel as nib

    url = f"{server['url']}/infer/hippocampus_cdal?image={VOLUME}&output=all"
    fields = {"params": json.dumps(params)}
    status, headers, body = _timed(timing, lambda: _request(url, "POST", fields=fields))
    assert status == 200, body[:500]
    parts = _multipart(headers, body)
    image, label = _read_nifti(parts["image"], tmp_path)
    reference = nib.load(server["volume"])
    assert label.shape == reference.shape and np.allclose(image.affine, reference.affine)
    assert set(np.unique(label)) <= {0, 1, 2}
    truth = np.asarray(nib.load(server["volume_label"]).dataobj)
    return label, json.loads(parts["params"]), reference, truth


def test_volume_inference_returns_labels_in_the_input_grid(server, tmp_path):
    label, params, reference, truth = _infer_volume(server, tmp_path, "infer_volume_N2", {"num_generations": 2})
    assert params["num_generations"] == 2  # as requested (the shipped model's default is 5)
    assert params["whole_slices"] is False  # the paper protocol unless the request asks
    assert params["uncertainty"]["tag"] == "uncertainty" and params["uncertainty"]["max"] <= 0.5
    status, _, payload = _request(f"{server['url']}/datastore/label?label={VOLUME}&tag=uncertainty")
    assert status == 200
    u_image, u = _read_nifti(payload, tmp_path)
    assert u.shape == reference.shape and u.dtype == np.float32 and np.allclose(u_image.affine, reference.affine)
    TIMINGS["volume_dice_anterior"] = round(_dice(label == 1, truth == 1), 4)
    TIMINGS["volume_dice_posterior"] = round(_dice(label == 2, truth == 2), 4)
    if server["real"]:  # hippocampus_001 is in fold 0, which the shipped model never trained on
        assert min(TIMINGS["volume_dice_anterior"], TIMINGS["volume_dice_posterior"]) > 0.75, TIMINGS


def test_whole_slices_per_request_is_the_fast_protocol(server, tmp_path):
    request = {"num_generations": 2, "whole_slices": True}
    label, params, _, truth = _infer_volume(server, tmp_path, "infer_volume_N2_whole_slices", request)
    assert params["whole_slices"] is True and params["num_generations"] == 2
    dice = [_dice(label == c, truth == c) for c in (1, 2)]
    TIMINGS["volume_whole_slices_dice"] = [round(d, 4) for d in dice]
    if server["real"]:  # fold 0: never trained on
        assert min(dice) > 0.75, dice
    # a value that is not a switch, and the switch where it does not apply: 422 naming it; then the next works
    for model, image, value, words in [
        ("hippocampus_cdal", VOLUME, "maybe", ["whole_slices must be true or false", "maybe"]),
        ("hippocampus_cdal_3d", VOLUME, True, ["whole_slices applies to volumes inferred slice by slice", "3-D"]),
        ("monuseg_cdal", TILE, "true", ["whole_slices", "monuseg_cdal", "2-D images"]),
    ]:
        fields = {"params": json.dumps({"num_generations": 1, "whole_slices": value})}
        code, _, body = _request(f"{server['url']}/infer/{model}?image={image}&output=json", "POST", fields=fields)
        assert code == 422, (model, body[:300])
        detail = json.loads(body)["detail"]
        assert all(w in detail for w in words), detail
    fields = {"params": json.dumps({"num_generations": 1, "whole_slices": "false"})}
    code, _, body = _request(
        f"{server['url']}/infer/hippocampus_cdal?image={VOLUME}&output=json", "POST", fields=fields
    )
    assert code == 200 and json.loads(body)["whole_slices"] is False


def test_the_3d_model_returns_labels_in_the_input_grid(server, tmp_path):
    import nibabel as nib

    url = f"{server['url']}/infer/hippocampus_cdal_3d?image={VOLUME}&output=image"
    fields = {"params": json.dumps({"num_generations": 2})}
    status, _, body = _timed("infer_volume_3d_N2", lambda: _request(url, "POST", fields=fields))
    assert status == 200, body[:500]
    image, label = _read_nifti(body, tmp_path)
    reference = nib.load(server["volume"])
    assert label.shape == reference.shape and np.allclose(image.affine, reference.affine)
    truth = np.asarray(nib.load(server["volume_label"]).dataobj)
    dice = [_dice(label == c, truth == c) for c in (1, 2)]
    TIMINGS["volume_3d_dice"] = [round(d, 4) for d in dice]
    if server["real"]:  # hippocampus_001 is in fold 0, which the shipped 3-D model never trained on
        assert min(dice) > 0.75, dice


def _as_itk_upload(path: Path, source: Path):
    """The NIfTI ``source`` as a NRRD / MetaImage file (by ``path``'s suffix) with its orientation and another
    origin."""
    import itk
    import nibabel as nib

    array = np.asarray(nib.load(source).dataobj).astype(np.float32)
    image = itk.image_from_array(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    image.SetOrigin((-40.0, 25.0, 7.5))
    # the NIfTI's RAS axes in ITK's LPS frame: the same anatomy, seen from a viewer's origin
    image.SetDirection(itk.matrix_from_array(np.diag([-1.0, -1.0, 1.0])))
    itk.imwrite(image, str(path), compression=True)
    return path


@pytest.mark.parametrize(("suffix", "asked"), [(".nrrd", None), (".mha", ".nii.gz")])
def test_a_volume_uploaded_as_nrrd_or_metaimage_comes_back_in_its_format_and_geometry(server, tmp_path, suffix, asked):
    import itk

    upload = _as_itk_upload(tmp_path / f"scan{suffix}", server["volume"])
    params = {"num_generations": 1, **({"result_extension": asked} if asked else {})}
    url = f"{server['url']}/infer/hippocampus_cdal_3d?output=image"
    status, headers, body = _timed(
        f"infer_volume_3d_{suffix[1:]}_N1",
        lambda: _request(url, "POST", fields={"params": json.dumps(params)}, files={"file": upload}),
    )
    assert status == 200, body[:500]
    expected = asked or suffix
    disposition = headers.get("content-disposition") or headers.get("Content-Disposition")
    assert disposition.rstrip('"').endswith(expected), disposition
    returned = tmp_path / f"label{expected}"
    returned.write_bytes(body)
    reference = itk.imread(str(upload))
    if expected == ".nii.gz":  # asked for NIfTI: the RAS affine of the upload, as MONAI's readers give it
        from monai.data import ITKReader

        reader = ITKReader()
        _, meta = reader.get_data(reader.read(str(upload)))
        image, label = _read_nifti(body, tmp_path)
        assert np.allclose(image.affine, meta["original_affine"])
    else:
        image = itk.imread(str(returned))
        assert tuple(itk.size(image)) == tuple(itk.size(reference))
        assert np.allclose(image.GetOrigin(), reference.GetOrigin())
        assert np.allclose(image.GetSpacing(), reference.GetSpacing())
        assert np.allclose(itk.array_from_matrix(image.GetDirection()), itk.array_from_matrix(reference.GetDirection()))
        label = np.transpose(itk.array_from_image(image), (2, 1, 0))
    import nibabel as nib

    truth = np.asarray(nib.load(server["volume_label"]).dataobj)
    dice = [_dice(label == c, truth == c) for c in (1, 2)]
    TIMINGS[f"volume_3d_{suffix[1:]}_dice"] = [round(d, 4) for d in dice]
    if server["real"]:
        assert min(dice) > 0.75, dice


@pytest.mark.parametrize(("dataset", "method"), MATRIX, ids=[f"{d}-{m}" for d, m in MATRIX])
def test_every_method_on_every_dataset_is_served(server, tmp_path, dataset, method):
    """Each export answers an upload of its dataset's kind with a label of the input's size and the label values
    the model has, and the uncertainty summary (the untrained weights make the content arbitrary)."""
    import nibabel as nib
    from PIL import Image

    radiograph = Image.open(server["cxr"] / "CXR_png" / f"{server['radiograph']}.png")
    if dataset == "monuseg":
        upload, shape = tmp_path / "tile.tif", (256, 256)
        Image.fromarray(np.array(Image.open(server["tile"]).convert("RGB"))[:256, :256]).save(upload)
    elif dataset == "cxr":
        upload, shape = server["cxr"] / "CXR_png" / f"{server['radiograph']}.png", radiograph.size[::-1]
    elif dataset == "lidc":  # a 128 x 128 grey crop, as the LIDC crops are stored
        upload, shape = tmp_path / "crop.jpg", (128, 128)
        radiograph.convert("L").resize((128, 128)).save(upload)
    else:
        upload, shape = server["volume"], nib.load(server["volume"]).shape
    generations = 1 if method == "unet" else 2
    url = f"{server['url']}/infer/x_{dataset}_{method}?output=all"
    status, headers, body = _timed(
        f"infer_untrained_{dataset}_{method}",
        lambda: _request(url, "POST", fields={"params": json.dumps({"num_generations": generations})},
                         files={"file": upload}),
    )  # fmt: skip
    assert status == 200, body[:500]
    parts = _multipart(headers, body)
    params = json.loads(parts["params"])
    label = _read_nifti(parts["image"], tmp_path)[1] if dataset == "hippocampus" else _read_png(parts["image"])
    assert label.shape == tuple(shape), (label.shape, shape)
    assert set(np.unique(label)) <= ({0, 1, 2} if dataset == "hippocampus" else {0, 1})
    assert params["num_generations"] == generations and params["label_values"] == sorted(
        int(v) for v in np.unique(label)
    )
    summary = params["uncertainty"]
    assert 0 <= summary["mean"] <= summary["max"] <= 1 and 0 <= summary["score"] <= 1
    if method == "unet":
        assert summary["max"] == 0.0  # one deterministic generation
    assert (params["sampling_steps"] is not None) == (method in ("cdal", "segdiff"))


# read in MONAI Label's environment (pydicom-seg, SimpleITK): the DICOM SEG's label array, its geometry and the
# instances it references
READ_SEG_SCRIPT = """
import json, sys
import numpy as np, pydicom, pydicom_seg, SimpleITK
seg = pydicom.dcmread(sys.argv[1])
result = pydicom_seg.MultiClassReader().read(seg)
image = result.image
np.save(sys.argv[2], np.transpose(SimpleITK.GetArrayFromImage(image), (2, 1, 0)))
refs = [i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence]
print(json.dumps({"modality": seg.Modality, "sop_class": str(seg.SOPClassUID), "segments": [
    (int(s.SegmentNumber), str(s.SegmentLabel)) for s in seg.SegmentSequence], "origin": image.GetOrigin(),
    "spacing": image.GetSpacing(), "direction": image.GetDirection(), "references": sorted(refs)}))
"""


@pytest.mark.parametrize("asked", [None, ".nii.gz"])
def test_a_dicom_series_comes_back_as_a_dicom_seg_in_its_geometry(server, monailabel_venv, tmp_path, asked):
    """A DICOM series (the volume written slice by slice, as a ZIP of its files) -> a DICOM SEG that references its
    instances, in its geometry (or NIfTI in its grid, when asked)."""
    import zipfile

    import itk
    import nibabel as nib
    from dicom_helpers import write_dicom_series

    spacing, origin = (1.0, 1.0, 1.0), (-40.0, 25.0, 7.5)
    series = tmp_path / "series"
    write_dicom_series(np.asarray(nib.load(server["volume"]).dataobj), series, spacing, origin)
    upload = tmp_path / "series.zip"
    with zipfile.ZipFile(upload, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(series.iterdir()):
            zf.write(f, f"{VOLUME}/{f.name}")
    params = {"num_generations": 1, **({"result_extension": asked} if asked else {})}
    status, headers, body = _timed(
        f"infer_volume_3d_dicom_{'seg' if not asked else 'nifti'}_N1",
        lambda: _request(
            f"{server['url']}/infer/hippocampus_cdal_3d?output=image", "POST",
            fields={"params": json.dumps(params)}, files={"file": upload},
        ),
    )  # fmt: skip
    assert status == 200, body[:500]
    disposition = headers.get("content-disposition") or headers.get("Content-Disposition")
    reader = itk.ImageSeriesReader[itk.Image[itk.SS, 3]].New(
        FileNames=[str(f) for f in sorted(series.iterdir())], ImageIO=itk.GDCMImageIO.New()
    )
    reader.Update()
    reference = reader.GetOutput()
    truth = np.asarray(nib.load(server["volume_label"]).dataobj)
    if asked:
        assert disposition.rstrip('"').endswith(".nii.gz"), disposition
        _, label = _read_nifti(body, tmp_path)
    else:
        assert disposition.rstrip('"').endswith(".dcm"), disposition
        (tmp_path / "label.dcm").write_bytes(body)
        run = subprocess.run(
            [str(monailabel_venv / "bin" / "python"), "-c", READ_SEG_SCRIPT, str(tmp_path / "label.dcm"),
             str(tmp_path / "label.npy")],
            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        seg = json.loads(run.stdout.strip().splitlines()[-1])
        assert seg["modality"] == "SEG" and seg["sop_class"] == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
        assert seg["segments"] == [[1, "anterior"], [2, "posterior"]], seg["segments"]
        uids = sorted(f"1.2.826.0.1.3680043.2.1125.7.3.{k + 1}" for k in range(truth.shape[2]))
        assert seg["references"] == uids  # every instance of the series
        assert np.allclose(seg["origin"], reference.GetOrigin()) and np.allclose(seg["spacing"], reference.GetSpacing())
        assert np.allclose(np.reshape(seg["direction"], (3, 3)), itk.array_from_matrix(reference.GetDirection()))
        label = np.load(tmp_path / "label.npy")
    assert label.shape == truth.shape
    dice = [_dice(label == c, truth == c) for c in (1, 2)]
    TIMINGS[f"volume_3d_dicom_{'nifti' if asked else 'seg'}_dice"] = [round(d, 4) for d in dice]
    if server["real"]:
        assert min(dice) > 0.75, dice


@pytest.mark.parametrize(
    ("query", "status", "words"),
    [
        ("monuseg_cdal?image=no_such_image", 404, ["no_such_image", "not in the datastore"]),
        ("no_such_model?image=" + TILE, 404, ["no_such_model"]),
        ("monuseg_cdal?image=" + VOLUME, 422, ["monuseg_cdal", VOLUME, "2-D"]),
        ("hippocampus_cdal?image=" + TILE, 422, ["hippocampus_cdal", "3-D", TILE]),
    ],
)
def test_malformed_requests_get_an_http_error_with_a_message_and_the_server_keeps_serving(server, query, status, words):
    code, _, body = _request(f"{server['url']}/infer/{query}&output=json", "POST")
    assert code == status, body[:500]
    detail = json.loads(body)["detail"]
    assert all(w in detail for w in words), detail
    assert _request(f"{server['url']}/info/")[0] == 200


def test_a_bad_option_is_refused_and_the_next_request_succeeds(server):
    url = f"{server['url']}/infer/monuseg_cdal?image={TILE}&output=json"
    code, _, body = _request(url, "POST", fields={"params": json.dumps({"num_generations": 0})})
    assert code == 422 and "num_generations" in json.loads(body)["detail"]
    code, _, body = _request(url, "POST", fields={"params": json.dumps({"num_generations": 2})})
    assert code == 200 and json.loads(body)["num_generations"] == 2


# ------------------------------------------------------------------------------------------- load and abuse
LOAD: dict = {}


def _server_rss_mb(pid: int) -> float:
    """Resident memory of the server's process session (the server and anything it started), in MB."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) != pid:  # the session id (the server was started in a new session)
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def _tile_result(server, image: str, generations: int):
    url = f"{server['url']}/infer/monuseg_cdal?image={image}&output=all"
    status, headers, body = _request(url, "POST", fields={"params": json.dumps({"num_generations": generations})})
    if status != 200:
        return status, None, body
    parts = _multipart(headers, body)
    return status, _read_png(parts["image"]), json.loads(parts["params"])


LOAD_CASES = [(image, n) for image in (TILE, *TRAIN_TILES) for n in (1, 2)]


def test_twenty_concurrent_requests_complete_and_none_corrupts_another(server):
    from concurrent.futures import ThreadPoolExecutor

    # each (image, ensemble size) alone first: the same file name and N give the same noise, so the same label
    alone = {}
    for image, n in LOAD_CASES:
        status, label, params = _tile_result(server, image, n)
        assert status == 200, params[:500]
        alone[(image, n)] = (label, params["uncertainty"]["mean"])
    LOAD["rss_baseline_mb"] = _server_rss_mb(server["pid"])
    requests = [LOAD_CASES[i % len(LOAD_CASES)] for i in range(20)]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(lambda case: _tile_result(server, *case), requests))
    TIMINGS["concurrent_20_tiles_s"] = round(time.perf_counter() - start, 1)
    statuses = [r[0] for r in results]
    assert set(statuses) <= {200, 503}, statuses
    served = [(case, r) for case, r in zip(requests, results) if r[0] == 200]
    assert len(served) >= 10, statuses  # refusals are allowed, but the server must not refuse most of the load
    for case, (_, label, params) in served:
        expected, mean = alone[case]
        assert label.shape == expected.shape and np.array_equal(label, expected), case
        assert params["num_generations"] == case[1] and abs(params["uncertainty"]["mean"] - mean) < 1e-7, case
    TIMINGS["concurrent_20_served"] = len(served)


def _four_d_volume(path: Path, source: Path) -> Path:
    import nibabel as nib

    ref = nib.load(source)
    data = np.asarray(ref.dataobj)
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), ref.affine), path)
    return path


def _nan_volume(path: Path, source: Path) -> Path:
    import nibabel as nib

    ref = nib.load(source)
    nib.save(nib.Nifti1Image(np.full(ref.shape, np.nan, np.float32), ref.affine), path)
    return path


def _truncated(path: Path, source: Path) -> Path:
    payload = Path(source).read_bytes()
    path.write_bytes(payload[: len(payload) // 2])
    return path


def _bytes(payload: bytes):
    def make(path: Path, source: Path) -> Path:
        path.write_bytes(payload)
        return path

    return make


def _oversize_tile(path: Path, source: Path) -> Path:
    from PIL import Image

    side = int(np.sqrt(MAX_IMAGE_VOXELS)) + 100  # past the server's limit, under its upload size limit
    Image.fromarray(np.full((side, side, 3), 200, np.uint8)).save(path)
    return path


ABUSE = [
    # (name, model, query or None, upload file maker or None, status, words in the message)
    ("truncated.nii.gz", "hippocampus_cdal", None, _truncated, 422, ["hippocampus_cdal", "uploaded image (.nii.gz)"]),
    ("empty.nii.gz", "hippocampus_cdal", None, _bytes(b""), 422, ["empty (0 bytes)"]),
    ("four_d.nii.gz", "hippocampus_cdal", None, _four_d_volume, 422, ["hippocampus_cdal", "2 channels"]),
    ("nan.nii.gz", "hippocampus_cdal", None, _nan_volume, 422, ["non-finite"]),
    (
        "garbage.png",
        "monuseg_cdal",
        None,
        _bytes(b"GIF89a not an image"),
        422,
        ["monuseg_cdal", "uploaded image (.png)", "cannot read"],
    ),
    ("oversize.tif", "monuseg_cdal", None, _oversize_tile, 413, ["voxels", "max_image_voxels"]),
    ("large.nii.gz", "hippocampus_cdal", None, _bytes(b"\0" * (MAX_UPLOAD_MB + 1) * 2**20), 413, ["max_upload_mb"]),
    ("dotdot", "monuseg_cdal", f"../studies/{TILE}", None, 400, ["holds a path"]),
    ("absolute", "monuseg_cdal", "/etc/passwd", None, 403, ["outside this server's datastore"]),
    ("encoded", "monuseg_cdal", "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd", None, 400, ["holds a path"]),
]


@pytest.mark.parametrize(("name", "model", "query", "make", "status", "words"), ABUSE, ids=[a[0] for a in ABUSE])
def test_abusive_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving(
    server, tmp_path, name, model, query, make, status, words
):
    url = f"{server['url']}/infer/{model}?output=json"
    if make is not None:
        upload = make(tmp_path / name, server["volume"])
        code, _, body = _request(url, "POST", files={"file": upload})
    else:
        code, _, body = _request(f"{url}&image={query}", "POST")
    assert code == status, body[:500]
    detail = json.loads(body)["detail"]
    assert all(w in detail for w in words), detail
    assert tempfile.gettempdir() + "/tmp" not in detail  # the server's temporary paths are not the client's business
    assert _request(f"{server['url']}/info/")[0] == 200


def test_the_server_memory_returns_to_its_baseline_after_the_load(server):
    assert "rss_baseline_mb" in LOAD, "run with the concurrent-request test before this one"
    for image, n in LOAD_CASES:  # the same work as before the baseline, after the load and the abuse
        assert _tile_result(server, image, n)[0] == 200
    after = _server_rss_mb(server["pid"])
    TIMINGS["server_rss_baseline_mb"] = round(LOAD["rss_baseline_mb"], 1)
    TIMINGS["server_rss_after_load_mb"] = round(after, 1)
    assert after <= 1.10 * LOAD["rss_baseline_mb"], TIMINGS


CLIENT_SCRIPT = """
import json, os, sys
from monailabel.client import MONAILabelClient

url, folder = sys.argv[1], sys.argv[2]
names = sys.argv[3:]
os.makedirs(f"{folder}/client", exist_ok=True)  # not /tmp: the server deletes its own temporary result there
client = MONAILabelClient(url, tmpdir=f"{folder}/client")
scores, labels = {}, {}
for name in names:
    client.upload_image(f"{folder}/{name}.tif", image_id=name)
    label_file, params = client.infer("monuseg_cdal", name, {"num_generations": 3})
    scores[name] = params["uncertainty"]["score"]
    labels[name] = label_file
sample = client.next_sample("uncertain", {"model": "monuseg_cdal"})
print(json.dumps({"scores": scores, "labels": labels, "sample": sample}))
"""


def test_the_uncertainty_strategy_proposes_the_image_whose_ensemble_disagrees_most(server, monailabel_venv, tmp_path):
    """Driven through MONAI Label's own Python client: three images uploaded to the datastore, inferred (which
    caches each one's score), then /activelearning/uncertain proposes the unlabelled image with the highest score."""
    from PIL import Image

    tile = np.array(Image.open(server["tile"]).convert("RGB"))[:512, :512]
    rng = np.random.default_rng(0)
    images = {
        "al_tile": tile,  # a real H&E crop
        "al_faded": (0.35 * tile + 0.65 * 235).astype(np.uint8),  # the same crop, washed out
        "al_noise": rng.integers(0, 256, tile.shape, dtype=np.uint8),  # no tissue at all
    }
    for name, array in images.items():
        Image.fromarray(array).save(tmp_path / f"{name}.tif")
    run = subprocess.run(
        [str(monailabel_venv / "bin" / "python"), "-c", CLIENT_SCRIPT, server["url"], str(tmp_path), *images],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    scores = result["scores"]
    assert len(set(scores.values())) == 3, scores  # the three images have different uncertainty
    assert all(0 <= s <= 0.5 for s in scores.values()), scores
    for name in images:  # the label came back through the client, and the score is cached in the datastore
        assert _read_png(Path(result["labels"][name]).read_bytes()).shape == (512, 512)
        status, _, body = _request(f"{server['url']}/datastore/image/info?image={name}")
        assert status == 200
        cached = json.loads(body)["uncertainty_score"]["monuseg_cdal"]
        assert cached["score"] == scores[name] and cached["num_generations"] == 3
    # the proposal: the highest cached score among every unlabelled image this model has scored
    everything = dict(scores)
    status, _, body = _request(f"{server['url']}/datastore/image/info?image={TILE}")
    tile_entry = json.loads(body).get("uncertainty_score", {}).get("monuseg_cdal")
    if tile_entry:  # the datastore tile, inferred by the tests before this one
        everything[TILE] = tile_entry["score"]
    sample = result["sample"]
    assert sample["id"] == max(everything, key=everything.get), (sample, everything)
    assert sample["score"] == max(everything.values()) and sample["model"] == "monuseg_cdal"
    TIMINGS["uncertainty_scores"] = {k: round(v, 5) for k, v in everything.items()}


def _cached_scores(server, model: str) -> dict[str, dict]:
    """The uncertainty scores the datastore holds for ``model``, by unlabelled image id."""
    status, _, body = _request(f"{server['url']}/datastore/?output=all")
    assert status == 200, body[:300]
    objects = json.loads(body)["objects"]
    return {
        image: obj["image"]["info"]["uncertainty_score"][model]
        for image, obj in objects.items()
        if model in obj.get("image", {}).get("info", {}).get("uncertainty_score", {})
        and not obj.get("labels", {}).get("final")
    }


def test_a_short_training_request_completes_and_updates_the_served_model(server):
    import sqlite3

    bundle = server["bundles"] / "monuseg_cdal"
    before = (bundle / "models" / "model.pt").stat().st_mtime
    # a score cached by the weights before the training (the strategy test may have cached others)
    status, _, body = _request(
        f"{server['url']}/infer/monuseg_cdal?image={TILE}&output=json", "POST",
        fields={"params": json.dumps({"num_generations": 2})},
    )  # fmt: skip
    assert status == 200, body[:500]
    cached_before = _cached_scores(server, "monuseg_cdal")
    assert TILE in cached_before
    status, _, body = _timed(
        "train_1_epoch",
        lambda: _request(
            f"{server['url']}/train/monuseg_cdal?run_sync=true",
            "POST",
            body={"max_epochs": 1, "device": "cpu", "val_split": 0.5},
        ),
    )
    assert status == 200, body[:500]
    log = server["log"].read_text()
    assert "Total Records for Training: 1" in log and "Total Records for Validation: 1" in log
    assert (bundle / "models" / "checkpoints" / "last.pt").is_file()
    assert (bundle / "models" / "model.pt").stat().st_mtime > before  # validated, saved as the best model
    with sqlite3.connect(bundle / "mlruns.db") as db:
        runs = db.execute("select status from runs").fetchall()
        dice = db.execute("select value from metrics where key = 'val_dice'").fetchall()
        losses = db.execute("select step from metrics where key = 'loss_g'").fetchall()
    assert runs == [("FINISHED",)] and len(dice) == 1 and 0 <= dice[0][0] <= 1
    assert losses == [(10,)]  # the 10 iterations of the epoch ran (one training tile: one batch of 1 per pass)
    TIMINGS["train_val_dice"] = round(dice[0][0], 4)
    # the training refreshed every cached score of that model: each one now postdates the new weights
    trained = (bundle / "models" / "model.pt").stat().st_mtime
    cached_after = _cached_scores(server, "monuseg_cdal")
    assert set(cached_after) == set(cached_before)
    for image, entry in cached_after.items():
        assert entry["ts"] >= trained > cached_before[image]["ts"], (image, entry, trained)
        assert entry["num_generations"] == cached_before[image]["num_generations"]
    assert f"uncertainty scores of monuseg_cdal: {len(cached_before)} images scored again" in server["log"].read_text()
    # the server serves the refined model at once
    status, _, body = _request(
        f"{server['url']}/infer/monuseg_cdal?image={TILE}&output=json",
        "POST",
        fields={"params": json.dumps({"num_generations": 2})},
    )
    assert status == 200, body[:500]
