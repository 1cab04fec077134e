"""Image preprocessing: the one place a grayscale X-ray becomes the encoder's input tensor.

Training and inference both call ``ImageProcessor``; the geometry (shortest-edge resize to
``encoder.image_size``, then a center crop of that size) is the one ``cxrlib.data.boxes`` assumes
when it turns pixel boxes into the card's 0-100 boxes.

    >>> proc = ImageProcessor(cfg)
    >>> pixel_values = proc([image_a, image_b])   # uint8 (H, W) arrays -> (2, 3, S, S) float32

Getting a uint8 image: ``load_image(path)`` reads PNG/JPEG/TIFF (8 or 16 bit) and DICOM files;
``to_uint8(array)`` windows any 12/16-bit or float array to 0-255 (never ``np.clip(img, 0, 255)``,
which turns most of a 12-bit image white). ``check_image_content`` refuses images that cannot be
a radiograph (constant, almost uniform, pure noise) and warns on clipped or low-contrast ones;
inference runs it on every image of a ``cxrlib.inference.Chat``.

``paper`` uses Rad-DINO's own processor from the local Hugging Face cache (a transformers
``BitImageProcessor``: bicubic shortest-edge resize to 518, center crop 518, Rad-DINO's mean and
std). ``smoke``/``tiny`` build the same ``BitImageProcessor`` class from the preset, so the small
model sees images prepared exactly like the paper's, only smaller.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import AutoImageProcessor, BitImageProcessor

from cxrlib.tokenizer import MissingWeightsError, missing_weights_message

BICUBIC = 3  # PIL.Image.BICUBIC, the resampling Rad-DINO's processor config names


class ImageError(ValueError):
    """An input image the model cannot take (wrong type, dtype or shape)."""


class DegenerateImageError(ImageError):
    """An image whose content cannot be a radiograph (constant, almost uniform, pure noise)."""


class ImageContentWarning(UserWarning):
    """An image that may be a radiograph but looks clipped or very low in contrast."""


# Content thresholds, measured on PhantomCXR renders (16x16 to 582x518, every view and finding,
# tests/test_model.py): their 1-99th percentile spread is >= 189 gray levels, their lag-1 pixel
# autocorrelation >= 0.56 (> 0.9 at 144x128), and at most 15% of pixels sit at 0 or 255.
# Independent noise has autocorrelation ~0.
MIN_SPREAD = 8  # gray levels between the 1st and 99th percentile; less: nothing to see
LOW_CONTRAST_SPREAD = 48  # warn below this spread
MIN_AUTOCORRELATION = 0.3  # below: neighbouring pixels are unrelated, i.e. noise
MAX_CLIPPED_FRACTION = 0.3  # warn when more pixels than this sit at 0 or at 255
MAX_MODE_FRACTION = 0.9  # refuse when one gray value covers more of the image than this


def check_image(image: np.ndarray, where: str = "image") -> np.ndarray:
    """Raise ``ImageError`` unless ``image`` is a 2-D uint8 array (a grayscale X-ray)."""
    if isinstance(image, torch.Tensor):
        image = image.numpy()
    if not isinstance(image, np.ndarray):
        raise ImageError(f"{where} must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ImageError(
            f"{where} has dtype {image.dtype}; expected uint8 grayscale (H, W). Convert with "
            "cxrlib.model.to_uint8(img), which windows the image's own range to 0-255 "
            "(np.clip(img, 0, 255) would turn most of a 12-bit image white), or read the file "
            "with cxrlib.model.load_image(path)."
        )
    if image.ndim != 2:
        raise ImageError(
            f"{where} has shape {image.shape}; expected a grayscale (H, W) array "
            "(for an RGB array take one channel, e.g. img[..., 0])."
        )
    if min(image.shape) < 2:
        raise ImageError(f"{where} has shape {image.shape}; both sides must be at least 2 pixels")
    return image


def lag1_autocorrelation(image: np.ndarray) -> float:
    """Mean correlation of each pixel with its right and lower neighbour (1 = smooth, 0 = noise).

    Radiographs are smooth at the pixel scale; independent noise is not. NaN for a constant image.
    """
    x = image.astype(np.float64)
    x -= x.mean()
    var = float((x * x).mean())
    if var == 0:
        return float("nan")
    horizontal = float((x[:, 1:] * x[:, :-1]).mean())
    vertical = float((x[1:] * x[:-1]).mean())
    return (horizontal + vertical) / (2 * var)


def check_image_content(image: np.ndarray, where: str = "image") -> list[str]:
    """Refuse an image that cannot be a radiograph; warn when it looks clipped or flat.

    Checks (thresholds above, measured on PhantomCXR renders): dynamic range (1st-99th percentile
    spread, share of the most common gray value), spatial structure (lag-1 autocorrelation: noise has none), and clipping (share of
    pixels at 0 or 255).

    Args:
        image: a uint8 (H, W) array (``check_image`` first).
        where: how to name the image in messages.

    Returns:
        The warnings issued (also sent as ``ImageContentWarning``).

    Raises:
        DegenerateImageError: constant, almost uniform, or pure noise.
    """
    image = check_image(image, where)
    lo, hi = (float(v) for v in np.percentile(image, [1, 99]))
    fix = "check the file, its windowing (cxrlib.model.to_uint8) and which array was passed"
    if image.min() == image.max():
        raise DegenerateImageError(
            f"{where} is constant (every pixel = {int(image.min())}: blank, all black or all "
            f"white), so it cannot be a radiograph; {fix}"
        )
    if hi - lo < MIN_SPREAD:
        raise DegenerateImageError(
            f"{where} is almost uniform: 98% of its pixels lie within {hi - lo:.0f} gray levels "
            f"({lo:.0f}-{hi:.0f}); a radiograph spans far more (a 12-bit image shifted or "
            f"clipped to uint8?); {fix}"
        )
    counts = np.bincount(image.ravel(), minlength=256)
    mode = int(counts.argmax())
    if counts[mode] > MAX_MODE_FRACTION * image.size:
        raise DegenerateImageError(
            f"{where} is almost uniform: {counts[mode] / image.size:.0%} of its pixels have the "
            f"one value {mode} (saturated, e.g. np.clip of a 12-bit image to 0-255?); {fix}"
        )
    r = lag1_autocorrelation(image)
    if r < MIN_AUTOCORRELATION:
        raise DegenerateImageError(
            f"{where} looks like noise: neighbouring pixels are unrelated (lag-1 "
            f"autocorrelation {r:.2f}; radiographs are > {MIN_AUTOCORRELATION}); {fix}"
        )
    issued = []
    clipped = max(float((image == 0).mean()), float((image == 255).mean()))
    if clipped > MAX_CLIPPED_FRACTION:
        issued.append(
            f"{where}: {clipped:.0%} of its pixels are pure black or pure white, so detail is "
            "lost (clipped, e.g. np.clip of a 12-bit image?); convert with cxrlib.model.to_uint8"
        )
    if hi - lo < LOW_CONTRAST_SPREAD:
        issued.append(
            f"{where} has low contrast: 98% of its pixels lie within {hi - lo:.0f} gray levels; "
            "findings may be invisible to the model (window it with cxrlib.model.to_uint8)"
        )
    for message in issued:
        warnings.warn(message, ImageContentWarning, stacklevel=2)
    return issued


def to_uint8(
    image: np.ndarray,
    window: str = "range",
    percentiles: tuple[float, float] = (0.5, 99.5),
    invert: bool = False,
) -> np.ndarray:
    """Window a grayscale array of any depth (12/16-bit, float) linearly to uint8 0-255.

    Args:
        image: (H, W) integer or float array (NaN not allowed).
        window: ``"range"`` maps the image's min..max to 0..255 (nothing clipped);
            ``"percentiles"`` maps the given percentiles (robust to a few hot pixels; values
            outside are clipped).
        percentiles: the (low, high) percentiles of ``window="percentiles"``.
        invert: flip black and white (DICOM ``MONOCHROME1``: bone dark).

    Returns:
        A uint8 (H, W) array; a constant image becomes all zeros (and ``check_image_content``
        then refuses it).
    """
    x = np.asarray(image)
    if x.ndim != 2:
        raise ImageError(f"to_uint8 expects a grayscale (H, W) array, got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ImageError(f"to_uint8 expects an integer or float array, got dtype {x.dtype}")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ImageError("the image has NaN or infinite pixels: fix or mask them first")
    if window == "range":
        lo, hi = float(x.min()), float(x.max())
    elif window == "percentiles":
        lo, hi = (float(v) for v in np.percentile(x, percentiles))
    else:
        raise ValueError(f"unknown window '{window}': use 'range' or 'percentiles'")
    scaled = np.zeros_like(x) if hi <= lo else (np.clip(x, lo, hi) - lo) / (hi - lo)
    out = np.round(scaled * 255).astype(np.uint8)
    return 255 - out if invert else out


DICOM_SUFFIXES = (".dcm", ".dicom")


def load_image(
    source: str | Path | bytes, window: str = "range", name: str | None = None
) -> np.ndarray:
    """Read a radiograph (a file path, or a file's bytes) as the uint8 (H, W) array the model takes.

    The one reader of image files in the project (datasets, the explorer's upload, users' code).
    PNG/JPEG/TIFF (8 or 16 bit, gray or RGB: the first channel) through Pillow; DICOM (``.dcm``,
    or bytes with the ``DICM`` preamble) through pydicom, with its modality LUT (rescale
    slope/intercept) and VOI LUT (window) applied and ``MONOCHROME1`` inverted. Anything deeper
    than 8 bit is windowed by ``to_uint8`` (``window``: ``"range"`` or ``"percentiles"``).

    Args:
        source: a path, or the bytes of a file (e.g. from ``ipywidgets.FileUpload``).
        window: how deep images are brought to 0-255 (see ``to_uint8``).
        name: the file name for bytes (its suffix picks the reader) and for error messages.
    """
    if isinstance(source, bytes):
        name = name or "image"
        handle, dicom = io.BytesIO(source), source[128:132] == b"DICM"
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        name, handle, dicom = name or str(path), path, False
    dicom = dicom or Path(name).suffix.lower() in DICOM_SUFFIXES
    invert = False
    if dicom:
        pixels, invert = _read_dicom(handle, name)
    else:
        try:
            with Image.open(handle) as im:
                pixels = np.asarray(im)
        except UnidentifiedImageError as err:
            raise ImageError(
                f"{name} is not a readable image file (PNG, JPEG, TIFF or DICOM)"
            ) from err
    if pixels.ndim == 3:
        pixels = pixels[..., 0]
    if pixels.dtype == np.uint8 and not invert:
        return pixels
    return to_uint8(pixels, window=window, invert=invert)


def _read_dicom(handle, name: str) -> tuple[np.ndarray, bool]:
    """Pixel values of a one-frame DICOM after its modality and VOI LUTs, and MONOCHROME1."""
    # pydicom only when a DICOM file is given: PNG and JPEG need nothing beyond Pillow.
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(handle)
        pixels = ds.pixel_array
    except (InvalidDicomError, AttributeError, ValueError) as err:
        raise ImageError(f"{name}: not a DICOM file with pixel data ({err})") from err
    if pixels.ndim != 2:
        raise ImageError(
            f"{name}: DICOM pixel data has shape {pixels.shape}; expected one grayscale frame"
        )
    values = apply_voi_lut(apply_modality_lut(pixels, ds), ds)
    return values, getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1"


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W) uint8 -> (3, H, W) uint8 tensor; read-only arrays (memmapped datasets) are copied
    first, because torch cannot share memory it is not allowed to write."""
    if not image.flags.writeable:
        image = image.copy()
    return torch.from_numpy(image).unsqueeze(0).expand(3, -1, -1)


def build_hf_processor(cfg: dict) -> BitImageProcessor:
    """The Hugging Face processor for a preset: Rad-DINO's (``paper``) or one built from ``cfg``."""
    enc = cfg["encoder"]
    if enc["hf_id"]:
        try:
            proc = AutoImageProcessor.from_pretrained(enc["hf_id"], local_files_only=True)
        except OSError as err:
            raise MissingWeightsError(missing_weights_message(enc["hf_id"])) from err
        crop = proc.crop_size["height"] if getattr(proc, "crop_size", None) else None
        if crop is not None and crop != enc["image_size"]:
            raise ValueError(
                f"{enc['hf_id']}'s processor crops to {crop} px but encoder.image_size is "
                f"{enc['image_size']}; set encoder.image_size: {crop} in the preset"
            )
        return proc
    size = enc["image_size"]
    return BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": size},
        resample=BICUBIC,
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(enc["image_mean"]),
        image_std=list(enc["image_std"]),
        do_convert_rgb=True,
    )


