"""A rule-based CheXpert-style report labeler, and the CheXbert backend when its weights are cached.

The paper scores generated reports by labeling them (and the reference reports) with CheXbert and
comparing the labels. CheXbert's weights cannot be downloaded here, so this module has a
transparent rule-based labeler in the spirit of the CheXpert labeler and NegBio:

1. **Mentions.** Each observation has a list of phrases (``MENTIONS``), e.g. Pleural Effusion:
   "effusion", "pleural fluid". Longer phrases win over shorter overlapping ones, so "pericardial
   effusion" (ignored) hides the "effusion" inside it and "nodular opacity" is a Lung Lesion, not
   a Lung Opacity. Where CheXpert's lists leave a choice open we follow the MeSH mapping of
   ``cxrlib.data.labels`` (granulomas are Lung Lesion, a blunted costophrenic angle is an
   uncertain effusion, volume loss is Atelectasis), so training labels and evaluation agree.
2. **Descriptors.** "Heart size", "cardiac silhouette", "mediastinum" are not findings by
   themselves; the closest modifier in their clause decides: "enlarged" -> positive, "normal" ->
   negative, "upper limits of normal"/"borderline" -> uncertain, no modifier -> no mention.
3. **Uncertainty, then negation**, within the mention's clause of its sentence: "possible small
   effusion" -> uncertain (-1); "no effusion", "effusion is not seen", "free of consolidation",
   "effusion has resolved" -> negative (0); otherwise positive (1). Uncertainty is checked first
   because "cannot be excluded" contains a negation. "No change in cardiomegaly" is a
   pseudo-negation and stays positive. Clauses end at "but", "however", "although", ...
4. **Aggregation** over a report: positive beats uncertain beats negative beats blank (``None``).
   "No Finding" is 1 when none of the other observations except Support Devices is positive or
   uncertain, else blank (CheXpert's rule).

IU X-ray replaces names and dates by "XXXX"; those tokens are neutral words here (they neither
mention an observation nor stop a negation's scope).

    >>> label_report("No pleural effusion. Possible left basilar atelectasis.")["Atelectasis"]
    -1
    >>> labeler = get_labeler("auto")   # CheXbert if cached, else the rule-based labeler
    >>> labeler.name
    'rule-based-chexpert-v1'

What the rules cannot do (and CheXbert can): follow long-range syntax ("no pneumothorax, effusion
or consolidation is seen on the left but there is ..."), resolve coreference, understand unusual
wording or misspellings. Against IU X-ray's MeSH-derived labels (findings + impression of 3,925
reports) it reaches micro-F1 0.91 / macro-F1 0.83 for positive mentions; notebook 06 shows the
per-label table. The MeSH annotators ignore hedges ("atelectasis versus scarring" is indexed as
atelectasis), which costs most of the recall.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cxrlib.constants import CHEXPERT_LABELS, NEGATIVE, POSITIVE, UNCERTAIN

RULE_BASED_NAME = "rule-based-chexpert-v1"
CHEXBERT_NAME = "chexbert (f1chexbert)"
NO_FINDING = "No Finding"
SUPPORT_DEVICES = "Support Devices"
CARDIOMEGALY = "Cardiomegaly"
IGNORED = "__ignored__"  # phrases that hide a shorter mention but label nothing

# Mention phrases per observation (regular expressions over lowercased text, word-bounded).
MENTIONS: dict[str, list[str]] = {
    "Enlarged Cardiomediastinum": [
        r"(widened|widening of the|wide|enlarged|enlargement of the) (superior )?mediastinum",
        r"(superior )?mediastinal (widening|enlargement)",
        r"enlarged cardiomediastin\w*",
        r"cardiomediastinal (enlargement|widening)",
    ],
    "Cardiomegaly": [
        r"cardiomegaly",
        r"cardiac (enlargement|hypertrophy)",
        r"enlarged (heart|cardiac (silhouette|size|shadow|contours?))",
        r"(heart|cardiac silhouette|cardiac shadow) enlargement",
        r"enlargement of the (heart|cardiac (silhouette|shadow))",
    ],
    "Lung Opacity": [
        r"opacit(y|ies)",
        r"opacification",
        r"opacified",
        r"infiltrat(e|es|ion|ions|ive)",
        r"air ?space (disease|process|filling)",
        r"densit(y|ies)",
        r"haziness",
        r"hazy",
        r"fibros[ie]s",
        r"fibrotic",
        r"(interstitial|reticular|reticulonodular) (lung )?(markings?|pattern|prominence|disease|"
        r"thickening|changes?|opacit(y|ies)|process|lung disease)",
        r"(increased|prominent|coarse|coarsened|chronic) (\w+ )?(interstitial|lung|pulmonary|"
        r"bronchovascular|bronchial) markings",
        r"peribronchial (thickening|cuffing)",
        r"bronchial wall thickening",
    ],
    "Lung Lesion": [
        r"nodul(e|es|arity)",
        r"nodular (opacit(y|ies)|densit(y|ies)|lesions?|pattern)",
        r"mass(es)?",
        r"(lung|pulmonary|cavitary|cavitating|parenchymal) lesions?",
        r"lesions?",
        r"tumou?rs?",
        r"neoplasms?",
        r"carcinoma",
        r"malignanc(y|ies)",
        r"metasta(sis|ses|tic)",
        r"cavitary",
        r"granulomas?",
    ],
    "Edema": [
        r"o?edema",
        r"(pulmonary|vascular|interstitial) congestion",
        r"congestive (heart )?failure",
        r"heart failure",
        r"chf",
        r"fluid overload",
        r"vascular (prominence|engorgement)",
        r"(kerley )?b lines",
        r"kerley b",
    ],
    "Consolidation": [r"consolidat(ion|ions|ed|ive)"],
    "Pneumonia": [
        r"pneumonias?",
        r"bronchopneumonia",
        r"pneumonitis",
        r"infections?",
        r"infectious( process)?",
    ],
    "Atelectasis": [r"atelecta\w*", r"(lobar |lung )?collapse(d)?", r"volume loss"],
    "Pneumothorax": [r"(hydro)?pneumothora(x|ces)", r"pneumothoraxes"],
    "Pleural Effusion": [
        r"(pleural )?effusions?",
        r"pleural fluid",
        r"hydrothorax",
        r"fluid (in|within) the (major |minor )?fissure",
    ],
    "Pleural Other": [
        r"pleural (\w+ )?(thickening|plaques?|scar(ring)?|calcifications?|reaction|fibrosis)",
        r"(bi)?apical (pleural )?(capping|thickening)",
        r"pleural[ -]parenchymal scar(ring)?",
        r"pleural based (density|opacity|thickening)",
        r"fibrothorax",
        r"(apical )?pleural caps?",
    ],
    "Fracture": [r"fractur\w*"],
    "Support Devices": [
        r"pacemakers?",
        r"pacers?",
        r"a?icds?",
        r"defibrillators?",
        r"(picc|central|central venous|venous|arterial|swan ganz|port|dialysis|catheter|subclavian"
        r"|jugular|ij|femoral|midline) lines?",
        r"lines and tubes|tubes and lines|support lines",
        r"catheters?",
        r"picc",
        r"port ?a ?caths?",
        r"(power ?|medi)ports?",
        r"(endotracheal|et|tracheostomy|trach|chest|nasogastric|ng|og|orogastric|feeding|enteric"
        r"|dobhoff|gastric|thoracostomy|suction) tubes?",
        r"tubes?",
        r"(shunt )?tubing",
        r"(vp |ventriculoperitoneal )?shunts?",
        r"stents?",
        r"(prosthetic|replacement|mechanical|bioprosthetic|aortic|mitral) valves?",
        r"valve replacement",
        r"(pacemaker|pacer|cardiac|transvenous) leads?",
        r"leads?",
        r"drains?",
        r"(sternotomy|sternal|cerclage) wires?",
        r"(surgical )?clips?",
        r"(orthopedic |surgical |spinal |fixation )?hardware",
        r"(medical )?devices?",
        r"prosthe(sis|ses|tic)",
        r"arthroplast(y|ies)",
        r"(bone |suture )?anchors?",
        r"loop recorder",
    ],
    # Phrases that would otherwise be read as a shorter mention, but label nothing.
    IGNORED: [
        r"pericardial effusions?",
        r"(joint|knee|shoulder) effusions?",
        r"soft tissue (density|densities|opacity|mass)",
        r"(bone|bony|osseous|breast|nipple|calcified|metallic|calcific) (densit(y|ies)|"
        r"opacit(y|ies))",
        r"granulomatous (disease|infection|process|changes?|exposure)",
        r"calcified (lymph nodes?|hilar nodes?|mediastinal nodes?)",
        r"mass effect",
        r"hilar (mass|masses)",
        r"(bone|bony|osseous|skeletal|lytic|blastic|sclerotic) lesions?",
        r"(skin|breast|chest wall) lesions?",
        r"(right |left )?(hemi)?diaphragm(atic)? (is |are )?(elevated|elevation)",
        r"(compression|vertebral (body )?|wedge) (deformity|collapse)",
        r"collapsed? (vertebra|vertebrae|vertebral body)",
        r"(large |small |moderate )?hiatal hernia",
        r"(large |low |high |normal )?lung volumes?",
        r"(increased|large|prominent) (ap|anteroposterior|a p) diameter",
    ],
}

# Phrases that at most suggest an observation: positive mentions become uncertain (as the MeSH
# mapping of ``cxrlib.data.labels`` treats a blunted costophrenic angle).
HEDGED_MENTIONS: dict[str, list[str]] = {
    "Pleural Effusion": [
        r"blunt(ed|ing) (of )?(the )?(\w+ )?(\w+ )?(costophrenic|cp) (angles?|sulc(us|i))",
        r"(costophrenic|cp) (angles?|sulc(us|i)) (are |is )?(\w+ )?blunt(ed|ing)",
    ],
}

# Descriptor phrases: a finding only together with a modifier in their clause.
DESCRIPTORS: dict[str, list[str]] = {
    "Cardiomegaly": [
        r"heart( size)?",
        r"size of the heart",
        r"cardiac (silhouette|size|shadow|contours?|outline|borders?|diameter)",
    ],
    "Enlarged Cardiomediastinum": [
        r"cardiomediastinal (silhouette|contours?|shadow|outline|size|width|structures?)",
        r"cardio ?mediastinum",
        r"(superior )?mediastinum",
        r"mediastinal (silhouette|contours?|width|shadow|structures|outline|borders?)",
    ],
}
_MODIFIER_UNCERTAIN = (
    r"upper limits? of normal|upper range of normal|top (of )?normal|top normal|upper normal"
    r"|high normal|borderline( enlarged| enlargement| cardiomegaly)?|mildly prominent"
)
_MODIFIER_NORMAL = (
    r"not (\w+ )?(enlarged|widened|increased|large|prominent)|no (\w+ )?(enlargement|widening)"
    r"|within (the )?(normal limits|limits of normal)|normal|unremarkable"
)
_MODIFIER_ABNORMAL = (
    r"enlarged|enlargement|enlarging|large|increased|widened|widening|wide|prominent|prominence"
)
_MODIFIER_RE = re.compile(
    rf"\b(?:(?P<u>{_MODIFIER_UNCERTAIN})|(?P<n>{_MODIFIER_NORMAL})|(?P<a>{_MODIFIER_ABNORMAL}))\b"
)

# Phrases containing a negation word that do not negate ("no change in the cardiomegaly").
PSEUDO_NEGATIONS = (
    r"no (significant |appreciable |substantial |definite )?(interval )?(change|increase|decrease"
    r"|worsening|improvement)|not (significantly |substantially )?(changed|increased|decreased)"
    r"|without (significant |interval )?change|no longer (as )?(prominent|large)"
    r"|without (significant |interval |appreciable )*change|not only|gram negative|not (\w+ )?(previously|before)"
    r"|not (significantly|substantially|markedly|appreciably|much) (changed|increased|decreased"
    r"|different|xxxx|worse|improved)"
    r"|not (present|seen|visualized|evident) (on|in) (the )?(prior|previous)"
)
# Uncertainty cues before a mention ("possible effusion") or after it ("effusion cannot be excluded").
UNCERTAIN_BEFORE = (
    r"may|might|could|possible|possibly|probable|probably|likely|questionable|question of"
    r"|suspicious|suspicion|concern|concerning|suggest\w*|maybe|question\w*|cannot (be )?(exclude\w*|rule\w* out)"
    r"|can not (be )?(exclude\w*|rule\w* out)|not (be )?(entirely |completely )?(excluded"
    r"|ruled out)|difficult to (exclude|rule out)|versus|vs|differential|consider\w*|borderline"
    r"|equivocal|presumed|presumably|suspected|indeterminate|uncertain|either|represent\w*"
)
UNCERTAIN_AFTER = (
    r"(is|are|be) (possible|suspected|questioned|likely|probable)|not (be )?(entirely |completely )?"
    r"(excluded|ruled out)|cannot (be )?(excluded|ruled out)|can not (be )?(excluded|ruled out)"
    r"|difficult to (exclude|rule out)|versus|vs|or [\w ]{0,30}\?|\?|not (entirely |completely )?"
    r"(clear|certain)"
)
# Negation cues before a mention ("no effusion") or after it ("effusion is not seen").
NEGATED_BEFORE = (
    r"no|not|without|negative for|clear of|free of|resolved|resolution of|resolving of|removal of"
    r"|removed|absence of|absent|neither|nor|never|rather than|cleared|clearing of"
)
NEGATED_AFTER = (
    r"not|no longer|absent|resolved|resolution|cleared|removed|excluded|ruled out|negative"
    r"|gone|have been removed"
    r"|(is|are|appears?|remains?|seems?) (\w+ )?(normal|within (the )?(normal limits|limits of normal))"
)
# Words that end a negation's or uncertainty's scope inside a sentence.
_SCOPE_BREAK = re.compile(
    r"\b(but|however|although|though|except|whereas|while|yet|aside from|apart from"
    r"|otherwise|which|that is|and there (is|are)|there (is|are|has been))\b"
    r"|, (?=(there|with|also|again)\b)"
    r"|\bwith (?=(a |an )?(mild|moderate|severe|small|large|bilateral|new|persistent|stable"
    r"|increased|minimal|trace)\b)"
    r"|[:;]"
)
POST_WINDOW_WORDS = 8  # a trailing cue ("... is not seen") must follow the mention closely
DESCRIPTOR_WINDOW_WORDS = 8  # "heart size is at the upper limits of normal"

_XXXX_RE = re.compile(r"\bx{2,}\b", re.IGNORECASE)
# Sentence ends: periods not inside numbers ("2.5 cm"), newlines, "?" kept (an uncertainty cue).
_SENTENCE_RE = re.compile(r"(?<!\d)\.(?!\d)|\n|!")


def _compile_table(table: dict[str, list[str]]) -> dict[str, list[re.Pattern]]:
    return {obs: [re.compile(rf"\b(?:{p})\b") for p in pats] for obs, pats in table.items()}


# Span kinds, in the order they win ties of equal length.
_TABLES = (
    ("mention", _compile_table(MENTIONS)),
    ("hedged", _compile_table(HEDGED_MENTIONS)),
    ("descriptor", _compile_table(DESCRIPTORS)),
)
_KIND_RANK = {kind: i for i, (kind, _) in enumerate(_TABLES)}
_PSEUDO_RE = re.compile(rf"\b(?:{PSEUDO_NEGATIONS})\b")
_UNC_BEFORE_RE = re.compile(rf"(?:\b(?:{UNCERTAIN_BEFORE})\b|\?)")
_UNC_AFTER_RE = re.compile(rf"(?:\b(?:{UNCERTAIN_AFTER})(?:\b|(?<=\?)))")
_NEG_BEFORE_RE = re.compile(rf"\b(?:{NEGATED_BEFORE})\b")
_NEG_AFTER_RE = re.compile(rf"\b(?:{NEGATED_AFTER})\b")


@dataclass(frozen=True)
class Mention:
    """One phrase found in a report and the status the rules gave it."""

    observation: str  # one of CHEXPERT_LABELS (never "No Finding")
    phrase: str  # the matched text, lowercased
    status: int  # POSITIVE, NEGATIVE or UNCERTAIN
    sentence: str  # the normalised sentence it was found in
    start: int  # offset of the phrase in ``sentence``


def normalise(text: str) -> str:
    """Lowercase, neutralise IU's "XXXX" tokens, drop hyphens and squeeze spaces."""
    if not isinstance(text, str):
        raise TypeError(f"a report must be a string, got {type(text).__name__}")
    text = _XXXX_RE.sub(" xxxx ", text).lower()
    text = re.sub(r"(?<=[a-z])-(?=[a-z])", " ", text)  # air-space -> air space
    text = re.sub(r"\bcardio mediastin", "cardiomediastin", text)
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    return text


