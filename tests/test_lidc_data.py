"""LIDC reader: the crop layout (synthetic and real), the pickle layout, patient splits, annotator transforms."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from bundle.data.errors import DataFormatError
from bundle.data.lidc import build_lidc_datalist, find_lidc_cases, lidc_patient_id
from bundle.data.lidc_synthetic import ensure_synthetic_lidc, render_synthetic_lidc_case, write_synthetic_lidc_pickle
from bundle.transforms.annotators import LoadLIDCd, RandSelectAnnotatord, SelectAnnotatord


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    return ensure_synthetic_lidc(tmp_path_factory.mktemp("lidc") / "crops", num_train=10, num_test=3, size=64)


def test_crop_layout_datalist_and_loading(crops, tmp_path):
    out = tmp_path / "datalist.json"
    datalist = build_lidc_datalist(crops, val_fraction=0.2, output_json=out)
    assert {k: len(v) for k, v in datalist.items()} == {"training": 8, "validation": 2, "test": 3}
    assert json.loads(out.read_text()) == datalist
    train_ids = {c["patient"] for c in datalist["training"]}
    assert not train_ids & {c["patient"] for c in datalist["validation"]}
    case = datalist["test"][0]
    assert case["name"] == "10" and len(case["label"]) == 4 and case["image"].endswith("image_11.jpg")
    loaded = LoadLIDCd()(case)
    assert loaded["image"].shape == (1, 64, 64) and 0 <= float(loaded["image"].min()) <= 1
    annotations = loaded["annotations"]
    assert annotations.shape == (4, 64, 64) and set(torch.unique(annotations).tolist()) <= {0.0, 1.0}
    # the JPEG-noisy masks thresholded at 127 give back the rendered masks
    _, masks = render_synthetic_lidc_case([0, 1, 0], 64)
    agreement = (annotations.numpy() == np.stack(masks)).mean()
    assert agreement > 0.995
    # same arguments: reused; a changed one: refused
    assert ensure_synthetic_lidc(crops, num_train=10, num_test=3, size=64) == crops
    with pytest.raises(DataFormatError, match="made with"):
        ensure_synthetic_lidc(crops, num_train=11, num_test=3, size=64)


def test_bad_cases_name_the_file(crops, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(crops / "training" / "0", root / "training" / "0")
    shutil.copytree(crops / "training" / "1", root / "training" / "1")
    (root / "training" / "1" / "label3_.jpg").unlink()
    with pytest.raises(DataFormatError, match="has 3 annotator masks"):
        find_lidc_cases(root)
    (root / "training" / "0" / "image_1.jpg").unlink()
    with pytest.raises(DataFormatError, match=r"training/0: expected exactly one image"):
        find_lidc_cases(root)
    case = {"image": str(crops / "training" / "2" / "image_3.jpg"), "label": [str(tmp_path / "small.jpg")]}
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "small.jpg")
    with pytest.raises(DataFormatError, match=r"small.jpg: mask size 32x32 differs from image"):
        LoadLIDCd()(case)
    with pytest.raises(DataFormatError, match="does not exist"):
        build_lidc_datalist(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="empty: no LIDC cases found"):
        build_lidc_datalist(tmp_path / "empty")


def test_pickle_layout_splits_by_patient(tmp_path):
    path = write_synthetic_lidc_pickle(tmp_path / "data_lidc.pickle", num_patients=5, slices_per_patient=2, size=32)
    datalist = build_lidc_datalist(tmp_path, val_fraction=0.25, test_fraction=0.2)
    groups = {s: {c["patient"] for c in v} for s, v in datalist.items()}
    assert len(groups["test"]) == 1 and len(groups["validation"]) == 1 and len(groups["training"]) == 3
    assert not (groups["test"] & groups["training"]) and not (groups["validation"] & groups["training"])
    assert all(len(v) == 2 * len(groups[s]) for s, v in datalist.items())  # both slices of a patient together
    case = datalist["training"][0]
    assert case["image"] == f"{path}::{case['name']}" and case["label"][3] == f"{path}::{case['name']}::3"
    loaded = LoadLIDCd()(case)
    assert loaded["image"].shape == (1, 32, 32) and loaded["annotations"].shape == (4, 32, 32)
    with open(path, "rb") as f:
        raw = pickle.load(f)[case["name"]]
    np.testing.assert_allclose(loaded["image"][0].numpy(), raw["image"])
    np.testing.assert_array_equal(loaded["annotations"].numpy(), np.stack(raw["masks"]))
    # without series_uid the patient is the key before the slice suffix
    assert lidc_patient_id("LIDC-IDRI-0042_slice17") == "LIDC-IDRI-0042"
    assert lidc_patient_id("LIDC-IDRI-0042_slice17", {"series_uid": "1.2.3"}) == "1.2.3"
    assert lidc_patient_id("case7") == "case7"


def test_pickle_that_would_run_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo unsafe",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"x": Payload()}))
    with pytest.raises(DataFormatError, match="refusing to load"):
        build_lidc_datalist(path)


def test_annotator_selection():
    ann = torch.tensor([[[1.0, 1.0, 0.0]], [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]], [[0.0, 0.0, 0.0]]])  # (4, 1, 3)
    majority = SelectAnnotatord(mode="majority")({"annotations": ann})["label"]
    assert majority.tolist() == [[[1.0, 1.0, 0.0]]]  # 2 of 4 counts as foreground
    assert SelectAnnotatord(mode="first")({"annotations": ann})["label"].tolist() == [[[1.0, 1.0, 0.0]]]
    assert SelectAnnotatord(mode=2)({"annotations": ann * 2 - 1})["label"].tolist() == [[[0.0, 1.0, 0.0]]]
    draw = RandSelectAnnotatord()
    draw.set_random_state(0)
    picked = {tuple(draw({"annotations": ann})["label"].flatten().tolist()) for _ in range(40)}
    assert picked == {tuple(a.flatten().tolist()) for a in ann}  # every annotator gets drawn, nothing else


def test_real_lidc_crops(shared_data_dir):
    root = shared_data_dir / "lidc"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    datalist = build_lidc_datalist(root)
    assert {k: len(v) for k, v in datalist.items()} == {"training": 15, "validation": 4, "test": 9}
    empty, sizes = 0, set()
    for case in datalist["test"]:
        loaded = LoadLIDCd()(case)
        sizes.add(tuple(loaded["image"].shape))
        assert loaded["annotations"].shape[0] == 4
        empty += int((loaded["annotations"].sum((1, 2)) == 0).sum())
    assert sizes == {(1, 128, 128)}
    assert empty > 0  # some annotators marked nothing
