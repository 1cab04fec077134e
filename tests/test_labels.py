"""MeSH -> CheXpert findings, label vectors, coverage and splits."""

import json

import pytest

from cxrlib.constants import CHEXPERT_LABELS
from cxrlib.data.iuxray import MeshTerm, load_iu_reports
from cxrlib.data.labels import (
    Finding,
    coverage_summary,
    labels_from_findings,
    load_splits,
    make_splits,
    mesh_coverage,
    mesh_to_findings,
    save_splits,
)


@pytest.mark.parametrize(
    "term, expected",
    [
        ("Opacity/lung/base/left/mild", Finding("Lung Opacity", "left", "lower", "mild")),
        (
            "Pleural Effusion/bilateral/small",
            Finding("Pleural Effusion", "bilateral", None, "mild"),
        ),
        ("Pleural Effusion/right/large", Finding("Pleural Effusion", "right", None, "severe")),
        ("Pneumothorax/apex/right/moderate", Finding("Pneumothorax", "right", "upper", "moderate")),
        ("Pulmonary Atelectasis/lingula", Finding("Atelectasis", "left", "middle")),
        ("Airspace Disease/lung/middle lobe/right", Finding("Lung Opacity", "right", "middle")),
        ("Nodule/lung/upper lobe/left/right", Finding("Lung Lesion", "bilateral", "upper")),
        ("Cardiomegaly/severe", Finding("Cardiomegaly", severity="severe")),
        ("Cardiomegaly/borderline", Finding("Cardiomegaly", severity="mild", status=-1)),
        (
            "Costophrenic Angle/left/blunted",
            Finding("Pleural Effusion", "left", "lower", status=-1),
        ),
        ("Thickening/pleura/apex/bilateral", Finding("Pleural Other", "bilateral", "upper")),
        ("Fractures, Bone/ribs/left/healed", Finding("Fracture", "left")),
        ("Catheters, Indwelling/right", Finding("Support Devices", "right")),
        ("Calcified Granuloma/lung/base/right", Finding("Lung Lesion", "right", "lower")),
        ("Pulmonary Congestion/mild", Finding("Edema", severity="mild")),
    ],
)
def test_hand_picked_terms(term, expected):
    findings, unmapped = mesh_to_findings([term])
    assert findings == [expected] and unmapped == []


def test_qualifier_gates_and_unknown_terms():
    skipped = [
        "Markings/bronchovascular",  # needs interstitial/prominent
        "Mass/breast/large",  # not a lung lesion
        "Calcified Granuloma/ribs/left",  # a bone, not a lung lesion
        "Totally Unknown Term/left",
        "Scoliosis",
    ]
    findings, unmapped = mesh_to_findings(["Markings/lung/interstitial", *skipped, "normal"])
    assert findings == [Finding("Lung Opacity")]
    assert unmapped == skipped


def test_automatic_terms_and_duplicates_ignored():
    terms = [MeshTerm.parse("Pneumonia", major=False), "Opacity/lung", "Opacity/lung"]
    findings, unmapped = mesh_to_findings(terms)
    assert findings == [Finding("Lung Opacity")] and unmapped == []
    both, _ = mesh_to_findings(["Hydropneumothorax/left"])
    assert [f.observation for f in both] == ["Pneumothorax", "Pleural Effusion"]


def test_labels_from_findings():
    labels = labels_from_findings([], mentioned_negative=["Pneumothorax"])
    assert list(labels) == CHEXPERT_LABELS
    assert labels["No Finding"] == 1 and labels["Pneumothorax"] == 0 and labels["Edema"] is None
    labels = labels_from_findings([Finding("Edema"), Finding("Cardiomegaly", status=-1)])
    assert (labels["No Finding"], labels["Edema"], labels["Cardiomegaly"]) == (None, 1, -1)
    positive_wins = labels_from_findings([Finding("Edema", status=-1), Finding("Edema")])
    assert positive_wins["Edema"] == 1
    assert labels_from_findings([Finding("Support Devices")])["No Finding"] == 1  # CheXpert rule
    with pytest.raises(ValueError, match="unknown observations"):
        labels_from_findings([], mentioned_negative=["Pneumonitis"])


def test_finding_validation_and_round_trip():
    f = Finding("Pleural Effusion", "left", "lower", "moderate", -1)
    assert Finding.from_dict(json.loads(json.dumps(f.to_dict()))) == f
    with pytest.raises(ValueError, match="observation"):
        Finding("No Finding")
    with pytest.raises(ValueError, match="side='up'"):
        Finding("Edema", side="up")
    with pytest.raises(ValueError, match="unknown Finding keys"):
        Finding.from_dict({"observation": "Edema", "colour": "red"})


def test_coverage_on_iu():
    reports, _ = load_iu_reports()
    cov = mesh_coverage(reports)
    assert list(cov.columns) == ["heading", "count", "mapped", "unmapped", "observations"]
    assert cov["count"].sum() == sum(len(r.major_mesh) for r in reports)
    assert (cov["mapped"] + cov["unmapped"] == cov["count"]).all()
    top = cov.iloc[0]
    assert (top["heading"], top["observations"], top["unmapped"]) == ("normal", "No Finding", 0)
    summary = coverage_summary(cov)
    assert 50 < summary["mapped_pct"] < 70
    assert "Calcinosis" in summary["top_unmapped"]
    # every report maps without an error and the skips are counted
    unmapped = sum(len(mesh_to_findings(r.mesh)[1]) for r in reports)
    assert unmapped == summary["terms"] - summary["mapped"]


def test_coverage_of_term_lists():
    cov = mesh_coverage([["Opacity/lung", "Foo"], ["Opacity/lung/left"]])
    assert cov.set_index("heading").loc["Opacity", "mapped"] == 2
    assert cov.set_index("heading").loc["Foo", "unmapped"] == 1


def test_splits_deterministic_disjoint_fractions(tmp_path):
    ids = [f"CXR{i}" for i in range(1000)]
    splits = make_splits(ids, val_fraction=0.1, test_fraction=0.2, seed=3)
    assert splits == make_splits(list(reversed(ids)) + ids[:5], 0.1, 0.2, seed=3)
    assert splits != make_splits(ids, 0.1, 0.2, seed=4)
    sizes = {s: sum(v == s for v in splits.values()) for s in ("train", "val", "test")}
    assert sizes == {"train": 700, "val": 100, "test": 200}
    assert set(splits) == set(ids)  # each id in exactly one split (dict keys)
    path = save_splits(splits, tmp_path / "data" / "splits.json")
    assert load_splits(path) == splits


def test_split_errors(tmp_path):
    with pytest.raises(ValueError, match="sum below 1"):
        make_splits(["a", "b"], 0.6, 0.5)
    with pytest.raises(ValueError, match="no study ids"):
        make_splits([], 0.1, 0.1)
    with pytest.raises(FileNotFoundError, match="01-data-prep"):
        load_splits(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"a": "train", "b": "holdout"}))
    with pytest.raises(ValueError, match="no split"):
        load_splits(bad)