class ImageProcessor:
    """Grayscale uint8 ``(H, W)`` images -> normalised ``(N, 3, S, S)`` float tensors.

    Args:
        cfg: a resolved preset (``cxrlib.config.load_preset``); reads ``cfg["encoder"]``.
    """

    def __init__(self, cfg: dict):
        self.image_size = int(cfg["encoder"]["image_size"])
        self.hf = build_hf_processor(cfg)

    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Preprocess a list of images.

        Args:
            images: grayscale uint8 arrays of shape (H, W); sizes may differ.

        Returns:
            FloatTensor (N, 3, S, S) with S = ``encoder.image_size``.
        """
        if isinstance(images, np.ndarray) and images.ndim == 2:
            images = [images]
        if len(images) == 0:
            raise ImageError("ImageProcessor got an empty list of images")
        # Gray -> 3 identical channels, channels first, so the HF processor never has to guess
        # the layout (an (H, 3) image would be ambiguous).
        tensors = [_to_tensor(check_image(img, f"image {i}")) for i, img in enumerate(images)]
        out = self.hf(images=tensors, return_tensors="pt", input_data_format="channels_first")
        return out["pixel_values"].float()

    def __repr__(self) -> str:
        return f"ImageProcessor(image_size={self.image_size}, hf={type(self.hf).__name__})"
