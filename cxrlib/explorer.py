"""Notebook 07's "your own image" path: read a PNG, JPG or DICOM file and ask the model about it.

    >>> image = read_image_file(Path("chest.png").read_bytes(), "chest.png")   # (H, W) uint8
    >>> describe_image(backend, image)["report"]

The file goes through the same checks (``check_image``) and the same CoT request
(``report_chat`` -> ``Backend.answer``) as every test study; nothing here is specific to widgets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxrlib.inference import Backend, parse_findings, report_chat
from cxrlib.model import ImageError, check_image, check_image_content, load_image
from cxrlib.model.processor import DICOM_SUFFIXES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
WINDOW = "percentiles"  # deep (DICOM) images: the 0.5-99.5 percentiles to 0-255, hot pixels clipped


def read_image_file(content: bytes, name: str) -> np.ndarray:
    """A grayscale ``(H, W)`` uint8 radiograph from a file's bytes; ``ImageError`` if unusable.

    Args:
        content: the file's bytes (e.g. from ``ipywidgets.FileUpload``).
        name: its file name; the suffix picks the reader (a DICOM preamble is also recognised).
    """
    suffix = Path(name).suffix.lower()
    dicom = suffix in DICOM_SUFFIXES or content[128:132] == b"DICM"
    if not dicom and suffix not in IMAGE_SUFFIXES:
        raise ImageError(f"{name}: unsupported file type '{suffix}'; give a PNG, JPG or DICOM file")
    image = check_image(load_image(content, window=WINDOW, name=name), name)
    check_image_content(image, name)  # a blank or noise file fails here, with its name
    return image


def describe_image(backend: Backend, image: np.ndarray, max_new_tokens: int | None = None) -> dict:
    """The model's chain-of-thought answer for one image: turn 1, its parsed findings, the report."""
    chat = report_chat([check_image(image, "the uploaded image")], cot=True)
    turn1, report = backend.answer([chat], max_new_tokens)[0]
    return {"findings_text": turn1, "findings": parse_findings(turn1), "report": report}
