"""Image content checks before inference and the uint8 conversion of deep images (issue 11,
items 4 and 5): degenerate images are refused, PhantomCXR renders pass, 12-bit images keep detail."""

import warnings

import numpy as np
import pytest
from conftest import dicom_bytes
from PIL import Image

from cxrlib.data.labels import Finding
from cxrlib.data.phantom import OBSERVATIONS, render
from cxrlib.inference import Chat, report_chat
from cxrlib.model import (
    DegenerateImageError,
    ImageContentWarning,
    ImageError,
    check_image,
    check_image_content,
    load_image,
    to_uint8,
)
from cxrlib.model.processor import lag1_autocorrelation

SIZES = [(144, 128), (72, 64), (16, 16), (582, 518)]  # tiny, smoke, the smallest, paper


def phantom(size=(144, 128), seed=0, view="PA", findings=()):
    return render(list(findings), view, size, patient_seed=seed, acquisition_seed=seed + 50).image


def _degenerate():
    rng = np.random.default_rng(0)
    shape = (144, 128)
    black_with_label = np.zeros(shape, np.uint8)
    black_with_label[:3, :20] = 255  # a burnt-in marker does not make it an image
    return {
        "all black": np.zeros(shape, np.uint8),
        "all white": np.full(shape, 255, np.uint8),
        "constant gray": np.full(shape, 128, np.uint8),
        "black with a marker": black_with_label,
        "uniform noise": rng.integers(0, 256, shape, dtype=np.uint8),
        "gaussian noise": rng.normal(128, 40, shape).clip(0, 255).astype(np.uint8),
        "12-bit shifted to 0-5": (phantom() // 50).astype(np.uint8),
    }


@pytest.mark.parametrize("kind", list(_degenerate()))
def test_degenerate_images_are_refused_before_inference(kind):
    image = _degenerate()[kind]
    with pytest.raises(DegenerateImageError, match="cannot be a radiograph|uniform|noise"):
        check_image_content(image, "the image")
    with pytest.raises(DegenerateImageError, match="image 0 of the chat"):
        report_chat([image], cot=True)
    Chat(report_chat([phantom()]).turns, [image], check_content=False)  # probing on purpose


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("view", ["PA", "AP", "LATERAL"])
def test_phantom_renders_pass_without_warnings(size, view):
    for seed in range(6):
        findings = [Finding(OBSERVATIONS[seed % len(OBSERVATIONS)], severity="severe")] if seed % 2 else []  # fmt: skip
        image = phantom(size, seed, view, findings)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert check_image_content(image) == []


def test_the_project_dataset_images_pass(tmp_path):
    from cxrlib.config import load_preset
    from cxrlib.data.datasets import build_datasets

    cfg = load_preset("smoke", {"data": {"max_studies": 8, "longitudinal_patients": 2}})
    build_datasets(cfg, tmp_path, workers=1)
    images = np.load(tmp_path / "images.npy")
    assert len(images) >= 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i, image in enumerate(images):
            check_image_content(image, f"dataset image {i}")


def test_noise_and_radiographs_are_far_apart():
    rng = np.random.default_rng(1)
    assert abs(lag1_autocorrelation(rng.integers(0, 256, (144, 128)))) < 0.05
    assert lag1_autocorrelation(phantom()) > 0.9
    assert np.isnan(lag1_autocorrelation(np.zeros((4, 4))))


def test_clipped_and_low_contrast_images_warn():
    image = phantom().astype(np.int32)
    clipped = np.clip(image * 3, 0, 255).astype(np.uint8)  # over-exposed: the lungs go white
    with pytest.warns(ImageContentWarning, match="pure black or pure white"):
        check_image_content(clipped)
    flat = (100 + image // 8).astype(np.uint8)  # 32 gray levels
    with pytest.warns(ImageContentWarning, match="low contrast"):
        check_image_content(flat)


# --- 16-bit images (item 5) ------------------------------------------------------------------


def twelve_bit(seed=0):
    """A PhantomCXR render as a 12-bit detector would store it (0-4095 in uint16)."""
    return (phantom(seed=seed).astype(np.uint16) * 16 + 7).astype(np.uint16)


def test_the_uint16_message_no_longer_advises_clipping():
    with pytest.raises(ImageError) as err:
        check_image(twelve_bit())
    assert "to_uint8" in str(err.value) and "load_image" in str(err.value)
    assert "Convert with np.clip(img, 0, 255)" not in str(err.value)


def test_to_uint8_keeps_a_12_bit_image_that_clipping_saturates():
    image = twelve_bit()
    clipped = np.clip(image, 0, 255).astype(np.uint8)  # the old advice
    assert (clipped == 255).mean() > 0.5
    with pytest.raises(DegenerateImageError):  # almost all white: refused
        check_image_content(clipped)
    converted = to_uint8(image)
    assert (converted == 255).mean() < 0.02
    original = phantom().astype(float)
    assert np.corrcoef(converted.ravel(), original.ravel())[0, 1] > 0.999  # linear, to rounding
    assert len(np.unique(converted)) >= len(np.unique(phantom())) - 1  # no gray level lost
    assert check_image_content(converted) == []
    robust = to_uint8(image, window="percentiles")
    assert robust.dtype == np.uint8 and check_image_content(robust) == []
    assert (to_uint8(image, invert=True).astype(int) + converted == 255).all()


def test_to_uint8_bad_input():
    with pytest.raises(ImageError, match="NaN"):
        to_uint8(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(ImageError, match="grayscale"):
        to_uint8(np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="unknown window"):
        to_uint8(np.zeros((2, 2)), window="auto")
    assert (to_uint8(np.full((4, 4), 9.0)) == 0).all()


def test_load_image_reads_16_bit_png_and_dicom(tmp_path):
    image = twelve_bit()
    Image.fromarray(image).save(tmp_path / "x.png")
    stretched = to_uint8(phantom()).astype(int)  # the 8-bit original, windowed to 0-255
    assert np.abs(load_image(tmp_path / "x.png").astype(int) - stretched).max() <= 1
    Image.fromarray(phantom()).save(tmp_path / "x8.png")
    assert (load_image(tmp_path / "x8.png") == phantom()).all()

    # MONOCHROME1: bone dark
    (tmp_path / "x.dcm").write_bytes(dicom_bytes(4095 - image, "MONOCHROME1"))
    assert np.abs(load_image(tmp_path / "x.dcm").astype(int) - stretched).max() <= 1
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")