def split_sentences(text: str) -> list[str]:
    """Split a normalised report into sentences (periods, newlines), dropping empty ones."""
    return [s.strip() for s in _SENTENCE_RE.split(text) if s.strip()]


def _find_spans(sentence: str) -> list[tuple[int, int, str, str]]:
    """All mention, hedged, descriptor and ignored spans, longest first, without overlaps.

    Returns (start, end, observation, kind) sorted by start; ``observation`` may be ``IGNORED``
    (kept so that descriptors do not borrow modifiers from inside them).
    """
    candidates = []
    for kind, table in _TABLES:
        for obs, regexes in table.items():
            for rx in regexes:
                for m in rx.finditer(sentence):
                    if m.end() > m.start():
                        candidates.append((m.start(), m.end(), obs, kind))
    candidates.sort(key=lambda c: (-(c[1] - c[0]), _KIND_RANK[c[3]], c[0]))
    taken = [False] * len(sentence)
    spans = []
    for start, end, obs, kind in candidates:
        if any(taken[start:end]):
            continue
        taken[start:end] = [True] * (end - start)
        spans.append((start, end, obs, kind))
    return sorted(spans)


def _clause_bounds(sentence: str, start: int, end: int) -> tuple[int, int]:
    """The clause (between scope breaks) that contains ``sentence[start:end]``."""
    left, right = 0, len(sentence)
    for m in _SCOPE_BREAK.finditer(sentence):
        if m.end() <= start:
            left = max(left, m.end())
        elif m.start() >= end:
            right = min(right, m.start())
            break
    return left, right


