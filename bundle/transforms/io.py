"""Dictionary transforms that load RGB histology tiles and their nucleus masks.

MONAI's ``LoadImaged(reader="PILReader")`` is not used for the tiles: on a corrupt or truncated
TIFF it reports "cannot find a suitable reader ... Please install the reader libraries", which
hides the real problem, and by default it transposes PIL images to (W, H). These loaders give
(C, H, W) with H the row axis, the way the arrays are stored, and raise
:class:`~bundle.data.errors.DataFormatError` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from PIL import Image

from bundle.data.aperio import read_aperio_mask
from bundle.data.errors import DataFormatError

__all__ = ["LoadTiled", "LoadInstanceMaskd", "high_depth_to_8bit", "read_rgb_tile", "read_binary_mask"]

#: PIL modes that hold 8-bit grey, palette or colour data.
_EIGHT_BIT_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}


def open_decoded_image(path: str) -> Image.Image:
    """Open and fully decode an image file, turning every failure into DataFormatError."""
    if not os.path.isfile(path):
        raise DataFormatError(path, "file does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except Image.DecompressionBombError as err:
        raise DataFormatError(path, f"image too large to decode safely ({err})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise DataFormatError(path, f"unreadable or corrupt image file ({type(err).__name__}: {err})") from None


#: PIL modes of single-channel 16-bit, 32-bit integer and float images (microscopy cameras write them).
_HIGH_DEPTH_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


def high_depth_to_8bit(array: np.ndarray, path: str = "<image>") -> np.ndarray:
    """A 16-bit / 32-bit / float grey image on the 0-255 scale of the 8-bit tiles, the bundle's intensity
    normalisation applies after: linear between its 0.5th and 99.5th percentiles, clipped (a 12-bit camera image in a
    16-bit container and a float image both come out with the contrast of an 8-bit one). A constant image becomes 0;
    non-finite values are refused."""
    from monai.transforms import ScaleIntensityRangePercentiles

    values = np.asarray(array, dtype=np.float64)
    if not np.isfinite(values).all():
        raise DataFormatError(path, f"holds {int((~np.isfinite(values)).sum())} non-finite (NaN or inf) pixels")
    if np.percentile(values, 99.5) <= np.percentile(values, 0.5):
        return np.zeros(values.shape, dtype=np.uint8)
    stretch = ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=255.0, clip=True)
    return np.round(np.asarray(stretch(values))).astype(np.uint8)


def read_rgb_tile(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as 8-bit RGB.

    Grey, palette and bilevel images are converted to RGB; an alpha channel is dropped. Single-channel 16-bit,
    32-bit integer and float images (microscopy) are rescaled to 0-255 by ``high_depth_to_8bit`` and repeated
    over the three channels.

    Returns:
        uint8 array of shape (H, W, 3), values 0-255.

    Raises:
        DataFormatError: missing, unreadable or corrupt file, a mode that is neither 8-bit nor high-depth grey,
            or a high-depth image with non-finite pixels.
    """
    path = os.fspath(path)
    image = open_decoded_image(path)
    if image.mode in _HIGH_DEPTH_MODES:
        grey = high_depth_to_8bit(np.asarray(image), path)
        return np.repeat(grey[..., None], 3, axis=-1)
    if image.mode not in _EIGHT_BIT_MODES:
        raise DataFormatError(
            path, f"unsupported image mode {image.mode!r}: expected 8-bit RGB or grey, or 16-bit / float grey"
        )
    return np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy (torch.from_numpy)


def read_binary_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a binary mask image whose values are a subset of {0, 1, 255}; >0 becomes 1.

    Returns:
        uint8 array of shape (H, W), values in {0, 1}.

    Raises:
        DataFormatError: unreadable file, colour mask whose channels differ, or values outside
            {0, 1, 255} (the message lists them).
    """
    path = os.fspath(path)
    image = open_decoded_image(path)
    array = np.asarray(image)
    if array.ndim == 3:
        if image.mode in ("LA", "RGBA", "PA"):
            array = array[..., :-1]
        if not np.all(array == array[..., :1]):
            raise DataFormatError(path, f"mask of mode {image.mode!r} has channels that differ; expected a grey mask")
        array = array[..., 0]
    if array.ndim != 2:
        raise DataFormatError(path, f"mask must be 2-D, got shape {array.shape}")
    values = np.unique(array)
    bad = [v for v in values.tolist() if v not in (0, 1, 255)]
    if bad:
        shown = ", ".join(str(v) for v in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise DataFormatError(path, f"mask values must be a subset of {{0, 1, 255}}, found {shown}")
    return (array > 0).astype(np.uint8)


def _filename(value: Any) -> str:
    """The file name carried by a loaded tensor's metadata, or the value itself when it is a path."""
    if isinstance(value, MetaTensor):
        return str(value.meta.get("filename_or_obj", "<image without filename>"))
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    return "<in-memory image>"


