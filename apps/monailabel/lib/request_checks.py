"""Checks on what an infer request asks the server to read, before any model sees it.

MONAI Label's ``infer`` takes the ``image`` of a request either as a datastore id or, when it names an existing
path, as that path; an upload arrives as a temporary file that the endpoint wrote into the temp folder. Left as
is, ``image=../../secret.nii.gz`` or ``image=/etc/passwd`` would make the server read any file its user can read.
``resolve_image`` allows datastore ids (names without a path), the endpoint's upload files and paths inside the
datastore and the session store, and nothing else; ``size_problem`` refuses
what is too large for the server to hold (configurable limits) or empty, from the file size and the image
header, before the image is decoded.

Every refusal is a ``RequestRefusedError`` with an HTTP status and a message that names the image as the client knows
it (its id, or "the uploaded image" for uploads, whose temporary path means nothing to the client). The module is
plain Python (no FastAPI) so the main test suite checks it without a server.
"""

from __future__ import annotations

import math
import os
import pathlib
import tempfile
from collections.abc import Iterable, Sequence

#: defaults of the server's limits (``--conf max_image_voxels N``, ``--conf max_upload_mb N``): a 4 x 8-bit
#: 12000 x 12000 whole-slide region or a 512 x 512 x 1000 CT pass, anything larger does not fit an ensemble's
#: working memory on the machines this serves (N generations of float32 probabilities per voxel)
DEFAULT_MAX_IMAGE_VOXELS = 300_000_000
DEFAULT_MAX_UPLOAD_MB = 2048

NIFTI_SUFFIXES = (".nii", ".nii.gz")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class RequestRefusedError(Exception):
    """An infer request the server will not run: ``status`` (HTTP) and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _inside(path: str, roots: Iterable[str]) -> bool:
    real = os.path.realpath(path)
    for root in roots:
        if not root:
            continue
        root = os.path.realpath(root)
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return True
    return False


def is_upload(image: str, upload_dir: str | None = None) -> bool:
    """Whether ``image`` is a file MONAI Label's infer endpoint wrote for an upload: a ``tmp*`` file directly in the
    temp folder (``tempfile.NamedTemporaryFile``), not a file in a folder below it."""
    folder = os.path.realpath(upload_dir or tempfile.gettempdir())
    return (
        os.path.isabs(image)
        and os.path.dirname(os.path.realpath(image)) == folder
        and os.path.basename(image).startswith("tmp")
    )


def display_name(image: str, upload_dir: str | None = None) -> str:
    """How a message names ``image``: an upload (a temporary file) as "the uploaded image (.suffix)"."""
    if is_upload(image, upload_dir):
        suffix = "".join(pathlib.Path(image).suffixes)
        return f"the uploaded image ({suffix})" if suffix else "the uploaded image"
    return f"image '{image}'"


def resolve_image(
    image: str, image_ids: Iterable[str], readable_roots: Sequence[str], upload_dir: str | None = None
) -> str:
    """``image`` if the server may read it: a datastore id, an upload (``is_upload``) or an existing path inside
    ``readable_roots`` (the datastore, the session store). Raises ``RequestRefusedError`` otherwise: 400 for an id
    that holds a path, 403 for a path outside those folders, 404 for an id the datastore does not hold."""
    if not isinstance(image, str) or not image:
        raise RequestRefusedError(400, "the request names no image (give an image id or upload a file)")
    if os.path.isabs(image):
        if not (is_upload(image, upload_dir) or _inside(image, readable_roots)):
            raise RequestRefusedError(
                403,
                f"image '{image}' is a path outside this server's datastore and upload folder; "
                "ask for a datastore image by its id, or upload the file",
            )
        if not os.path.exists(image):
            raise RequestRefusedError(404, f"image '{image}' does not exist")
        return image
    if "/" in image or "\\" in image or image in (".", "..") or "\x00" in image:
        raise RequestRefusedError(
            400, f"image id '{image}' holds a path; ids are the datastore's image names, without folders"
        )
    if image not in set(image_ids):
        raise RequestRefusedError(404, f"image '{image}' is not in the datastore")
    return image


def header_shape(path: str) -> tuple[int, ...] | None:
    """The image's voxel grid from its header alone (NIfTI: every axis; the PIL formats: height x width, colour
    channels left out), or None when the format is neither or the header cannot be read (the reader reports it)."""
    lower = path.lower()
    try:
        if lower.endswith(NIFTI_SUFFIXES):
            import nibabel as nib

            return tuple(int(s) for s in nib.load(path).shape)
        if lower.endswith(PIL_SUFFIXES):
            from PIL import Image

            previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # the size is the question here
            try:
                with Image.open(path) as img:
                    return (img.size[1], img.size[0])
            finally:
                Image.MAX_IMAGE_PIXELS = previous
    except Exception:  # noqa: BLE001 - an unreadable header is the reader's to report, with its own words
        return None
    return None


def size_problem(path: str, name: str, max_voxels: int, max_upload_mb: float) -> RequestRefusedError | None:
    """A refusal for an empty file (422) or one past the server's limits (413: bytes, then header voxels)."""
    if os.path.isdir(path):  # a DICOM series: its files are read by the model's reader
        return None
    size = os.path.getsize(path)
    if size == 0:
        return RequestRefusedError(422, f"{name} is empty (0 bytes)")
    if size > max_upload_mb * 2**20:
        return RequestRefusedError(
            413,
            f"{name} has {size / 2**20:.1f} MB, past this server's limit of {max_upload_mb:g} MB "
            "(--conf max_upload_mb)",
        )
    shape = header_shape(path)
    if shape is not None:
        voxels = math.prod(shape)
        if voxels > max_voxels:
            return RequestRefusedError(
                413,
                f"{name} has {voxels} voxels (shape {shape}), past this server's limit of {max_voxels} "
                "(--conf max_image_voxels)",
            )
    return None


def conf_limit(conf: dict, key: str, default: float) -> float:
    """A positive number from the app's ``--conf key value``; a clear error at start-up otherwise."""
    value = conf.get(key)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"--conf {key} {value!r}: not a number") from None
    if number <= 0:
        raise ValueError(f"--conf {key} {value!r}: must be positive")
    return number
