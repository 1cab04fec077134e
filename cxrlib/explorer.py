"""Notebook 07's "your own image" path: read a PNG, JPG or DICOM file and ask the model about it.

    >>> image = read_image_file(Path("chest.png").read_bytes(), "chest.png")   # (H, W) uint8
    >>> describe_image(backend, image)["report"]

The file goes through the same checks (``check_image``) and the same CoT request
(``report_chat`` -> ``Backend.answer``) as every test study; nothing here is specific to widgets.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cxrlib.inference import Backend, parse_findings, report_chat
from cxrlib.model import ImageError, check_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")
WINDOW_PERCENTILES = (0.5, 99.5)  # DICOM values outside are clipped before scaling to 0-255


def read_image_file(content: bytes, name: str) -> np.ndarray:
    """A grayscale ``(H, W)`` uint8 radiograph from a file's bytes; ``ImageError`` if unusable.

    Args:
        content: the file's bytes (e.g. from ``ipywidgets.FileUpload``).
        name: its file name; the suffix picks the reader (a DICOM preamble is also recognised).
    """
    suffix = Path(name).suffix.lower()
    if suffix in DICOM_SUFFIXES or content[128:132] == b"DICM":
        return check_image(_read_dicom(content, name), name)
    if suffix not in IMAGE_SUFFIXES:
        raise ImageError(f"{name}: unsupported file type '{suffix}'; give a PNG, JPG or DICOM file")
    try:
        with Image.open(io.BytesIO(content)) as im:
            return check_image(np.asarray(im.convert("L")), name)
    except UnidentifiedImageError as err:
        raise ImageError(f"{name} is not a readable {suffix[1:].upper()} image") from err


def _read_dicom(content: bytes, name: str) -> np.ndarray:
    # pydicom only when a DICOM file is given: PNG and JPG need nothing beyond Pillow.
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(content))
        pixels = ds.pixel_array
    except (InvalidDicomError, AttributeError, ValueError) as err:
        raise ImageError(f"{name}: not a DICOM file with pixel data ({err})") from err
    if pixels.ndim != 2:
        raise ImageError(
            f"{name}: DICOM pixel data has shape {pixels.shape}; expected one grayscale frame"
        )
    values = apply_voi_lut(apply_modality_lut(pixels, ds), ds).astype(np.float64)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":  # bright = low values
        values = values.max() - values
    lo, hi = np.percentile(values, WINDOW_PERCENTILES)
    if hi <= lo:
        raise ImageError(f"{name}: the DICOM image is blank (all pixels {lo})")
    return np.round(255 * np.clip((values - lo) / (hi - lo), 0, 1)).astype(np.uint8)


def describe_image(backend: Backend, image: np.ndarray, max_new_tokens: int | None = None) -> dict:
    """The model's chain-of-thought answer for one image: turn 1, its parsed findings, the report."""
    chat = report_chat([check_image(image, "the uploaded image")], cot=True)
    turn1, report = backend.answer([chat], max_new_tokens)[0]
    return {"findings_text": turn1, "findings": parse_findings(turn1), "report": report}