class LoadTiled(MapTransform):
    """Load RGB tiles (TIFF/PNG/JPEG via PIL) as channel-first float tensors.

    For each key, ``data[key]`` is a file path and becomes a float32 ``MetaTensor`` of shape
    (3, H, W) (H = image rows) with values on the 0-255 scale. Its metadata hold
    ``filename_or_obj`` (so MONAI savers and ``decollate_batch`` keep the name), ``spatial_shape``
    (H, W), the PIL ``format``/``mode``, and ``original_channel_dim = 0`` so that a following
    ``EnsureChannelFirstd`` leaves the layout alone.

    Raises:
        DataFormatError: missing, corrupt, truncated or non-8-bit file (message starts with the path).
    """

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = os.fspath(d[key])
            rgb = read_rgb_tile(path)
            tensor = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).to(torch.float32)
            meta = {
                "filename_or_obj": path,
                "spatial_shape": np.asarray(rgb.shape[:2]),
                "original_channel_dim": 0,
                "format": os.path.splitext(path)[1].lstrip(".").upper(),
                "mode": "RGB",
            }
            d[key] = MetaTensor(tensor, meta=meta)
        return d


class LoadInstanceMaskd(MapTransform):
    """Load nucleus annotations as a binary foreground mask at the image's size.

    For each key, ``data[key]`` is a label file path:

    - ``.xml`` (Aperio): polygons filled at the image's (H, W) (see ``bundle.data.aperio``);
    - ``.png``/``.tif``/``.tiff`` mask: values must be a subset of {0, 1, 255}; >0 becomes 1, and
      its size must equal the image's.

    The image size is read from ``data[image_key]``: an already loaded (C, H, W) tensor (as from
    :class:`LoadTiled`), or a path, whose header is then read.

    The result is a float32 ``MetaTensor`` of shape (1, H, W) with values in {0, 1} and
    ``filename_or_obj`` set to the label file.

    Raises:
        DataFormatError: unreadable label, bad mask values, unknown label suffix, or a mask whose
            size differs from the image's (message names both files and both sizes).
    """

    def __init__(self, keys: KeysCollection = "label", image_key: str = "image", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key

    def _image_size(self, d: Mapping[Hashable, Any], label_path: str) -> tuple[int, int]:
        if self.image_key not in d:
            raise DataFormatError(label_path, f"needs the image under key {self.image_key!r} to know the mask size")
        image = d[self.image_key]
        if isinstance(image, (str, os.PathLike)):
            path = os.fspath(image)
            if not os.path.isfile(path):
                raise DataFormatError(path, "file does not exist")
            try:
                with Image.open(path) as opened:
                    width, height = opened.size
            except (OSError, SyntaxError, ValueError) as err:
                raise DataFormatError(path, f"unreadable or corrupt image file ({err})") from None
            return height, width
        shape = tuple(image.shape)
        if len(shape) != 3:
            raise DataFormatError(_filename(image), f"expected a channel-first (C, H, W) image, got shape {shape}")
        return int(shape[1]), int(shape[2])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = os.fspath(d[key])
            height, width = self._image_size(d, path)
            suffix = os.path.splitext(path)[1].lower()
            if suffix == ".xml":
                mask = read_aperio_mask(path, height, width)
            elif suffix in (".png", ".tif", ".tiff", ".bmp"):
                mask = read_binary_mask(path)
                if mask.shape != (height, width):
                    image_name = _filename(d[self.image_key])
                    raise DataFormatError(
                        path,
                        f"mask size {mask.shape[0]}x{mask.shape[1]} (HxW) differs from image {image_name} "
                        f"size {height}x{width}",
                    )
            else:
                raise DataFormatError(path, f"unknown label format {suffix!r}: expected .xml, .png or .tif")
            tensor = torch.from_numpy(mask[None].astype(np.float32))
            meta = {"filename_or_obj": path, "spatial_shape": np.asarray((height, width)), "original_channel_dim": 0}
            d[key] = MetaTensor(tensor, meta=meta)
        return d