def _blank_pseudo(text: str) -> str:
    """Replace pseudo-negations by spaces so their "no"/"not" is not read as a negation."""
    return _PSEUDO_RE.sub(lambda m: " " * len(m.group()), text)


def _first_words(text: str, n: int) -> str:
    words = text.split(" ")
    return " ".join(words[: n + 1])


def _descriptor_status(
    sentence: str, start: int, end: int, left: int, right: int, spans: list
) -> int | None:
    """Status from the modifier closest to a descriptor in its clause (None: no modifier).

    Modifiers inside another phrase ("increased interstitial markings", "large hiatal hernia")
    belong to that phrase, a modifier more than ``DESCRIPTOR_WINDOW_WORDS`` away is ignored, and
    a modifier before the descriptor must be in its comma-delimited part ("heart enlarged, stable
    mediastinum" says nothing about the mediastinum; "the heart, mediastinum and hila are
    normal" does).
    """
    best, best_dist = None, None
    for m in _MODIFIER_RE.finditer(sentence, left, right):
        if any(s <= m.start() < e for s, e, _, _ in spans):
            continue
        if m.start() < start and "," in sentence[m.end() : start]:
            continue
        gap = sentence[end : m.start()] if m.start() >= end else sentence[m.end() : start]
        dist = len(re.findall(r"\w+", gap))
        if dist <= DESCRIPTOR_WINDOW_WORDS and (best_dist is None or dist < best_dist):
            best, best_dist = m, dist
    if best is None:
        return None
    if best.group("u"):
        return UNCERTAIN
    if best.group("n"):
        return NEGATIVE
    return POSITIVE


