"""Tests of the PhantomCXR renderer: determinism, seeds, every finding inside its box, side,
severity, organ boxes, the lateral view and bad input."""

from types import SimpleNamespace

import numpy as np
import pytest

from cxrlib.data.labels import Finding
from cxrlib.data.phantom import OBSERVATIONS, Rendered, render

SIZE = (144, 128)
# Observations drawn on one side of the chest (the others are central or devices).
SIDED = [o for o in OBSERVATIONS if o not in ("Cardiomegaly", "Enlarged Cardiomediastinum", "Support Devices")]  # fmt: skip


def _box_mask(boxes, size):
    mask = np.zeros(size, dtype=bool)
    for x1, y1, x2, y2 in boxes:
        mask[int(y1) : int(np.ceil(y2)), int(x1) : int(np.ceil(x2))] = True
    return mask


def _diff(findings, view="PA", size=SIZE, patient_seed=3, acquisition_seed=4):
    """|image with findings - image without| at the same seeds, and the rendered result."""
    base = render([], view, size, patient_seed, acquisition_seed)
    out = render(findings, view, size, patient_seed, acquisition_seed)
    return np.abs(out.image.astype(np.float32) - base.image), out


def _ctr(out):
    """Cardio-thoracic ratio from the organ boxes (heart width / width across both lungs)."""
    heart, right, left = out.organ_boxes["heart"], out.organ_boxes["right lung"], out.organ_boxes["left lung"]  # fmt: skip
    return (heart[2] - heart[0]) / (left[2] - right[0])


def test_render_returns_uint8_image_and_boxes():
    out = render([Finding("Pleural Effusion", side="left")], size=SIZE)
    assert isinstance(out, Rendered) and out.view == "PA"
    assert out.image.shape == SIZE and out.image.dtype == np.uint8
    assert out.image.std() > 20  # real contrast, not a flat image
    assert set(out.organ_boxes) == {"right lung", "left lung", "heart"}
    (finding, box), = out.finding_boxes  # fmt: skip
    assert finding.observation == "Pleural Effusion"
    assert 0 <= box[0] < box[2] <= SIZE[1] and 0 <= box[1] < box[3] <= SIZE[0]


def test_deterministic_for_the_seeds():
    findings = [Finding("Lung Lesion", side="right"), Finding("Support Devices", severity="severe")]
    a = render(findings, "AP", SIZE, patient_seed=7, acquisition_seed=2)
    b = render(findings, "AP", SIZE, patient_seed=7, acquisition_seed=2)
    assert np.array_equal(a.image, b.image)
    assert a.finding_boxes == b.finding_boxes and a.organ_boxes == b.organ_boxes


def test_different_seeds_differ_and_anatomy_follows_the_patient():
    a = render([], patient_seed=1, acquisition_seed=0)
    other_patient = render([], patient_seed=2, acquisition_seed=0)
    other_film = render([], patient_seed=1, acquisition_seed=1)
    assert np.abs(a.image.astype(int) - other_patient.image).mean() > 2
    assert np.abs(a.image.astype(int) - other_film.image).mean() > 2
    # A new film of the same patient moves the heart a little, not its size.
    widths = [o.organ_boxes["heart"][2] - o.organ_boxes["heart"][0] for o in (a, other_film)]
    assert abs(widths[0] - widths[1]) / widths[0] < 0.1


@pytest.mark.parametrize("view", ["PA", "LATERAL"])
@pytest.mark.parametrize("observation", OBSERVATIONS)
def test_each_finding_changes_pixels_inside_its_box(observation, view):
    diff, out = _diff([Finding(observation, side="left", severity="moderate")], view)
    boxes = [box for _, box in out.finding_boxes]
    assert boxes, f"{observation} got no box"
    inside = _box_mask(boxes, SIZE)
    assert diff[inside].mean() > 1.0
    assert diff[inside].mean() > 5 * diff[~inside].mean()


@pytest.mark.parametrize("observation", SIDED)
def test_side_is_the_patients_side(observation):
    for side, image_half in (("left", "right"), ("right", "left")):
        out = render([Finding(observation, side=side)], "PA", SIZE, patient_seed=5)
        assert out.finding_boxes
        for _, (x1, _, x2, _) in out.finding_boxes:
            centre = (x1 + x2) / 2
            assert (centre > SIZE[1] / 2) == (image_half == "right"), (observation, side)


def test_bilateral_finding_has_one_box_per_lung():
    out = render([Finding("Pleural Effusion", side="bilateral")], "PA", SIZE)
    centres = sorted((b[0] + b[2]) / 2 for _, b in out.finding_boxes)
    assert len(centres) == 2 and centres[0] < SIZE[1] / 2 < centres[1]
    lateral = render([Finding("Pleural Effusion", side="bilateral")], "LATERAL", SIZE)
    assert len(lateral.finding_boxes) == 1  # both lungs overlap on a lateral film


