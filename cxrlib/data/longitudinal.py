"""The longitudinal set: patients with a prior and a current study whose findings change.

IU has one study per patient, so the follow-ups are composed: for each synthetic patient we pick
1-3 observations and a change for each (``new``, ``resolved``, ``worse``, ``better``,
``unchanged``), then write both reports from REAL IU sentences that describe exactly those findings.
Introduced in notebook 01; used by the multi-study CoT and difference-VQA tasks.

    >>> cases = build_longitudinal(reports, num_patients=600, seed=0)
    >>> cases[0].changes, cases[0].current.findings_text

The sentence bank (``build_sentence_bank``) is built from the IU Findings sections:
  * positive sentences of observation X: from studies whose MeSH terms make X positive, a sentence
    that names X (small keyword lists below), names no other observation, is neither negated nor
    hedged ("cannot exclude", "may represent") and does not compare with an earlier study. Its
    Finding is the study's MeSH finding for X, completed with the side, zone and severity the
    sentence states (a sentence that contradicts its MeSH finding is left out).
  * normal sentences: from studies indexed only as "normal", one per topic (heart, lungs, pleura,
    bones) that speaks about that topic only; a report gets a topic's normal sentence when none of
    its findings belongs to that topic, and never one that rules out a finding of the patient.
    Observations a normal sentence names ("No pneumothorax.") become explicit negatives (label 0).
Pass only training-split reports when the cases are used for training, so that no test sentence
leaks into a training target.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from cxrlib.data.iuxray import IUReport, split_sentences
from cxrlib.data.labels import (
    OBSERVATIONS,
    SEVERITIES,
    Finding,
    labels_from_findings,
    mesh_to_findings,
)

CHANGES = ("new", "resolved", "worse", "better", "unchanged")

# Light keyword matching (kept deliberately small; the full labeler is cxrlib.labeler).
KEYWORDS = {
    "Enlarged Cardiomediastinum": [r"mediastin\w* (?:is |are )?(?:widen|enlarg|promin)",
                                   r"widen\w* mediastin"],
    "Cardiomegaly": [r"cardiomegaly", r"(?:heart|cardiac)\b[^.]*\b(?:enlarged|large)\b",
                     r"enlarged (?:heart|cardiac)"],
    "Lung Opacity": [r"opacit", r"densit", r"infiltrat", r"air ?space disease",
                     r"interstitial marking"],
    "Lung Lesion": [r"nodul", r"\bmass", r"granulom", r"lesion"],
    "Edema": [r"edema", r"congesti"],
    "Consolidation": [r"consolidat"],
    "Pneumonia": [r"pneumonia", r"infecti"],
    "Atelectasis": [r"atelecta"],
    "Pneumothorax": [r"pneumothora"],
    "Pleural Effusion": [r"(?<!pericardial )effusion", r"costophrenic\b[^.]*\bblunt",
                         r"blunt\w*[^.]*costophrenic"],
    "Pleural Other": [r"pleural (?:thicken|scar|plaque)", r"thickening of the pleura"],
    "Fracture": [r"fractur"],
    "Support Devices": [r"catheter", r"\btube", r"pacemaker", r"pacer", r"\bline\b", r"stent",
                        r"sternotomy", r"\bclips?\b", r"\bwires?\b", r"device", r"\bport\b"],
}  # fmt: skip
_KEYWORDS = {obs: re.compile("|".join(words), re.I) for obs, words in KEYWORDS.items()}
_NEGATED = re.compile(r"\b(?:no|not|without|negative|free of|resolved|clear|removed)\b", re.I)
_COMPARATIVE = re.compile(
    r"\b(?:stable|unchanged|again|prior|previous|interval|increas\w*|decreas\w*|improv\w*|"
    r"worsen\w*|new|redemonstrat\w*|persist\w*|compar\w*|since|change\w*|now|remain\w*|still|"
    r"continu\w*|residual|recurr\w*|longer)\b",
    re.I,
)
_HEDGED = re.compile(
    r"\b(?:cannot|can not|may|might|possibl\w*|probabl\w*|questionabl\w*|suspect\w*|suggest\w*|"
    r"exclude\w*|correlat\w*|likely|versus|vs|concern\w*|or)\b",
    re.I,
)
# What a sentence states about where and how bad: attribute -> value -> pattern.
_STATED = {
    "side": {"bilateral": r"bilateral\w*|both|bibasilar|biapical", "left": r"left",
             "right": r"right"},
    "zone": {"lower": r"bases?|basilar|basal|lower|bibasilar|retrocardiac",
             "middle": r"middle|mid|midlung|lingula\w*|hilar|perihilar",
             "upper": r"ape(?:x|ces)|apical|upper|biapical"},
    "severity": {"mild": r"mild\w*|small|minimal|trace|tiny", "moderate": r"moderate\w*",
                 "severe": r"severe\w*|large|marked\w*|massive|extensive"},
}  # fmt: skip
_STATED_RE = {
    attr: {value: re.compile(rf"\b(?:{p})\b", re.I) for value, p in table.items()}
    for attr, table in _STATED.items()
}

TOPICS = {  # report order: IU reports usually go heart -> lungs -> pleura -> bones
    "heart": (r"\bheart|cardi|mediastin", ["Enlarged Cardiomediastinum", "Cardiomegaly"]),
    "lungs": (r"\blungs?\b|pulmonary|airspace|parenchym",
              ["Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
               "Atelectasis"]),
    "pleura": (r"effusion|pneumothora|pleura",
               ["Pneumothorax", "Pleural Effusion", "Pleural Other"]),
    "bones": (r"\bbon|osseous|skelet|fractur|spine|\bribs?\b", ["Fracture"]),
}  # fmt: skip
_TOPIC_RE = {topic: re.compile(pattern, re.I) for topic, (pattern, _) in TOPICS.items()}
TOPIC_OF = {obs: topic for topic, (_, members) in TOPICS.items() for obs in members}


@dataclass(frozen=True)
class BankSentence:
    text: str  # a real IU sentence
    study_id: str  # the IU study it comes from
    findings: tuple[Finding, ...] = ()  # what it describes (empty for a normal sentence)
    negatives: tuple[str, ...] = ()  # observations it rules out (normal sentences)


@dataclass
class SentenceBank:
    positive: dict[str, list[BankSentence]] = field(default_factory=dict)  # observation -> ...
    normal: dict[str, list[BankSentence]] = field(default_factory=dict)  # topic -> ...

    def sizes(self) -> dict[str, int]:
        return {**{k: len(v) for k, v in self.positive.items()},
                **{f"normal:{k}": len(v) for k, v in self.normal.items()}}  # fmt: skip


@dataclass
class LongitudinalStudy:
    study_id: str  # e.g. "L0001-prior"
    findings: list[Finding]
    findings_text: str
    negatives: list[str] = field(default_factory=list)  # observations the text rules out
    sources: list[str] = field(default_factory=list)  # IU study id of each sentence, in order

    @property
    def labels(self) -> dict[str, int | None]:
        return labels_from_findings(self.findings, self.negatives)


@dataclass
class LongitudinalCase:
    patient_id: str  # "L0001", ... (never an IU study id)
    prior: LongitudinalStudy
    current: LongitudinalStudy
    changes: dict[str, str]  # observation -> "new" | "resolved" | "worse" | "better" | "unchanged"


def mentioned_observations(sentence: str) -> set[str]:
    """Observations whose keywords occur in a sentence."""
    return {obs for obs, pattern in _KEYWORDS.items() if pattern.search(sentence)}


def _sentence_finding(sentence: str, finding: Finding) -> Finding | None:
    """The MeSH finding completed by what the sentence states, or None if the two disagree."""
    updates = {}
    for attr, patterns in _STATED_RE.items():
        if attr == "zone" and TOPIC_OF.get(finding.observation) not in ("lungs", "pleura"):
            continue  # "mid clavicle" is not a lung zone
        stated = {value for value, p in patterns.items() if p.search(sentence)}
        if attr == "side" and ("bilateral" in stated or {"left", "right"} <= stated):
            stated = {"bilateral"}
        mesh_value = getattr(finding, attr)
        if mesh_value and stated and mesh_value not in stated:
            return None
        if not mesh_value and len(stated) == 1:
            updates[attr] = stated.pop()
    return replace(finding, **updates)


def build_sentence_bank(reports: Sequence[IUReport]) -> SentenceBank:
    """Index real IU Findings sentences by the observation (or normal topic) they describe."""
    bank = SentenceBank(defaultdict(list), defaultdict(list))
    for report in reports:
        findings, _ = mesh_to_findings(report.mesh)
        only_normal = all(t.heading.lower() == "normal" for t in report.major_mesh)
        for sentence in split_sentences(report.findings):
            if _COMPARATIVE.search(sentence) or sentence[-1] not in ".!?":
                continue  # comparisons, and a last sentence left without its full stop
            named = mentioned_observations(sentence)
            if only_normal and report.major_mesh:
                topics = [t for t, p in _TOPIC_RE.items() if p.search(sentence)]
                # one topic only; a named observation must be ruled out ("No pneumothorax.")
                if len(topics) == 1 and (not named or _NEGATED.search(sentence)):
                    bank.normal[topics[0]].append(
                        BankSentence(sentence, report.study_id, negatives=tuple(sorted(named)))
                    )
            elif len(named) == 1 and not (_NEGATED.search(sentence) or _HEDGED.search(sentence)):
                (obs,) = named
                mine = [f for f in findings if f.observation == obs and f.status == 1]
                fitted = [g for f in mine if (g := _sentence_finding(sentence, f)) is not None]
                if fitted:  # one finding per sentence: a sentence describes one place
                    bank.positive[obs].append(BankSentence(sentence, report.study_id, (fitted[0],)))
    bank.positive, bank.normal = dict(bank.positive), dict(bank.normal)
    return bank


def _by_side_and_severity(pool: list[BankSentence]) -> dict:
    """{side: {severity rank: [sentences]}} for the sides with at least two severities."""
    groups = defaultdict(lambda: defaultdict(list))
    for s in pool:
        f = s.findings[0]
        if f.severity:
            groups[f.side][SEVERITIES.index(f.severity)].append(s)
    return {side: dict(g) for side, g in groups.items() if len(g) > 1}


def _pick_pair(rng: random.Random, pool: list[BankSentence], graded: dict, change: str):
    """(prior, current) sentences of one observation (None = absent) for the given change.

    ``worse``/``better`` take two sentences of different severity on the same side, so that the
    finding stays where it was.
    """
    if change in ("new", "resolved", "unchanged"):
        s = rng.choice(pool)
        return {"new": (None, s), "resolved": (s, None), "unchanged": (s, s)}[change]
    by_rank = graded[rng.choice(sorted(graded, key=str))]
    low, high = sorted(rng.sample(sorted(by_rank), 2))
    pair = rng.choice(by_rank[low]), rng.choice(by_rank[high])
    return pair if change == "worse" else pair[::-1]


def _weighted_sample(rng: random.Random, weights: dict[str, float], k: int) -> list[str]:
    """k distinct keys drawn with probability proportional to their weight."""
    left, chosen = dict(weights), []
    for _ in range(k):
        key = rng.choices(list(left), weights=list(left.values()))[0]
        chosen.append(key)
        del left[key]
    return chosen


def _compose(
    study_id: str, chosen: dict[str, BankSentence], normals: dict[str, BankSentence]
) -> LongitudinalStudy:
    """A report: devices first, then per topic its positive sentences or its normal sentence."""
    parts: list[BankSentence] = [chosen[o] for o in chosen if o == "Support Devices"]
    for topic, (_, members) in TOPICS.items():
        present = [chosen[o] for o in members if o in chosen]
        parts += present or ([normals[topic]] if topic in normals else [])
    findings = [f for s in parts for f in s.findings]
    negatives = sorted({n for s in parts for n in s.negatives} - {f.observation for f in findings})
    return LongitudinalStudy(
        study_id, findings, " ".join(s.text for s in parts), negatives, [s.study_id for s in parts]
    )


def build_longitudinal(
    reports: Sequence[IUReport], num_patients: int, seed: int = 0, max_changes: int = 3
) -> list[LongitudinalCase]:
    """Compose ``num_patients`` prior/current study pairs from real IU sentences.

    Args:
        reports: IU reports to take sentences from (e.g. the training split).
        num_patients: number of cases; patient ids are "L0001", "L0002", ...
        seed: the same seed and reports give the same cases.
        max_changes: at most this many observations change (or stay) per patient.

    Returns:
        LongitudinalCase records; ``changes`` lists every observation present in either study.
    """
    if num_patients < 0 or max_changes < 1:
        raise ValueError(
            f"num_patients={num_patients} must be >= 0 and max_changes={max_changes} >= 1"
        )
    bank = build_sentence_bank(reports)
    positive = {o: bank.positive[o] for o in OBSERVATIONS if bank.positive.get(o)}
    if num_patients and (not positive or len(bank.normal) < len(TOPICS)):
        raise ValueError(
            f"the {len(reports)} reports give too few usable sentences (bank: {bank.sizes()}); "
            "pass more IU reports (load_iu_reports())"
        )
    graded = {o: g for o, pool in positive.items() if (g := _by_side_and_severity(pool))}
    # sqrt of the bank size: rare observations appear, without one sentence repeated 100 times
    weights = {obs: len(pool) ** 0.5 for obs, pool in positive.items()}
    rng = random.Random(seed)
    cases = []
    for k in range(1, num_patients + 1):
        num = rng.randint(1, min(max_changes, len(weights)))
        observations = _weighted_sample(rng, weights, num)
        # one normal sentence per topic for both studies (one radiologist's style), never one
        # that rules out an observation this patient has in either study
        normals = {}
        for topic, pool in sorted(bank.normal.items()):
            fits = [s for s in pool if not set(s.negatives) & set(observations)]
            if fits:
                normals[topic] = rng.choice(fits)
        prior, current, changes = {}, {}, {}
        for obs in observations:
            options = [c for c in CHANGES if c not in ("worse", "better") or obs in graded]
            change = rng.choice(options)
            before, after = _pick_pair(rng, positive[obs], graded.get(obs, {}), change)
            if before is not None:
                prior[obs] = before
            if after is not None:
                current[obs] = after
            changes[obs] = change
        pid = f"L{k:04d}"
        cases.append(LongitudinalCase(
            pid, _compose(f"{pid}-prior", prior, normals),
            _compose(f"{pid}-current", current, normals), changes,
        ))  # fmt: skip
    return cases