def _mention_status(sentence: str, start: int, end: int, left: int, right: int) -> int:
    """Uncertainty first, then negation, inside the clause ``sentence[left:right]``."""
    before = _blank_pseudo(sentence[left:start])
    after = _first_words(_blank_pseudo(sentence[end:right]), POST_WINDOW_WORDS)
    if _UNC_BEFORE_RE.search(before) or _UNC_AFTER_RE.search(after):
        return UNCERTAIN
    if _NEG_BEFORE_RE.search(before) or _NEG_AFTER_RE.search(after):
        return NEGATIVE
    return POSITIVE


def find_mentions(text: str) -> list[Mention]:
    """Every observation mention in ``text`` with the status the rules give it.

    Useful to see *why* a report got its labels (notebook 06 shows a few).

    Args:
        text: a report (findings and/or impression), any case; "XXXX" tokens allowed.

    Returns:
        Mentions in reading order.
    """
    mentions = []
    for sentence in split_sentences(normalise(text)):
        spans = _find_spans(sentence)
        for start, end, obs, kind in spans:
            if obs == IGNORED:
                continue
            left, right = _clause_bounds(sentence, start, end)
            if kind == "descriptor":
                status = _descriptor_status(sentence, start, end, left, right, spans)
                if status is None:
                    continue  # "heart size is stable": says nothing about enlargement
                if status == POSITIVE:  # "heart may be enlarged", "no enlarged heart"
                    status = _mention_status(sentence, start, end, left, right)
            else:
                status = _mention_status(sentence, start, end, left, right)
                if kind == "hedged" and status == POSITIVE:
                    status = UNCERTAIN
            mentions.append(Mention(obs, sentence[start:end], status, sentence, start))
            if kind == "descriptor" and sentence.startswith("cardiomediastin", start):
                # IU's annotators (MeSH "Cardiac Shadow/enlarged") read an enlarged
                # cardiomediastinal silhouette as cardiomegaly too: label both.
                mentions.append(Mention(CARDIOMEGALY, sentence[start:end], status, sentence, start))
    return mentions