@pytest.mark.parametrize("observation", OBSERVATIONS)
def test_severe_changes_more_than_mild(observation):
    mild, _ = _diff([Finding(observation, side="right", severity="mild")])
    severe, _ = _diff([Finding(observation, side="right", severity="severe")])
    assert severe.sum() > 1.2 * mild.sum() > 0


def test_uncertain_renders_fainter():
    sure, _ = _diff([Finding("Consolidation", side="left", status=1)])
    maybe, _ = _diff([Finding("Consolidation", side="left", status=-1)])
    assert 0 < maybe.sum() < 0.8 * sure.sum()


def test_cardiomegaly_raises_the_cardiothoracic_ratio_above_half():
    for seed in range(5):
        normal = render([], "PA", SIZE, patient_seed=seed)
        big = render([Finding("Cardiomegaly", severity="mild")], "PA", SIZE, patient_seed=seed)
        assert _ctr(normal) < 0.5 < _ctr(big)


def test_organ_boxes_are_sensible():
    for seed in range(5):
        boxes = render([], "PA", SIZE, patient_seed=seed, acquisition_seed=seed).organ_boxes
        right, left, heart = boxes["right lung"], boxes["left lung"], boxes["heart"]
        centre = {k: ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for k, b in boxes.items()}
        # Radiological convention: the patient's right lung is on the image left.
        assert centre["right lung"][0] < centre["heart"][0] < centre["left lung"][0]
        assert right[2] <= left[0] + 2  # the lungs do not overlap across the midline
        assert heart[1] > max(right[1], left[1]) + 0.2 * SIZE[0]  # heart below the apices
        assert (heart[0] + heart[2]) / 2 > SIZE[1] / 2  # shifted to the patient's left
        for b in boxes.values():
            assert 0 <= b[0] < b[2] <= SIZE[1] and 0 <= b[1] < b[3] <= SIZE[0]


def test_lateral_view_renders_with_its_own_organ_boxes():
    pa = render([], "PA", SIZE, patient_seed=2)
    lat = render([], "LATERAL", SIZE, patient_seed=2)
    assert lat.view == "LATERAL" and lat.image.shape == SIZE and lat.image.std() > 20
    assert set(lat.organ_boxes) == {"lungs", "heart"}
    assert np.abs(lat.image.astype(int) - pa.image).mean() > 10
    # The heart lies in the front (image left) part of the lungs.
    lungs, heart = lat.organ_boxes["lungs"], lat.organ_boxes["heart"]
    assert (heart[0] + heart[2]) / 2 < (lungs[0] + lungs[2]) / 2


def test_ap_view_magnifies_the_heart():
    pa = render([], "PA", SIZE, patient_seed=4, acquisition_seed=1)
    ap = render([], "AP", SIZE, patient_seed=4, acquisition_seed=1)
    assert _ctr(ap) > _ctr(pa)


def test_a_worsening_finding_grows_in_place():
    prior = render(
        [Finding("Lung Lesion", side="left", severity="mild")], patient_seed=9, acquisition_seed=0
    )
    current = render(
        [Finding("Lung Lesion", side="left", severity="severe")], patient_seed=9, acquisition_seed=0
    )
    (_, small), (_, large) = prior.finding_boxes[0], current.finding_boxes[0]
    cx, cy = (small[0] + small[2]) / 2, (small[1] + small[3]) / 2
    assert large[0] <= cx <= large[2] and large[1] <= cy <= large[3]
    assert (large[2] - large[0]) > (small[2] - small[0])


def test_no_finding_draws_nothing():
    no_finding = SimpleNamespace(observation="No Finding", side=None, zone=None, severity=None, status=1)  # fmt: skip
    assert np.array_equal(render([no_finding]).image, render([]).image)
    assert render([no_finding]).finding_boxes == []


@pytest.mark.parametrize("size", [(16, 16), (72, 64), (582, 518)])
def test_other_sizes_render(size):
    out = render([Finding("Pneumothorax", side="right")], "PA", size)
    assert out.image.shape == size


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"size": (8, 8)}, "impossible image size"),
        ({"size": (0, 128)}, "impossible image size"),
        ({"size": (144,)}, "pair"),
        ({"size": "144x128"}, "pair"),
        ({"size": (144.5, 128)}, "whole numbers"),
        ({"view": "OBLIQUE"}, "unknown view"),
        ({"patient_seed": -1}, "patient_seed"),
        (
            {
                "findings": [
                    SimpleNamespace(
                        observation="Broken Heart", side=None, zone=None, severity=None, status=1
                    )
                ]
            },
            "unknown observation",
        ),  # fmt: skip
        (
            {
                "findings": [
                    SimpleNamespace(
                        observation="Edema", side="up", zone=None, severity=None, status=1
                    )
                ]
            },
            "unknown side",
        ),  # fmt: skip
        ({"findings": [{"observation": "Edema"}]}, "Finding objects"),
        ({"findings": Finding("Edema")}, "sequence"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, message):
    args = {"findings": [], **kwargs}
    with pytest.raises(ValueError, match=message):
        render(**args)
