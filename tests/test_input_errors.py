"""An input error is the last line a person reads, whatever wraps it (bundle/data/errors.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils.data import DataLoader, Dataset

from bundle.data.errors import DataFormatError, find_input_error, one_line

REPO = Path(__file__).resolve().parents[1]
VOLUME = REPO.parent / "shared" / "data" / "hippocampus" / "Task04_Hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"


class _BadFile(Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, index):
        raise DataFormatError("/data/case_7.nii.gz", "label value 5 is not a class (0, 1, 2)")


def test_the_file_and_problem_survive_config_wrapping_and_dataloader_workers():
    try:
        try:
            raise DataFormatError("/data/a.xml", "Vertex 3 has non-numeric X='abc'")
        except DataFormatError as err:
            raise RuntimeError("Failed to evaluate ConfigExpression: ...") from err
    except RuntimeError as wrapped:
        assert one_line(find_input_error(wrapped)) == "/data/a.xml: Vertex 3 has non-numeric X='abc'"
    assert find_input_error(RuntimeError("unrelated")) is None
    # a worker process rebuilds the error from its traceback text; the one line is still file: problem
    with pytest.raises(DataFormatError) as caught:
        next(iter(DataLoader(_BadFile(), num_workers=1, multiprocessing_context="spawn")))
    assert "\n" in str(caught.value)
    assert one_line(caught.value) == "/data/case_7.nii.gz: label value 5 is not a class (0, 1, 2)"


@pytest.mark.skipif(not VOLUME.is_file(), reason="needs ../shared/data/hippocampus")
def test_a_training_run_on_a_dataset_with_a_missing_label_ends_with_one_line_naming_it(tmp_path):
    data = tmp_path / "Task04"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    (data / "imagesTr" / "hippocampus_001.nii.gz").write_bytes(VOLUME.read_bytes())
    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
         "['configs/train.yaml','configs/datasets/hippocampus.yaml']", "--dataset_dir", str(data),
         "--bundle_root", str(tmp_path / "run")],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    expected = f"{data / 'labelsTr' / 'hippocampus_001.nii.gz'}: missing: the label volume of "
    assert last.startswith(f"error: {expected}"), last
    assert "Failed to evaluate" in run.stderr  # MONAI's wrapper is still there, above the line that matters