def aggregate(mentions: Iterable[Mention]) -> dict[str, int | None]:
    """CheXpert aggregation: positive > uncertain > negative > blank; then "No Finding".

    Args:
        mentions: the mentions of ONE report.

    Returns:
        ``{label: 1 | 0 | -1 | None}`` for the 14 ``CHEXPERT_LABELS``.
    """
    rank = {POSITIVE: 3, UNCERTAIN: 2, NEGATIVE: 1}
    labels: dict[str, int | None] = {name: None for name in CHEXPERT_LABELS}
    for m in mentions:
        current = labels[m.observation]
        if current is None or rank[m.status] > rank[current]:
            labels[m.observation] = m.status
    found = any(
        labels[name] in (POSITIVE, UNCERTAIN)
        for name in CHEXPERT_LABELS
        if name not in (NO_FINDING, SUPPORT_DEVICES)
    )
    labels[NO_FINDING] = None if found else POSITIVE
    return labels


def label_report(text: str) -> dict[str, int | None]:
    """Label one report with the rule-based labeler.

    Args:
        text: a report (findings and/or impression).

    Returns:
        ``{label: 1 | 0 | -1 | None}`` for the 14 ``CHEXPERT_LABELS`` (1 positive, 0 negative,
        -1 uncertain, None not mentioned). An empty report gets "No Finding" = 1 (like CheXpert).
    """
    return aggregate(find_mentions(text))


