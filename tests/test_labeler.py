"""The rule-based CheXpert-style labeler: mentions, negation, uncertainty, No Finding, backends."""

from __future__ import annotations

import sys
import types

import pandas as pd
import pytest

from cxrlib import labeler as lab
from cxrlib.constants import CHEXPERT_LABELS
from cxrlib.labeler import find_mentions, get_labeler, label_report, label_reports


def positives(labels: dict) -> set[str]:
    return {k for k, v in labels.items() if v == 1}


@pytest.mark.parametrize(
    "text, label, expected",
    [
        ("No pleural effusion.", "Pleural Effusion", 0),
        ("Possible small left pleural effusion.", "Pleural Effusion", -1),
        ("Heart size is enlarged.", "Cardiomegaly", 1),
        ("The heart is normal in size.", "Cardiomegaly", 0),
        ("Heart size is at the upper limits of normal.", "Cardiomegaly", -1),
        ("The heart is not enlarged.", "Cardiomegaly", 0),
        ("Pneumothorax is not seen.", "Pneumothorax", 0),
        ("No pneumothorax or pleural effusion.", "Pleural Effusion", 0),
        ("There is no focal consolidation, pleural effusion, or pneumothorax.", "Pneumothorax", 0),
        ("Pneumonia cannot be excluded.", "Pneumonia", -1),
        ("Atelectasis versus pneumonia in the right base.", "Atelectasis", -1),
        ("Left basilar opacity may represent atelectasis.", "Lung Opacity", 1),
        ("Left basilar opacity may represent atelectasis.", "Atelectasis", -1),
        ("No change in the moderate cardiomegaly.", "Cardiomegaly", 1),
        ("The lungs are free of focal airspace disease.", "Lung Opacity", 0),
        ("Interval resolution of the left pleural effusion.", "Pleural Effusion", 0),
        ("No pneumothorax, but there is a small right effusion.", "Pleural Effusion", 1),
        ("Negative for acute fracture.", "Fracture", 0),
        ("Old healed right rib fractures.", "Fracture", 1),
        ("Right PICC line with tip in the SVC.", "Support Devices", 1),
        ("Small pericardial effusion.", "Pleural Effusion", None),
        ("Blunting of the left costophrenic angle.", "Pleural Effusion", -1),
        ("Widened mediastinum.", "Enlarged Cardiomediastinum", 1),
        ("Cardiomediastinal silhouette is within normal limits.", "Enlarged Cardiomediastinum", 0),
        ("Calcified granuloma in the right upper lobe.", "Lung Lesion", 1),
        ("Mild pulmonary edema.", "Edema", 1),
        ("Pleural thickening at the left apex.", "Pleural Other", 1),
        ("Pleural thickening at the left apex.", "Pleural Effusion", None),
    ],
)
def test_sentences(text, label, expected):
    assert label_report(text)[label] == expected


def test_clear_lungs_is_no_finding():
    labels = label_report("Lungs are clear.")
    assert positives(labels) == {"No Finding"}
    assert all(labels[k] is None for k in CHEXPERT_LABELS if k != "No Finding")


def test_no_finding_rule():
    assert label_report("Mild cardiomegaly.")["No Finding"] is None
    assert label_report("Possible pneumonia.")["No Finding"] is None  # uncertain counts
    # Support devices alone do not make a study abnormal (CheXpert's rule).
    assert label_report("Pacemaker in place. Lungs are clear.")["No Finding"] == 1
    assert label_report("No pleural effusion.")["No Finding"] == 1
    assert label_report("")["No Finding"] == 1


def test_positive_beats_uncertain_beats_negative_across_sentences():
    text = "No effusion on the right. Possible left effusion. Small left effusion."
    assert label_report(text)["Pleural Effusion"] == 1
    assert label_report("No right effusion. Possible left effusion.")["Pleural Effusion"] == -1


def test_iu_deidentification_tokens_are_neutral():
    assert label_report("No XXXX pleural effusion.")["Pleural Effusion"] == 0
    assert positives(label_report("The XXXX are clear. XXXX XXXX.")) == {"No Finding"}
    assert label_report("Heart size XXXX enlarged.")["Cardiomegaly"] == 1


def test_negation_scope_ends_at_the_sentence():
    labels = label_report("No pneumothorax. Left lower lobe consolidation.")
    assert labels["Pneumothorax"] == 0 and labels["Consolidation"] == 1


def test_find_mentions_explains_labels():
    mentions = find_mentions("No effusion. Possible pneumonia.")
    assert [(m.observation, m.status) for m in mentions] == [
        ("Pleural Effusion", 0),
        ("Pneumonia", -1),
    ]
    assert mentions[1].phrase == "pneumonia"


def test_label_reports_frame():
    frame = label_reports(["Cardiomegaly.", "No effusion."])
    assert list(frame.columns) == CHEXPERT_LABELS and len(frame) == 2
    assert frame.loc[0, "Cardiomegaly"] == 1 and pd.isna(frame.loc[1, "Cardiomegaly"])
    assert str(frame["Cardiomegaly"].dtype) == "Int64"


def test_bad_input_is_a_clear_error():
    with pytest.raises(TypeError, match="must be a string"):
        label_report(None)
    with pytest.raises(ValueError, match="unknown labeler"):
        get_labeler("bert")


def test_auto_falls_back_to_rules(monkeypatch):
    monkeypatch.setattr(lab, "chexbert_available", lambda: False)
    labeler = get_labeler("auto")
    assert labeler.name == lab.RULE_BASED_NAME
    assert labeler(["Cardiomegaly."]).loc[0, "Cardiomegaly"] == 1
    with pytest.raises(FileNotFoundError, match="CheXbert is not available offline"):
        get_labeler("chexbert")


def test_chexbert_backend_maps_heads_to_labels(monkeypatch):
    """f1chexbert returns 14 heads in its own order ("" = blank); check our mapping."""

    class FakeF1CheXbert:
        def __init__(self, device=None):
            pass

        def get_label(self, report, mode="rrg"):
            assert mode == "classification"
            # Enlarged Cardiomediastinum, Cardiomegaly, ..., Support Devices, No Finding
            return ["", 1, -1, "", "", "", "", "", "", 0, "", "", "", ""]

    monkeypatch.setitem(sys.modules, "f1chexbert", types.SimpleNamespace(F1CheXbert=FakeF1CheXbert))
    monkeypatch.setattr(lab, "chexbert_available", lambda: True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    labeler = get_labeler("auto")
    assert labeler.name == lab.CHEXBERT_NAME
    labels = labeler.label("anything")
    assert labels["Cardiomegaly"] == 1 and labels["Lung Opacity"] == -1
    assert labels["Pleural Effusion"] == 0 and labels["No Finding"] is None
    assert labels["Enlarged Cardiomediastinum"] is None
    assert labeler(["a", "b"]).shape == (2, 14)
