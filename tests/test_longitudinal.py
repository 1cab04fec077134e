"""The longitudinal set: changes agree with the findings and labels; text is real IU sentences."""

from collections import Counter

import pytest

from cxrlib.data.iuxray import load_iu_reports, split_sentences
from cxrlib.data.labels import SEVERITIES, Finding
from cxrlib.data.longitudinal import (
    CHANGES,
    TOPICS,
    build_longitudinal,
    build_sentence_bank,
    mentioned_observations,
)


@pytest.fixture(scope="module")
def reports():
    return load_iu_reports()[0]


@pytest.fixture(scope="module")
def cases(reports):
    return build_longitudinal(reports, num_patients=200, seed=0)


def _by_obs(findings: list[Finding]) -> dict[str, Finding]:
    return {f.observation: f for f in findings}


def _rank(f: Finding) -> int:
    return SEVERITIES.index(f.severity)


def test_changes_agree_with_findings_and_labels(cases):
    for case in cases:
        prior, current = _by_obs(case.prior.findings), _by_obs(case.current.findings)
        assert set(case.changes) == set(prior) | set(current)
        assert 1 <= len(case.changes) <= 3
        for obs, change in case.changes.items():
            before, after = case.prior.labels[obs], case.current.labels[obs]
            if change == "new":
                assert obs not in prior and before in (0, None) and after == 1
            elif change == "resolved":
                assert obs not in current and before == 1 and after in (0, None)
            elif change == "unchanged":
                assert before == after == 1 and prior[obs] == current[obs]
            else:
                assert before == after == 1
                step = _rank(current[obs]) - _rank(prior[obs])
                assert step > 0 if change == "worse" else step < 0
                assert prior[obs].side == current[obs].side  # the finding stays where it was
        for study in (case.prior, case.current):
            abnormal = [f for f in study.findings if f.observation != "Support Devices"]
            assert study.labels["No Finding"] == (None if abnormal else 1)


def test_every_change_type_appears(cases):
    counts = Counter(c for case in cases for c in case.changes.values())
    assert set(counts) == set(CHANGES)
    assert min(counts.values()) >= 10


def test_text_is_made_of_iu_sentences(cases, reports):
    iu_sentences = {s for r in reports for s in split_sentences(r.findings)}
    by_id = {r.study_id: r for r in reports}
    for case in cases:
        for study in (case.prior, case.current):
            sentences = split_sentences(study.findings_text)
            assert sentences and len(sentences) == len(study.sources)
            assert set(sentences) <= iu_sentences
            for sentence, source in zip(sentences, study.sources):
                assert sentence in split_sentences(by_id[source].findings)


def test_text_describes_the_findings(cases):
    for case in cases:
        for study in (case.prior, case.current):
            named = mentioned_observations(study.findings_text)
            present = {f.observation for f in study.findings}
            assert present <= named  # each finding is named by its sentence
            assert not set(study.negatives) & present  # nothing present is ruled out
            missing = {t for t, (_, members) in TOPICS.items() if not present & set(members)}
            assert missing  # some topic is normal, so a normal sentence was used
            assert all(study.labels[n] == 0 for n in study.negatives)


def test_deterministic_and_ids(reports, cases):
    again = build_longitudinal(reports, num_patients=200, seed=0)
    assert [(c.changes, c.current.findings_text) for c in again] == [
        (c.changes, c.current.findings_text) for c in cases
    ]
    other = build_longitudinal(reports, num_patients=200, seed=1)
    assert [c.current.findings_text for c in other] != [c.current.findings_text for c in cases]
    ids = [c.patient_id for c in cases]
    assert ids[:2] == ["L0001", "L0002"] and len(set(ids)) == len(ids)
    assert not set(ids) & {r.study_id for r in reports}
    assert cases[0].prior.study_id == "L0001-prior" and cases[0].current.study_id == "L0001-current"


def test_sentence_bank(reports):
    bank = build_sentence_bank(reports)
    assert {"Cardiomegaly", "Pleural Effusion", "Lung Opacity", "Atelectasis"} <= set(bank.positive)
    assert set(bank.normal) == set(TOPICS) and min(map(len, bank.normal.values())) > 100
    for obs, pool in bank.positive.items():
        for s in pool:
            assert mentioned_observations(s.text) == {obs} and s.findings[0].observation == obs
    assert any(f.findings[0].severity == "severe" for f in bank.positive["Cardiomegaly"])


def test_too_few_reports(reports):
    with pytest.raises(ValueError, match="too few usable sentences"):
        build_longitudinal(reports[:3], num_patients=5)
    assert build_longitudinal(reports[:3], num_patients=0) == []