def labels_frame(rows: Sequence[dict[str, int | None]]) -> pd.DataFrame:
    """Label dicts -> DataFrame with the 14 columns, nullable integers (``<NA>`` = blank)."""
    frame = pd.DataFrame(list(rows), columns=CHEXPERT_LABELS)
    return frame.astype("Int64")


def label_reports(texts: Iterable[str]) -> pd.DataFrame:
    """Label many reports with the rule-based labeler.

    Args:
        texts: reports.

    Returns:
        DataFrame, one row per report, the 14 ``CHEXPERT_LABELS`` as nullable ``Int64`` columns.
    """
    return labels_frame([label_report(t) for t in texts])


# --- backends -----------------------------------------------------------------------------------


class RuleBasedLabeler:
    """The rule-based labeler as an object (same interface as ``CheXbertLabeler``)."""

    name = RULE_BASED_NAME

    @property
    def version(self) -> str:
        """The rules' version is their name's ``v1``; the code is cxrlib's (metrics files)."""
        from cxrlib import __version__

        return f"cxrlib.labeler {RULE_BASED_NAME}, cxrlib {__version__}"

    def __call__(self, texts: Iterable[str]) -> pd.DataFrame:
        return label_reports(texts)

    def label(self, text: str) -> dict[str, int | None]:
        return label_report(text)


