"""Outputs that cannot be written: refused before computing, or at the write with the file named and the previous
file kept (bundle.data.checks.check_writable, bundle.handlers.checkpoint.atomic_torch_save, the excepthook's last line).

The full disk is real in the sense that matters: the training process runs under a file-size limit
(``RLIMIT_FSIZE``, SIGXFSZ ignored), so the kernel refuses the checkpoint write with EFBIG as it would with ENOSPC.
"""

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from workflow_matrix import run_cell, write_tiny_data

from bundle.data.checks import check_writable
from bundle.data.errors import OutputError

REPO = Path(__file__).resolve().parents[1]


def test_an_output_folder_that_cannot_be_made_is_named_before_anything_is_computed(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    with pytest.raises(OutputError, match=f"^{blocker / 'models'}: output folder cannot be written"):
        check_writable([tmp_path / "fine", blocker / "models"])
    assert (tmp_path / "fine").is_dir() and list((tmp_path / "fine").iterdir()) == []


def test_an_inference_into_an_unwritable_folder_ends_with_one_line_and_writes_nothing(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "['configs/inference.yaml']",
         "--input_dir", str(inputs), "--output_dir", str(blocker / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {blocker / 'out'}: output folder cannot be written"), last


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_checkpoint_write_that_fails_keeps_the_previous_checkpoint_and_names_it(tmp_path):
    data = write_tiny_data(tmp_path / "data")["synthetic"]
    root = tmp_path / "run"
    torch.set_num_threads(1)
    run_cell("training", "cdal", "synthetic", root, data, extra={"val_interval": 1, "max_epochs": 1})
    last = root / "models" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    others = [p.stat().st_size for p in root.rglob("*") if p.is_file() and p.suffix != ".pt"]
    limit = (max(others) + len(before)) // 2  # the checkpoint no longer fits; the logs and tracking database do
    assert max(others) + 100_000 < limit, (max(others), limit)
    script = (
        "import sys, torch; from pathlib import Path; sys.path.insert(0, 'tests'); import bundle; "
        "from workflow_matrix import run_cell; torch.set_num_threads(1); "
        f"run_cell('training', 'cdal', 'synthetic', Path({str(root)!r}), {data!r}, "
        "extra={'val_interval': 1, 'max_epochs': 2, 'resume': True})"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=_limit_file_size(limit),
    )  # fmt: skip
    assert run.returncode != 0
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {root / 'models'}") and "could not be written" in line, line
    assert "the previous file is kept" in line or "no file was written" in line, line
    assert last.read_bytes() == before  # the good checkpoint is untouched
    assert not list(root.rglob(".tmp-*"))  # and no half-written temporary file is left
    torch.load(last, weights_only=True)


LABEL_WRITES = """
import sys
import numpy as np, nibabel as nib, torch
from monai.data import MetaTensor
from bundle.transforms.writers import SaveMaskAndUncertaintyd, save_label_volume
from bundle.files import write_text_atomic
out, ref = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
failed = []
try:  # an incompressible label volume over the good one
    save_label_volume(rng.integers(0, 3, (64, 64, 64)).astype(np.uint8), nib.load(ref).affine, ref,
                      out + '/volume.nii.gz', overwrite=True)
except OSError as err:
    failed.append(('volume', err.errno))
try:  # a mask PNG over the good one
    image = MetaTensor(torch.zeros(3, 800, 800), meta={'filename_or_obj': 'tile.tif'})
    mask = torch.as_tensor(rng.integers(0, 2, (1, 800, 800)))
    SaveMaskAndUncertaintyd(out, overwrite=True)({'image': image, 'mask': mask})
except OSError as err:
    failed.append(('mask', err.errno))
try:  # a report over the good one
    write_text_atomic(out + '/report.csv', 'file,dice\\n' + 'x,0.5\\n' * 50000)
except OSError as err:
    failed.append(('report', err.errno))
print(failed)
"""


def test_labels_masks_and_reports_that_cannot_be_written_leave_the_previous_files_whole(tmp_path):
    import errno

    import nibabel as nib
    import numpy as np
    from PIL import Image

    out = tmp_path / "out"
    (out / "masks").mkdir(parents=True)
    ref = tmp_path / "ref.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 64), np.uint8), np.eye(4)), ref)
    nib.save(nib.Nifti1Image(np.ones((64, 64, 64), np.uint8), np.eye(4)), out / "volume.nii.gz")
    Image.fromarray(np.ones((400, 400), np.uint8)).save(out / "masks" / "tile.png")
    (out / "report.csv").write_text("file,dice\nx,0.9\n")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert max(len(b) for b in before.values()) < 20_000
    run = subprocess.run(
        [sys.executable, "-c", LABEL_WRITES, str(out), str(ref)], cwd=REPO, capture_output=True, text=True,
        timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=_limit_file_size(40_000),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    failed = eval(run.stdout.strip().splitlines()[-1])  # noqa: S307 - our own script's printed list
    assert [name for name, _ in failed] == ["volume", "mask", "report"], run.stdout
    assert all(code == errno.EFBIG for _, code in failed), failed  # the kernel refused each write
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # every previous file byte-identical, and no temporary file left beside them
    assert np.asarray(nib.load(out / "volume.nii.gz").dataobj).min() == 1


SLOW_CHECKPOINTS = """
import sys, torch
from bundle.handlers.checkpoint import atomic_torch_save
path = sys.argv[1]
atomic_torch_save({"version": torch.tensor(0), "w": torch.zeros(10)}, path)
print("saved 0", flush=True)
big = torch.ones(60_000_000)  # 240 MB: the next write takes long enough to be killed in the middle
for version in range(1, 100):
    atomic_torch_save({"version": torch.tensor(version), "w": big}, path)
"""


def test_kill_9_in_the_middle_of_a_checkpoint_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    import time

    path = tmp_path / "models" / "checkpoints" / "last.pt"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CHECKPOINTS, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "saved 0"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the temporary file of write 1 exists and is partly written
            partial = [p for p in path.parent.glob(".tmp-*-last.pt") if p.stat().st_size > 1_000_000]
            if partial:
                break
            time.sleep(0.005)
        else:
            raise AssertionError("the second checkpoint write never started")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(path, weights_only=True)  # the final name holds a whole checkpoint
    assert int(state["version"]) == 0 and state["w"].shape == (10,)
    left = list(path.parent.glob(".tmp-*-last.pt"))
    assert left and left[0].stat().st_size < 240_000_000 + 10_000  # the killed write's partial file, beside it
    # the next save of the same checkpoint (a resumed run) clears what the killed process left
    from bundle.handlers.checkpoint import atomic_torch_save

    atomic_torch_save({"version": torch.tensor(1)}, path)
    assert int(torch.load(path, weights_only=True)["version"]) == 1
    assert not list(path.parent.glob(".tmp-*"))
