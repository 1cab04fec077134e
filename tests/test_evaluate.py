"""Evaluation of inference records on hand-made predictions (no model needed)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import example_study

from cxrlib import evaluate, metrics
from cxrlib.constants import CHEXPERT_LABELS
from cxrlib.labeler import RuleBasedLabeler, label_report

NORMAL = "The heart is normal in size. The lungs are clear. No pleural effusion."
CARDIO = "The heart is enlarged. Small left pleural effusion."
EDEMA = "Mild pulmonary edema. No pneumothorax."


def record(study, reference, report, views=("PA",), mode="single", findings=None, cot=True):
    return {
        "study_id": study,
        "mode": mode,
        "cot": cot,
        "views": list(views),
        "reference": reference,
        "report": report,
        "findings": findings,
    }


def test_scoring_rows_follow_the_protocol():
    single = [record("a", NORMAL, NORMAL, ["PA"]), record("a", NORMAL, NORMAL, ["LATERAL"])]
    multi = [record("b", CARDIO, CARDIO, ["PA", "LATERAL"], mode="multi_image")]
    assert len(evaluate.scoring_rows(single, "all")) == 2
    assert len(evaluate.scoring_rows(single, "frontal")) == 1
    assert len(evaluate.scoring_rows(multi, "frontal")) == 1  # once per frontal image
    assert len(evaluate.scoring_rows(multi, "all")) == 2
    lateral_only = [record("c", EDEMA, EDEMA, ["LATERAL"], mode="multi_study")]
    assert evaluate.scoring_rows(lateral_only, "frontal") == []
    with pytest.raises(ValueError, match="views must be"):
        evaluate.scoring_rows(single, "side")


def test_report_metrics_agree_with_direct_computation():
    records = [
        record("a", NORMAL, NORMAL),
        record("b", CARDIO, NORMAL),
        record("c", CARDIO, CARDIO, ["AP"]),
        record("d", EDEMA, CARDIO, ["LATERAL"]),
    ]
    labeler = RuleBasedLabeler()
    got = evaluate.report_metrics(records, labeler, "frontal", bootstrap_samples=20, meteor="none")
    assert got["n"] == 3 and got["labeler"] == labeler.name and got["views"] == "frontal"
    refs = [label_report(t) for t in (NORMAL, CARDIO, CARDIO)]
    gens = [label_report(t) for t in (NORMAL, NORMAL, CARDIO)]
    assert got["clinical"] == metrics.clinical_f1(refs, gens)
    # Cardiomegaly: one hit, one miss -> F1 2/3.
    assert got["clinical"]["per_label"]["Cardiomegaly"] == pytest.approx(2 / 3)
    assert set(got["clinical_ci"]) == set(metrics.CLINICAL_KEYS)
    lang = metrics.language_metrics([NORMAL, CARDIO, CARDIO], [NORMAL, NORMAL, CARDIO], "none")
    assert got["language"] == lang
    row = evaluate.summary_row("cot", got)
    assert row["mF1-14"] == pytest.approx(100 * got["clinical"]["mF1-14"])
    assert row["METEOR"] is None


def test_report_metrics_rejects_wrong_records():
    with pytest.raises(ValueError, match="no records to score"):
        evaluate.report_metrics([record("a", NORMAL, NORMAL, ["LATERAL"])], views="frontal")
    with pytest.raises(ValueError, match="need the keys"):
        evaluate.report_metrics([{"mode": "single", "views": ["PA"], "report": "x"}])


def test_label_texts_labels_each_text_once():
    calls = []

    class Counting(RuleBasedLabeler):
        def __call__(self, texts):
            calls.append(list(texts))
            return super().__call__(texts)

    frame = evaluate.label_texts([CARDIO, NORMAL, CARDIO, None], Counting())
    assert calls == [[CARDIO, NORMAL, ""]]
    assert frame["Cardiomegaly"].tolist()[:3] == [1, 0, 1] and len(frame) == 4


def test_cot_findings_metrics():
    labels = {
        "a": {"Cardiomegaly": 1, "Edema": -1},
        "b": {"Pleural Effusion": 1},
        "c": {},
    }
    records = [
        record("a", "", "", findings=["cardiomegaly"]),  # hit; edema uncertain = absent
        record("b", "", "", findings=None),  # malformed: names nothing -> one FN
        record("c", "", "", findings=["edema"]),  # FP
    ]
    got = evaluate.cot_findings_metrics(records, labels)
    assert got["n"] == 3 and got["malformed"] == 1
    assert got["per_finding"]["cardiomegaly"] == 1.0
    assert got["per_finding"]["pleural effusion"] == 0.0
    assert got["micro_f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))


def conv(task, prediction, reference, **meta):
    return {"task": task, "meta": meta, "references": [reference], "predictions": [prediction]}


def test_grounding_metrics():
    box = [[10, 10, 30, 30]]
    records = [
        conv("organ_grounding", "[10,10,30,30]", "[10,10,30,30]", boxes=box),
        conv("finding_grounding", "Yes. [20,10,40,30].", "Yes. [10,10,30,30].", boxes=box),
        conv("finding_grounding", "Not present.", "Yes. [10,10,30,30].", boxes=box),
        conv("phrase_grounding", "garbage", "[10,10,30,30].", boxes=box),
        conv("finding_grounding", "Not present.", "Not present.", boxes=[]),  # not a box item
        conv(
            "multi_finding_grounding",
            "edema [10,10,30,30].",
            "edema [10,10,30,30], cardiomegaly [50,50,70,70].",
            boxes={"edema": box, "cardiomegaly": [[50, 50, 70, 70]]},
        ),
    ]
    got = evaluate.grounding_metrics(records)
    assert got["organ_grounding"]["mIoU"] == 1.0
    assert got["finding_grounding"]["n"] == 2 and got["finding_grounding"]["said_absent"] == 1
    assert got["finding_grounding"]["ious"] == pytest.approx([1 / 3, 0.0])
    assert got["phrase_grounding"]["malformed"] == 1
    assert got["multi_finding_grounding"]["ious"] == [1.0, 0.0]
    overall = got["overall"]
    assert overall["n"] == 6 and overall["accuracy"] == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="no grounding items"):
        evaluate.grounding_metrics([records[4]])


def test_vqa_metrics():
    records = [
        conv("vqa", "Yes.", "yes", question_type="presence", answer_type="closed"),
        conv(
            "vqa",
            "left lower zone",
            "right lower zone",
            question_type="location",
            answer_type="open",
        ),  # fmt: skip
        conv(
            "difference_vqa",
            "new edema",
            "new edema",
            question_type="difference",
            answer_type="open",
        ),  # fmt: skip
        conv("grounded_organ", "heart", "heart"),
        conv("single_disease", "No.", "Yes."),
    ]
    got = evaluate.vqa_metrics(records)
    assert got["vqa"]["accuracy"] == pytest.approx(2 / 3)
    assert got["vqa"]["by_question_type"]["location"]["accuracy"] == 0.0
    assert got["vqa"]["by_answer_type"]["closed"]["accuracy"] == 1.0
    assert got["vqa"]["by_task"]["difference_vqa"]["accuracy"] == 1.0
    assert got["naming"]["grounded_organ"]["accuracy"] == 1.0
    assert got["naming"]["single_disease"]["accuracy"] == 0.0


def test_constant_box_baseline_answers_the_mean_training_box():
    def frontal(organ_box, finding_box):
        return {"view": "PA", "hw": [100, 100], "organ_boxes": {"heart": organ_box},
                "finding_boxes": [{"finding": {"observation": "Cardiomegaly"}, "box": finding_box}]}  # fmt: skip

    train = [
        {"images": [frontal([30, 40, 70, 80], [20, 40, 80, 80])]},
        {"images": [frontal([34, 44, 74, 84], [24, 44, 84, 84]), {"view": "LATERAL", "hw": [100, 100],
          "organ_boxes": {"heart": [0, 0, 10, 10]}}]},  # lateral: not counted
    ]  # fmt: skip
    boxes = evaluate.mean_training_boxes(train)
    assert boxes["organ:heart"] == [32, 42, 72, 82]
    assert boxes["finding:cardiomegaly"] == boxes["abnormal"] == [22, 42, 82, 82]
    records = [
        conv("organ_grounding", "x", "x", organ="heart", boxes=[[32, 42, 72, 82]]),
        conv("finding_grounding", "x", "x", finding="cardiomegaly", boxes=[[0, 0, 10, 10]]),
        conv("phrase_grounding", "x", "x", finding="edema", boxes=[[0, 0, 10, 10]]),  # no box
    ]
    got = evaluate.constant_box_metrics(records, train)
    assert got["organ_grounding"]["mIoU"] == 1.0
    assert got["finding_grounding"]["mIoU"] == 0.0 and got["phrase_grounding"]["n"] == 1
    assert got["overall"]["accuracy"] == pytest.approx(1 / 3)


def test_constant_vqa_baseline_uses_training_answers_only():
    def train_conv(qtype, answer):
        return {"task": "vqa", "meta": {"question_type": qtype},
                "turns": [{"user": "q", "assistant": answer}]}  # fmt: skip

    answers = evaluate.most_common_answers(
        [
            train_conv("presence", "no"),
            train_conv("presence", "no"),
            train_conv("presence", "yes"),
            train_conv("view", "PA"),
        ]  # fmt: skip
    )
    assert answers == {"presence": "no", "view": "PA"}
    records = [
        conv("vqa", "?", "no", question_type="presence", answer_type="closed"),
        conv("vqa", "?", "yes", question_type="presence", answer_type="closed"),
        conv("vqa", "?", "left", question_type="location", answer_type="open"),  # unseen type
    ]
    got = evaluate.constant_vqa_metrics(records, answers)
    assert got["accuracy"] == pytest.approx(1 / 3)
    assert got["by_question_type"]["location"]["accuracy"] == 0.0


def test_most_common_report():
    # "No Finding" is the most common pattern (4 of 7); NORMAL its most frequent text.
    train = [NORMAL, NORMAL, "Lungs are clear.", NORMAL, CARDIO, CARDIO, EDEMA]
    assert evaluate.most_common_report(train) == NORMAL
    # Same pattern, two texts once each: the shorter wins.
    assert evaluate.most_common_report([NORMAL, "Lungs are clear.", CARDIO]) == "Lungs are clear."
    assert evaluate.most_common_report([CARDIO, CARDIO, EDEMA]) == CARDIO
    with pytest.raises(ValueError, match="at least one non-empty"):
        evaluate.most_common_report(["", None])


def test_nearest_neighbour_reports():
    train = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    query = np.array([[0.9, 0.1], [0.0, 5.0], [2.0, 2.1]])
    reports, index = evaluate.nearest_neighbour_reports(train, ["a", "b", "c"], query)
    assert index.tolist() == [0, 1, 2] and reports == ["a", "b", "c"]
    with pytest.raises(ValueError, match="same D"):
        evaluate.nearest_neighbour_reports(train, ["a", "b", "c"], np.ones((2, 3)))
    with pytest.raises(ValueError, match="reports"):
        evaluate.nearest_neighbour_reports(train, ["a"], query)
    swapped = evaluate.with_reports([record("a", NORMAL, CARDIO)], "x")
    assert swapped[0]["report"] == "x" and swapped[0]["reference"] == NORMAL


def test_labeler_agreement_by_hand():
    texts = ["Cardiomegaly.", "Cardiomegaly.", "No effusion.", "Possible edema."]
    empty = {k: None for k in CHEXPERT_LABELS}
    ref = [
        dict(empty, Cardiomegaly=1),
        dict(empty, **{"No Finding": 1}),  # labeler says cardiomegaly: FP
        dict(empty, Edema=1),  # labeler misses: FN
        dict(empty, Edema=-1),
    ]
    table = evaluate.labeler_agreement(texts, ref)
    assert table.loc["Cardiomegaly", "precision"] == 0.5
    assert table.loc["Cardiomegaly", "recall"] == 1.0
    assert table.loc["Edema", "recall"] == 0.0 and table.loc["Edema", "n_ref"] == 1
    unc = evaluate.labeler_agreement(texts, ref, uncertain_as_positive=True)
    assert unc.loc["Edema", "n_ref"] == 2 and unc.loc["Edema", "f1"] == pytest.approx(2 / 3)
    assert {"macro", "micro"} <= set(table.index)
    with pytest.raises(ValueError, match="reference label rows"):
        evaluate.labeler_agreement(texts, ref[:2])


def test_per_label_table_and_markdown():
    records = [record("a", CARDIO, CARDIO), record("b", NORMAL, NORMAL)]
    result = evaluate.report_metrics(records, RuleBasedLabeler(), bootstrap_samples=0,
                                     language=False)  # fmt: skip
    table = evaluate.per_label_table({"cot": result})
    assert list(table.index) == CHEXPERT_LABELS and table.loc["Cardiomegaly", "cot"] == 100
    frame = pd.DataFrame([{"setting": "cot", "n": 8.0, "mF1-14": 12.345, "x": None}])
    md = evaluate.markdown_table(frame)
    assert md.splitlines()[0] == "| setting | n | mF1-14 | x |"
    assert "| cot | 8 | 12.3 | - |" in md
    indexed = evaluate.markdown_table(frame.set_index("setting").rename_axis("run"), digits=2)
    assert indexed.splitlines()[0].startswith("| run |") and "12.35" in indexed


def test_held_out_studies_mix_sources():
    studies = [{"study_id": f"iu{i}", "split": "test", "source": "iu"} for i in range(6)] + [
        {"study_id": f"lg{i}", "split": "test", "source": "longitudinal"} for i in range(2)
    ]
    studies.append({"study_id": "tr", "split": "train", "source": "iu"})
    assert len(evaluate.held_out_studies(studies)) == 8
    picked = evaluate.held_out_studies(studies, 4)
    assert [s["study_id"] for s in picked] == ["iu0", "iu1", "lg0", "lg1"]
    with pytest.raises(ValueError, match="no studies in the test split"):
        evaluate.held_out_studies(studies[-1:])


def test_records_round_trip(tmp_path):
    records = [record("a", NORMAL, CARDIO, findings=["cardiomegaly"]), {"x": np.int64(3)}]
    path = evaluate.save_records(records, tmp_path / "sub" / "r.jsonl")
    back = evaluate.load_records(path)
    assert back[0] == records[0] and back[1] == {"x": 3}


def test_findings_jaccard():
    labels = {"a": {"Cardiomegaly": 1, "Edema": 1}, "b": {}}
    assert evaluate.findings_jaccard(record("a", "", "", findings=["edema"]), labels) == 0.5
    assert evaluate.findings_jaccard(record("b", "", "", findings=[]), labels) == 1.0
    assert evaluate.findings_jaccard(record("b", "", "", findings=None), labels) is None


def test_image_features_of_a_toy_model():
    from cxrlib.model.toy import toy_model

    model, _, cfg = toy_model("smoke")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (72, 64), dtype=np.uint8) for _ in range(3)]
    feats = evaluate.image_features(model, images, cfg, batch_size=2)
    assert feats.shape == (3, cfg["encoder"]["hidden_size"]) and np.isfinite(feats).all()
    # The same image twice -> the same features; retrieval then finds it.
    again = evaluate.image_features(model, [images[1]], cfg)
    assert np.allclose(again[0], feats[1], atol=1e-5)
    _, index = evaluate.nearest_neighbour_reports(feats, ["a", "b", "c"], again)
    assert index.tolist() == [1]


def test_junk_outputs_are_counted_and_flagged_next_to_the_clinical_table():
    """Issue 11, item 6: empty or non-report outputs read as 'No Finding' and score on a normal
    test set; the table now says how many there are and flags the setting."""
    junk = ["", ".", "[10, 20, 30, 40]", "Provide a description of the findings in the radiology image."]  # fmt: skip
    records = [record(str(i), NORMAL, t) for i, t in enumerate(junk)] + [
        record("x", NORMAL, NORMAL)
    ]
    with pytest.warns(UserWarning, match="4 of 5 outputs are not reports"):
        got = evaluate.report_metrics(
            records, RuleBasedLabeler(), bootstrap_samples=0, language=False
        )
    assert got["clinical"]["per_label"]["No Finding"] == 1.0  # CheXpert's rule is kept
    d = got["degenerate"]
    assert d["counts"] == {"empty": 1, "boxes": 1, "no_words": 1, "prompt_copy": 1}
    assert d["degenerate"] == 4 and d["mostly_degenerate"]
    row = evaluate.summary_row("direct", got)
    assert row["degenerate %"] == 80.0 and row["flag"] == "MOSTLY DEGENERATE"
    good = evaluate.report_metrics([record("x", NORMAL, NORMAL)], RuleBasedLabeler(), bootstrap_samples=0, language=False)  # fmt: skip
    results = {"direct": got, "cot": good}
    table = evaluate.degenerate_table(results)
    assert table.loc["direct", "empty"] == 1 and table.loc["cot", "degenerate %"] == 0.0
    assert table.loc["cot", "flag"] == ""
    note = evaluate.degenerate_note(results)
    assert "direct (4 of 5" in note and "cot" not in note.split("quality:")[1]
    assert evaluate.degenerate_note({"cot": good}) == ""
    assert "MOSTLY DEGENERATE" in evaluate.markdown_table(table)


# --- scorer notes and box tasks without boxes ---------------------------------------------------


def _fake_radgraph(monkeypatch):
    """``radgraph.F1RadGraph`` with the package's call signature (``F1RadGraph(reward_level,
    model_type=None, **kwargs)``, called as ``(refs=..., hyps=...)`` and returning (mean rewards,
    per-pair rewards, hypothesis annotations, reference annotations)); a fixed 0.25 partial."""
    import sys
    import types

    class F1RadGraph:
        def __init__(self, reward_level, model_type=None, **kwargs):
            assert reward_level == "all"

        def __call__(self, refs, hyps):
            n = len(hyps)
            return (0.5, 0.25, 0.2), ([0.5] * n, [0.25] * n, [0.2] * n), [{}] * n, [{}] * n

    monkeypatch.setitem(sys.modules, "radgraph", types.SimpleNamespace(F1RadGraph=F1RadGraph))
    monkeypatch.setattr("cxrlib.radgraph_f1.metadata.version", lambda name: "0.1.18")


def test_scorer_notes_name_every_scorer_and_version(monkeypatch):
    from cxrlib import __version__
    from cxrlib.radgraph_f1 import radgraph_scorer

    rule = RuleBasedLabeler()
    notes = evaluate.scorer_notes(rule, None, "RadGraph F1 not computed: no package")
    assert notes["clinical_f1"] == {
        "scorer": "rule-based-chexpert-v1",
        "version": f"cxrlib.labeler rule-based-chexpert-v1, cxrlib {__version__}",
    }
    assert notes["radgraph_f1"] == {"note": "RadGraph F1 not computed: no package"}
    assert (
        "parse_findings" in notes["turn1_findings_f1"] and __version__ in notes["turn1_findings_f1"]
    )
    assert set(evaluate.scorer_notes()) == {"turn1_findings_f1"}  # answer lists only (04, 05)
    _fake_radgraph(monkeypatch)
    scorer, note = radgraph_scorer()
    assert note is None
    notes = evaluate.scorer_notes(rule, scorer)
    assert notes["radgraph_f1"] == {"scorer": "radgraph 0.1.18 (radgraph-xl)"}


def test_chexbert_version_comes_from_the_installed_package(monkeypatch):
    """``f1chexbert.F1CheXbert(device=...)`` as the package defines it; version from metadata."""
    import sys
    import types

    from cxrlib import labeler as lab

    class F1CheXbert:
        def __init__(self, refs_filename=None, hyps_filename=None, device=None):
            self.device = device

    monkeypatch.setitem(sys.modules, "f1chexbert", types.SimpleNamespace(F1CheXbert=F1CheXbert))
    monkeypatch.setattr(lab, "chexbert_available", lambda: True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("importlib.metadata.version", lambda name: {"f1chexbert": "0.0.2"}[name])
    notes = evaluate.scorer_notes(lab.get_labeler("chexbert"))
    assert notes["clinical_f1"]["scorer"] == lab.CHEXBERT_NAME
    assert notes["clinical_f1"]["version"].startswith("f1chexbert 0.0.2")


def test_report_metrics_add_radgraph_when_given(monkeypatch):
    from cxrlib.radgraph_f1 import radgraph_scorer

    _fake_radgraph(monkeypatch)
    scorer, _ = radgraph_scorer()
    recs = [record("a", NORMAL, NORMAL), record("b", CARDIO, EDEMA)]
    out = evaluate.report_metrics(recs, RuleBasedLabeler(), bootstrap_samples=0, language=False,
                                  radgraph=scorer)  # fmt: skip
    assert out["radgraph"]["partial"] == 0.25 and out["radgraph"]["n"] == 2
    assert out["radgraph"]["scorer"] == "radgraph 0.1.18 (radgraph-xl)"
    assert evaluate.summary_row("x", out)["RadGraph F1"] == 25.0
    plain = evaluate.report_metrics(recs, RuleBasedLabeler(), bootstrap_samples=0, language=False)
    assert "radgraph" not in plain and "RadGraph F1" not in evaluate.summary_row("x", plain)


def test_box_tasks_are_dropped_only_when_no_image_has_their_boxes():
    def conv(task, boxes):
        return {"task": task, "meta": {"boxes": boxes}}

    convs = [conv("finding_grounding", []), conv("multi_finding_grounding", {}),
             conv("organ_grounding", [[1, 2, 3, 4]]), conv("vqa", None)]  # fmt: skip
    unboxed = {"images": [{"finding_boxes": [], "organ_boxes": {}, "hw": [40, 32]}]}
    kept, skipped = evaluate.drop_unboxed_tasks(convs, [unboxed])
    assert [c["task"] for c in kept] == ["organ_grounding", "vqa"]  # built only from boxes
    assert set(skipped) == {"finding_grounding", "multi_finding_grounding"}
    assert "no test image has a finding box" in skipped["finding_grounding"]
    # the phantom path: images with boxes keep every question, absent findings ("Not present.")
    # included, even when none of the questions drawn has a box
    boxed = example_study(with_prior=False)
    assert evaluate.drop_unboxed_tasks(convs, [boxed, unboxed]) == (convs, {})


def test_turn_agreement_counts_both_directions():
    records = [
        {"findings": ["cardiomegaly"], "report": "The heart is enlarged. The lungs are clear."},
        {"findings": ["pleural effusion", "cardiomegaly"], "report": "Heart size is normal. No effusion."},
        {"findings": [], "report": "There is a small right pneumothorax."},
        {"findings": None, "report": "malformed turn 1: not counted"},
    ]  # fmt: skip
    out = evaluate.turn_agreement(records)
    assert out["n"] == 3 and out["turn1_named"] == 3
    assert out["turn1_in_report"] == pytest.approx(1 / 3)  # only the first cardiomegaly
    assert out["report_positive"] == 2 and out["report_in_turn1"] == pytest.approx(1 / 2)
