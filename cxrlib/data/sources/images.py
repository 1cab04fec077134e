"""Images that stay files: decode PNG / JPG / DICOM lazily, with an optional resized cache.

Real datasets are far too large for one in-memory array, so the records of a real source point
to files and ``ImageStore`` behaves like the ``images.npy`` array of the phantom path:
``store[i]`` is image ``i`` as a grayscale ``(H, W)`` uint8 array, ``len(store)`` the count.

- PNG / JPG: Pillow, converted to 8-bit grayscale (16-bit PNGs are windowed, not clipped).
- DICOM: ``pydicom`` (through ``cxrlib.model.processor.load_image``, the project's one reader):
  the modality LUT (rescale slope / intercept), the VOI LUT (window) when the file has one, then
  the image's 0.5-99.5 percentiles; a ``MONOCHROME1`` image is inverted so bone is bright.
- Cache (``cache_dir``): each image, once decoded, is resized so its short side is
  ``cache_short_side`` (the encoder's ``image_size``) and saved as a PNG; later epochs read that
  small file. The processor resizes shortest-edge anyway, and boxes are relative to the short
  side (``cxrlib.data.boxes``), so the cache changes no box and no crop.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from cxrlib.model.processor import load_image

DICOM_SUFFIXES = (".dcm", ".dicom")


class ImageFileError(OSError):
    """An image file that is missing or cannot be decoded."""


def read_image(path: str | Path) -> np.ndarray:
    """Any supported image file as a grayscale ``(H, W)`` uint8 array, through the project's one
    reader ``cxrlib.model.processor.load_image`` (DICOM modality and VOI LUTs, MONOCHROME1
    inverted), deeper than 8 bit windowed to the 0.5-99.5 percentiles."""
    path = Path(path)
    if not path.is_file():
        raise ImageFileError(f"image file {path} does not exist (moved, or not downloaded?)")
    try:
        return load_image(path, window="percentiles")
    except (OSError, ValueError) as e:  # ImageError is a ValueError
        raise ImageFileError(f"cannot decode image {path}: {e}") from e


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file's header, without decoding the pixels."""
    path = Path(path)
    if not path.is_file():
        raise ImageFileError(f"image file {path} does not exist (moved, or not downloaded?)")
    if path.suffix.lower() in DICOM_SUFFIXES:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        return int(ds.Rows), int(ds.Columns)
    with Image.open(path) as im:
        return im.height, im.width


def resize_short_side(image: np.ndarray, short_side: int) -> np.ndarray:
    """Resize so that min(H, W) == short_side (aspect kept); never enlarges."""
    h, w = image.shape
    scale = short_side / min(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR), dtype=np.uint8)


class ImageStore:
    """A lazy stand-in for ``images.npy``: ``store[i]`` decodes file ``i`` (or reads its cache).

    Args:
        paths: absolute image paths, in index order.
        cache_dir: folder for resized copies (None: decode the original every time).
        cache_short_side: the short side of cached copies (the encoder's ``image_size``).
    """

    def __init__(self, paths: Sequence[str], cache_dir: str | Path | None = None,
                 cache_short_side: int | None = None):  # fmt: skip
        self.paths = [str(p) for p in paths]
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if self.cache_dir is not None and not cache_short_side:
            raise ValueError("ImageStore with a cache_dir needs cache_short_side (encoder size)")
        self.cache_short_side = cache_short_side
        self.ndim = 3  # like an (N, H, W) array
        self.dtype = np.uint8

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.paths),)  # sizes differ per image

    def _cache_path(self, i: int) -> Path:
        key = hashlib.sha1(f"{self.paths[i]}:{self.cache_short_side}".encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.png"

    def __getitem__(self, i) -> np.ndarray:
        if not isinstance(i, (int, np.integer)):
            raise TypeError("ImageStore is indexed by one integer at a time")
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"image {i} out of range for a store of {len(self)}")
        if self.cache_dir is None:
            return read_image(self.paths[i])
        cached = self._cache_path(i)
        if cached.is_file():
            return read_image(cached)
        image = resize_short_side(read_image(self.paths[i]), self.cache_short_side)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp.png")
        Image.fromarray(image).save(tmp)
        tmp.replace(cached)  # atomic: two data-loader workers never see half a file
        return image

    def __repr__(self) -> str:
        return f"ImageStore({len(self)} files, cache={self.cache_dir})"