# CheXbert's 14 heads come in this order (f1chexbert's ``target_names``).
_CHEXBERT_ORDER = CHEXPERT_LABELS[1:] + [NO_FINDING]


def chexbert_checkpoint() -> Path | None:
    """Where f1chexbert keeps ``chexbert.pth`` if it is there, else None (never downloads)."""
    try:
        from appdirs import user_cache_dir
    except ImportError:
        return None
    path = Path(user_cache_dir("chexbert")) / "chexbert.pth"
    return path if path.exists() else None


def chexbert_available() -> bool:
    """True if ``f1chexbert`` is installed and its weights and BERT's files are cached."""
    try:
        import f1chexbert  # noqa: F401
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    if chexbert_checkpoint() is None:
        return False
    needed = ("vocab.txt", "config.json")
    return all(isinstance(try_to_load_from_cache("bert-base-uncased", f), str) for f in needed)


class CheXbertLabeler:
    """CheXbert through ``f1chexbert`` (classification mode: 1 / 0 / -1 / blank).

    Only constructed when ``chexbert_available()``; Hugging Face is forced offline so a missing
    file raises instead of downloading.
    """

    name = CHEXBERT_NAME

    def __init__(self, device: str = "cpu"):
        if not chexbert_available():
            raise FileNotFoundError(
                "CheXbert is not available offline: install `f1chexbert`, and put chexbert.pth "
                "(StanfordAIMI/RRG_scorers) in its cache and bert-base-uncased in the Hugging Face "
                "cache on a machine with internet; or use get_labeler('rule')."
            )
        os.environ["HF_HUB_OFFLINE"] = "1"
        from f1chexbert import F1CheXbert

        self._model = F1CheXbert(device=device)

    @property
    def version(self) -> str:
        """The installed ``f1chexbert`` (its weights: StanfordAIMI/RRG_scorers chexbert.pth)."""
        from importlib import metadata

        return f"f1chexbert {metadata.version('f1chexbert')} (chexbert.pth, bert-base-uncased)"

    def label(self, text: str) -> dict[str, int | None]:
        raw = self._model.get_label(text, mode="classification")
        return {name: (None if v == "" else int(v)) for name, v in zip(_CHEXBERT_ORDER, raw)}

    def __call__(self, texts: Iterable[str]) -> pd.DataFrame:
        return labels_frame([self.label(t) for t in texts])


def get_labeler(name: str = "auto", device: str = "cpu"):
    """Choose a labeler by name.

    Args:
        name: ``"auto"`` (CheXbert when it is cached, else rule-based), ``"rule"`` or
            ``"chexbert"`` (raises if not cached).
        device: device for CheXbert.

    Returns:
        An object with ``.name`` and ``.version`` (recorded in every metrics file that holds a
        clinical F1, ``cxrlib.evaluate.scorer_notes``), ``.label(text) -> dict`` and
        ``__call__(texts) -> DataFrame``.
    """
    if name == "rule":
        return RuleBasedLabeler()
    if name == "chexbert":
        return CheXbertLabeler(device)
    if name == "auto":
        return CheXbertLabeler(device) if chexbert_available() else RuleBasedLabeler()
    raise ValueError(f"unknown labeler '{name}': choose 'auto', 'rule' or 'chexbert'")
