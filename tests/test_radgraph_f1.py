"""RadGraph F1: the set arithmetic on hand-made annotations, and the adapter against a fake
``radgraph`` package with the real call signature (``F1RadGraph(reward_level, model_type=None,
**kwargs)``, called as ``f1(refs=..., hyps=...)`` -> ``(mean, rewards, hyp_ann, ref_ann)``)."""

import sys
import types

import pytest

from cxrlib.radgraph_f1 import corpus_f1, entity_set, pair_f1, radgraph_scorer

REF = {"entities": {
    "1": {"tokens": "effusion", "label": "OBS-DP", "relations": [["located_at", "2"]]},
    "2": {"tokens": "left", "label": "ANAT-DP", "relations": []},
    "3": {"tokens": "pneumothorax", "label": "OBS-DA", "relations": []},
}}  # fmt: skip
HYP = {"entities": {  # the same entities, but the effusion is not tied to "left"
    "1": {"tokens": "effusion", "label": "OBS-DP", "relations": []},
    "2": {"tokens": "left", "label": "ANAT-DP", "relations": []},
    "3": {"tokens": "pneumothorax", "label": "OBS-DA", "relations": []},
}}  # fmt: skip
EMPTY = {"entities": {}}


def test_levels_on_hand_made_annotations():
    assert entity_set(REF, "partial") == {("effusion", "OBS-DP", True), ("left", "ANAT-DP"),
                                          ("pneumothorax", "OBS-DA")}  # fmt: skip
    assert entity_set(REF, "complete") >= {("effusion", "OBS-DP", "located_at", "left")}
    assert pair_f1(HYP, REF, "simple") == 1.0  # same entities
    assert pair_f1(HYP, REF, "partial") == pytest.approx(2 / 3)  # 2 of 3 on each side
    assert pair_f1(HYP, REF, "complete") == pytest.approx(2 / 3)
    assert pair_f1(EMPTY, REF) == 0.0 and pair_f1(REF, EMPTY) == 0.0  # empty side: 0
    scores = corpus_f1([HYP, EMPTY], [REF, REF])  # mean over pairs
    assert scores == pytest.approx({"simple": 0.5, "partial": 1 / 3, "complete": 1 / 3})
    with pytest.raises(ValueError, match="unknown RadGraph level"):
        entity_set(REF, "RG_ER")


def test_adapter_uses_the_package_signature(monkeypatch):
    calls = {}

    class F1RadGraph:  # the package's signature; annotations stand in for the model's
        def __init__(self, reward_level, model_type=None, **kwargs):
            calls["init"] = (reward_level, model_type)

        def __call__(self, refs, hyps):
            calls["call"] = (refs, hyps)
            scores = corpus_f1([HYP, EMPTY], [REF, REF])
            rewards = ([1.0, 0.0], [2 / 3, 0.0], [2 / 3, 0.0])
            return (scores["simple"], scores["partial"], scores["complete"]), rewards, [HYP], [REF]

    monkeypatch.setitem(sys.modules, "radgraph", types.SimpleNamespace(F1RadGraph=F1RadGraph))
    monkeypatch.setattr("cxrlib.radgraph_f1.metadata.version", lambda name: "0.1.18")
    scorer, note = radgraph_scorer()
    assert note is None and calls["init"] == ("all", "radgraph-xl")
    out = scorer.score(["hyp a", "hyp b"], ["ref a", "ref b"])
    assert calls["call"] == (["ref a", "ref b"], ["hyp a", "hyp b"])  # refs first, by keyword
    assert (
        out["partial"] == pytest.approx(1 / 3) and out["scorer"] == "radgraph 0.1.18 (radgraph-xl)"
    )
    assert out["per_pair_partial"] == pytest.approx([2 / 3, 0.0])


def test_no_package_gives_a_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "radgraph", None)  # import fails
    scorer, note = radgraph_scorer()
    assert scorer is None and "pip install 'cxrlib[scorers]'" in note
