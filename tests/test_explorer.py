"""Notebook 07's own-image path: PNG, JPG and DICOM files become checked grayscale images."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import dicom_bytes
from PIL import Image

from cxrlib.explorer import describe_image, read_image_file
from cxrlib.model import ImageError


def _gradient(h: int = 40, w: int = 32) -> np.ndarray:
    return np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))


def _encoded(image: np.ndarray, fmt: str, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


_dicom = dicom_bytes


def test_png_round_trip_and_rgb_becomes_gray():
    image = _gradient()
    assert np.array_equal(read_image_file(_encoded(image, "PNG"), "x.png"), image)
    gray = read_image_file(_encoded(image, "PNG", "RGB"), "x.PNG")
    assert gray.shape == image.shape and gray.dtype == np.uint8


def test_jpg_is_read():
    out = read_image_file(_encoded(_gradient(), "JPEG"), "chest.jpg")
    assert out.shape == (40, 32) and abs(int(out[0, -1]) - 255) < 8


def test_dicom_is_windowed_to_uint8_and_monochrome1_inverted():
    values = np.tile(np.arange(0, 4000, 125), (40, 1))  # 12-bit ramp, 32 columns
    out = read_image_file(_dicom(values), "study.dcm")
    assert out.dtype == np.uint8 and out[0, 0] == 0 and out[0, -1] == 255
    inverted = read_image_file(_dicom(values, "MONOCHROME1"), "no_suffix")  # found by preamble
    assert inverted[0, 0] == 255 and inverted[0, -1] == 0


def test_bad_files_fail_with_a_clear_message():
    with pytest.raises(ImageError, match="unsupported file type '.gif'"):
        read_image_file(b"GIF89a", "x.gif")
    with pytest.raises(ImageError, match="x.png is not a readable image file"):
        read_image_file(b"not an image", "x.png")
    with pytest.raises(ImageError, match="flat.dcm is constant"):
        read_image_file(_dicom(np.zeros((8, 8))), "flat.dcm")


class _EchoBackend:
    name = "echo"

    def __init__(self):
        self.chats = []

    def answer(self, chats, max_new_tokens=None):
        self.chats += chats
        return [["cardiomegaly.", "The heart is enlarged."] for _ in chats]


def test_describe_image_asks_the_cot_questions():
    backend = _EchoBackend()
    out = describe_image(backend, _gradient())
    assert out == {
        "findings_text": "cardiomegaly.",
        "findings": ["cardiomegaly"],
        "report": "The heart is enlarged.",
    }
    assert len(backend.chats[0].turns) == 2 and len(backend.chats[0].images) == 1
    with pytest.raises(ImageError):
        describe_image(backend, _gradient().astype(np.float32))
