"""Every task's conversation builder, with the exact prompt strings of the M4CXR card.

One file on purpose (longer than the others): the card's strings and the builder of each of its
17 formats are read side by side, and a shared string cannot drift between two files.

A conversation is a plain dict::

    {"task": "cot_single", "images": [17], "meta": {...},
     "turns": [{"user": "radiology image: <image> Which of ...", "assistant": "cardiomegaly."},
               {"user": "Based on the previous conversation, ...", "assistant": "The heart ..."}]}

``images`` are indices into ``images.npy`` in the order of the ``<image>`` placeholders; the first
user turn is the image prefix, one space, then the question (the system text is added later by
``cxrlib.data.tokenize``). Build one with::

    rng = np.random.default_rng(0)
    conv = build_conversation("finding_grounding", study, rng)   # None if the study can't

Choices the card leaves open (documented here once):
- ``multi_label`` asks the CoT turn-1 question (all 13 findings, card order) as a task of its own,
  i.e. multi-label classification with the chain-of-thought answer format.
- Grounding tasks use frontal images only (like MS-CXR / VinDr-CXR); only POSITIVE findings with
  a box that survives the center crop are grounded; uncertain findings are never asked about.
  ``abnormality_detection`` leaves out support devices (not an abnormality).
- Phrases for ``phrase_grounding`` / ``grounded_phrase`` are sentences of the study's own Findings
  that mention the observation (``OBSERVATION_KEYWORDS``) without a negation cue before it.
- VQA answers are short lowercase words (``yes``/``no``, ``left lower zone``, ``moderate``,
  ``PA``/``AP``/``lateral``, ``cardiomegaly, pleural effusion``/``none``) so that exact match
  works; ``meta["question_type"]`` names the kind and ``meta["answer_type"]`` is ``closed``
  (yes/no) or ``open``.
- ``difference_vqa`` compares the prior (reference) and current (main) frontal images using the
  longitudinal record's ``changes``.
- Records of the VQA datasets carry their own questions: ``qa`` (``vqa``) and ``diff_qa``
  (``difference_vqa``, main = the record's image, reference = its ``prior``'s), each
  ``{"question", "answer", "answer_type", "question_type"}``, asked verbatim in the card's wrapper
  with the dataset's answer; ``dialog`` (RaDialog-Instruct) is a conversation used as it is, the
  image prefix before its first user turn (``sources/base.py`` documents the fields).

Introduced in notebook 01; ``cxrlib.inference`` reuses the prompt helpers (``report_user_turns``,
``finding_grounding_question``, ...) so training and inference prompts cannot drift apart.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from cxrlib.constants import (
    ALL_TASKS,
    CHEXPERT_LABELS,
    COT_FINDINGS,
    FRONTAL_VIEWS,
    IMAGE_TOKEN,
    LABEL_OF,
    ORGANS,
    POSITIVE,
    UNCERTAIN,
)
from cxrlib.data.boxes import format_box, format_boxes, is_visible, to_relative
from cxrlib.data.iuxray import split_sentences as iu_split_sentences

# ---------------------------------------------------------------------------------------------
# Prompt strings of the card (docs/paper.md summarises the conversation format)
# ---------------------------------------------------------------------------------------------
FINDINGS_LIST = ", ".join(COT_FINDINGS)
COT_QUESTION = "Which of the following findings are present in the {target}? Findings: {findings}"
COT_TURN2 = (
    "Based on the previous conversation, provide a description of the findings in the {target}."
)
DIRECT_QUESTION = "Provide a description of the findings in the {target}."
MULTI_STUDY_NOTE = "The radiology studies are given in chronological order."
NOT_FOUND = "Not found."
SINGLE_DISEASE_Q = "Is {finding} present in the radiology image?"
FINDING_GROUNDING_Q = (
    "Is {finding} present in the radiology image? If so, provide the bounding box coordinates "
    "of the region."
)
NOT_PRESENT = "Not present."
GROUNDED_FINDING_Q = "Provide a finding name for this region. {bbox}"
MULTI_FINDING_Q = (
    "Which of the following findings are present in the radiology image? Provide the bounding "
    "box coordinates if present. Findings: {findings}"
)
ABNORMALITY_Q = "Provide the bounding box coordinates of abnormal regions in the radiology image."
ORGAN_GROUNDING_Q = "Provide the bounding box coordinates of {organ} in the radiology image."
GROUNDED_ORGAN_Q = "Provide an organ name for this region. {bbox}"
PHRASE_GROUNDING_Q = (
    "Provide the bounding box coordinate of the region this phrase describes: {phrase}"
)
GROUNDED_PHRASE_Q = "Provide a radiology report phrase for the region. {bbox}."
VQA_Q = "Answer the question. {question}"
DIFF_VQA_PREFIX = f"reference: {IMAGE_TOKEN}, main: {IMAGE_TOKEN}"
DIFF_VQA_Q = (
    "Using the provided reference and main radiology images, answer the following question. "
    "{question}"
)

# VQA question templates (ours: the card gives only the wrapper). Answers are exact-match friendly.
VQA_QUESTIONS = {
    "presence": "Is there evidence of {finding} in this image?",
    "location": "Where is the {finding} located?",
    "severity": "What is the severity of the {finding}?",
    "view": "Which view is this image?",
    "abnormality_list": "What abnormalities are seen in this image?",
}
DIFF_VQA_QUESTIONS = {
    "difference": "What has changed compared to the reference image?",
    "change": "How has the {finding} changed compared to the reference image?",
    "new_finding": "Is there any new finding compared to the reference image?",
}
CLOSED_QUESTION_TYPES = {"presence", "new_finding"}  # yes/no answers
CHANGE_WORDS = {  # longitudinal `changes` value -> answer word
    "new": "new",
    "resolved": "resolved",
    "worse": "worsened",
    "better": "improved",
    "unchanged": "unchanged",
}
NO_CHANGE = "nothing has changed"
NO_ABNORMALITY = "none"
VIEW_ANSWERS = {"PA": "PA", "AP": "AP", "LATERAL": "lateral"}
NON_ABNORMAL = {"Support Devices"}  # left out of abnormality detection

# Lowercase finding name <-> CheXpert label name.

# Keywords that make a report sentence a phrase for an observation (a tuple = all words needed).
OBSERVATION_KEYWORDS: dict[str, list] = {
    "Enlarged Cardiomediastinum": [
        "mediastinal widening",
        "widened mediastinum",
        ("mediastin", "enlarge"),
        ("mediastin", "widen"),
    ],
    "Cardiomegaly": [
        "cardiomegaly",
        ("heart", "enlarge"),
        ("cardiac", "enlarge"),
        ("heart size", "large"),
    ],
    "Lung Opacity": ["opacit", "densit", "infiltrat", "airspace disease"],
    "Lung Lesion": ["nodul", "mass", "lesion", "granulom"],
    "Edema": ["edema", "vascular congestion", "interstitial"],
    "Consolidation": ["consolidat"],
    "Pneumonia": ["pneumonia", "infecti"],
    "Atelectasis": ["atelecta"],
    "Pneumothorax": ["pneumothora"],
    "Pleural Effusion": ["effusion"],
    "Pleural Other": ["pleural thickening", "thickening", "fibrosis", "scarring"],
    "Fracture": ["fracture"],
    "Support Devices": [
        "catheter",
        "tube",
        "pacemaker",
        "pacer",
        "stent",
        "clip",
        "wire",
        "device",
        "port",
        "hardware",
        "prosthe",
        "line",
    ],
}
_NEGATION_RE = re.compile(
    r"\b(no|not|without|negative|free of|resolved|resolution|clear|normal|absent|removed)\b"
)


class ConversationError(ValueError):
    """A study record or task name the builders cannot use."""


# ---------------------------------------------------------------------------------------------
# Small helpers on study records
# ---------------------------------------------------------------------------------------------
def finding_name(observation: str) -> str:
    """The lowercase name used in prompts, e.g. ``"Pleural Effusion"`` -> ``"pleural effusion"``."""
    return observation.lower()


def positive_findings(labels: dict) -> list[str]:
    """Lowercase positive findings (label == 1) in the card's CoT order; uncertain is absent."""
    return [f for f in COT_FINDINGS if labels.get(LABEL_OF[f]) == POSITIVE]


MAX_RARE_REPEATS = 8  # most draws a rare finding's study gets (rare_finding_repeats)


def rare_finding_repeats(studies: Sequence[dict], power: float) -> list[int]:
    """How many times each study is repeated for its rarest positive finding (in phase 2's
    report-task pools and in the LM's findings -> report corpus):
    ``round((n_common / n_rarest) ** power)``, at most ``MAX_RARE_REPEATS``, where ``n`` counts
    the studies of ``studies`` positive for a CoT finding (``n_common``: the most frequent one).
    1 for a study without one, and for every study when ``power`` is 0 (the card's draw).

    Why (``train.phase2.rare_finding_power``, ``train.lm_pretrain.rare_finding_power``;
    docs/recipe-log.md E13, E14): greedy decoding names a finding only when the model puts it
    above 50%, and a finding seen in 2% of the studies rarely gets there from faint evidence."""
    positives = [positive_findings(s["labels"]) for s in studies]
    counts = Counter(f for p in positives for f in p)
    if power == 0 or not counts:
        return [1] * len(studies)
    common = max(counts.values())
    return [
        min(MAX_RARE_REPEATS, round((common / min(counts[f] for f in p)) ** power)) if p else 1
        for p in positives
    ]


def cot_answer(labels: dict) -> str:
    """Turn-1 answer: ``"cardiomegaly, pleural effusion."`` or ``"Not found."``."""
    positives = positive_findings(labels)
    return ", ".join(positives) + "." if positives else NOT_FOUND


def image_prefix(num_images: int) -> str:
    """``radiology image: <image>`` or ``radiology images: <image> <image> ...``."""
    if num_images < 1:
        raise ConversationError("a report prompt needs at least one image")
    if num_images == 1:
        return f"radiology image: {IMAGE_TOKEN}"
    return "radiology images: " + " ".join([IMAGE_TOKEN] * num_images)


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def report_user_turns(
    mode: str = "single",
    num_images: int = 1,
    prior_report: str | None = None,
    num_prior_images: int = 0,
    cot: bool = True,
) -> list[str]:
    """The user turns of a report-generation conversation (one for direct, two for CoT).

    Args:
        mode: ``single`` (one image), ``multi_image`` (one study, several images) or
            ``multi_study`` (prior images + prior report, then the follow-up images).
        num_images: images of the (current) study.
        prior_report: the prior study's findings (``multi_study`` only).
        num_prior_images: images of the prior study (``multi_study`` only).
        cot: two turns (classification, then report) if True; one direct turn if False.

    Returns:
        The user strings, turn by turn, with ``<image>`` placeholders in order.
    """
    if mode == "single":
        if num_images != 1:
            raise ConversationError(f"mode 'single' takes 1 image, got {num_images}")
        prefix, target = image_prefix(1), "radiology image"
    elif mode == "multi_image":
        prefix, target = image_prefix(num_images), "radiology images"
    elif mode == "multi_study":
        if not prior_report or num_prior_images < 1 or num_images < 1:
            raise ConversationError(
                "mode 'multi_study' needs prior images, a prior report and images"
            )
        prior_imgs = " ".join([IMAGE_TOKEN] * num_prior_images)
        imgs = " ".join([IMAGE_TOKEN] * num_images)
        prefix = f"prior radiology images: {prior_imgs}, prior radiology report: {prior_report}"
        prefix = f"{prefix} follow-up images: {imgs}, {MULTI_STUDY_NOTE}"
        target = "current follow-up radiology images"
    else:
        raise ConversationError(f"unknown report mode '{mode}': single, multi_image, multi_study")
    if not cot:
        return [_join(prefix, DIRECT_QUESTION.format(target=target))]
    return [
        _join(prefix, COT_QUESTION.format(target=target, findings=FINDINGS_LIST)),
        COT_TURN2.format(target=target),
    ]


def _single(prefix_question: str) -> str:
    return _join(f"radiology image: {IMAGE_TOKEN}", prefix_question)


def finding_grounding_question(finding: str) -> str:
    return _single(FINDING_GROUNDING_Q.format(finding=finding))


def _conv(task: str, images: Sequence[int], turns: list[tuple[str, str]], **meta) -> dict:
    return {
        "task": task,
        "images": [int(i) for i in images],
        "turns": [{"user": u, "assistant": a} for u, a in turns],
        "meta": meta,
    }


def _frontal(study: dict) -> list[dict]:
    return [im for im in study["images"] if im["view"] in FRONTAL_VIEWS]


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _image_hw(image: dict) -> tuple[int, int]:
    hw = image.get("hw")
    if hw is None:
        raise ConversationError(
            "image record has no 'hw' (height, width): box tasks need it to convert pixel boxes; "
            "build the dataset with cxrlib.data.datasets.build_datasets"
        )
    return int(hw[0]), int(hw[1])


def finding_boxes(image: dict) -> dict[str, list[list[int]]]:
    """Visible 0-100 boxes of the POSITIVE findings on ``image``, by observation (card order)."""
    if not image.get("finding_boxes"):
        return {}  # real images without boxes may not know their size (``hw`` None)
    hw = _image_hw(image)
    out: dict[str, list[list[int]]] = {}
    for item in image.get("finding_boxes", []):
        finding = item["finding"]
        if finding.get("status", POSITIVE) != POSITIVE:
            continue
        rel = to_relative(item["box"], hw)
        if is_visible(rel):
            out.setdefault(finding["observation"], []).append(rel)
    order = {name: i for i, name in enumerate(CHEXPERT_LABELS)}
    return {k: sorted(out[k]) for k in sorted(out, key=order.get)}


def has_finding_box(study: dict) -> bool:
    """Whether any image of ``study`` has a visible box of a positive finding."""
    return any(finding_boxes(im) for im in study.get("images", []))


def organ_boxes(image: dict) -> dict[str, list[int]]:
    """Visible 0-100 organ boxes of ``image`` (``left lung``, ``right lung``, ``heart``)."""
    if not image.get("organ_boxes"):
        return {}
    hw = _image_hw(image)
    out = {}
    for organ in ORGANS:
        box = image.get("organ_boxes", {}).get(organ)
        if box is not None:
            rel = to_relative(box, hw)
            if is_visible(rel):
                out[organ] = rel
    return out


def region_boxes(image: dict) -> dict[str, list[int]]:
    """Visible 0-100 boxes of an image's named anatomical regions (``region_boxes``: Chest
    ImaGenome's ``right lung``, ``cardiac silhouette``, ...), sorted by name."""
    if not image.get("region_boxes"):
        return {}
    hw = _image_hw(image)
    out = {}
    for name in sorted(image["region_boxes"]):
        rel = to_relative(image["region_boxes"][name], hw)
        if is_visible(rel):
            out[name] = rel
    return out


def negative_observations(study: dict) -> list[str]:
    """CheXpert observations (not No Finding) that are certainly absent: not positive, not
    uncertain, and not among the study's findings at all."""
    mentioned = {f["observation"] for f in study.get("findings", [])}
    labels = study.get("labels", {})
    return [
        LABEL_OF[f]
        for f in labelled_findings(study)
        if labels.get(LABEL_OF[f]) not in (POSITIVE, UNCERTAIN) and LABEL_OF[f] not in mentioned
    ]


def labelled_findings(study: dict) -> list[str]:
    """The lowercase findings a study's source labels (``label_space``; all 13 when absent): a
    finding outside it is unknown (NIH labels no fracture), never a negative."""
    space = study.get("label_space")
    return COT_FINDINGS if space is None else [f for f in COT_FINDINGS if LABEL_OF[f] in space]


def split_sentences(text: str) -> list[str]:
    """Sentences of a report without their final period ("2.5 cm" does not split a sentence)."""
    return [s.rstrip(".!? ").strip() for s in iu_split_sentences(text or "") if s.strip(" .")]


def _keyword_position(sentence: str, keyword) -> int:
    words = keyword if isinstance(keyword, tuple) else (keyword,)
    positions = [sentence.find(w) for w in words]
    return -1 if min(positions) < 0 else min(positions)


def find_phrase(findings_text: str, finding: dict) -> str | None:
    """The report sentence that best describes ``finding`` (a ``Finding.to_dict()``), or None.

    A sentence qualifies if it contains one of the observation's keywords with no negation cue
    (no, without, clear, normal, ...) before it. Among qualifying sentences we prefer the one
    naming the finding's side, and avoid de-identified ones (``XXXX``).
    """
    keywords = OBSERVATION_KEYWORDS.get(finding["observation"], [])
    side = finding.get("side")
    best, best_score = None, None
    for sentence in split_sentences(findings_text):
        low = sentence.lower()
        hits = [p for p in (_keyword_position(low, k) for k in keywords) if p >= 0]
        if not hits or _NEGATION_RE.search(low[: min(hits)]):
            continue
        score = 0
        if side in ("left", "right"):
            other = "right" if side == "left" else "left"
            score += 2 * (side in low) - (other in low and side not in low)
        elif side == "bilateral":
            score += 2 * ("bilateral" in low or "both" in low)
        score -= 3 * ("xxxx" in low)
        if best_score is None or score > best_score:
            best, best_score = sentence, score
    return best


# ---------------------------------------------------------------------------------------------
# Builders: (study, rng) -> conversation dict or None
# ---------------------------------------------------------------------------------------------
def _report(study: dict, rng: np.random.Generator, task: str, mode: str, cot: bool) -> dict | None:
    report = (study.get("findings_text") or "").strip()
    images = study.get("images", [])
    if not report or not images:
        return None
    prior_report, prior_idx = None, []
    if mode == "single":
        idx = [_pick(rng, images)["index"]]
    elif mode == "multi_image":
        if len(images) < 2:
            return None
        idx = [im["index"] for im in images[:5]]  # the card: up to 5 images of one study
    else:  # multi_study
        prior = study.get("prior")
        if not prior or not prior.get("images") or not (prior.get("findings_text") or "").strip():
            return None
        prior_report = prior["findings_text"].strip()
        prior_idx = [im["index"] for im in prior["images"][:5]]
        idx = [im["index"] for im in images[:5]]
    users = report_user_turns(mode, len(idx), prior_report, len(prior_idx), cot=cot)
    answers = [cot_answer(study["labels"]), report] if cot else [report]
    return _conv(
        task,
        prior_idx + idx,
        list(zip(users, answers)),
        study_id=study["study_id"],
        mode=mode,
        views=[im["view"] for im in images if im["index"] in idx],
        positives=positive_findings(study["labels"]),
    )


def build_cot_single(study, rng):
    return _report(study, rng, "cot_single", "single", cot=True)


def build_cot_multi_image(study, rng):
    return _report(study, rng, "cot_multi_image", "multi_image", cot=True)


def build_cot_multi_study(study, rng):
    return _report(study, rng, "cot_multi_study", "multi_study", cot=True)


def build_direct_report(study, rng):
    return _report(study, rng, "direct_report", "single", cot=False)


def build_direct_multi_image(study, rng):
    return _report(study, rng, "direct_multi_image", "multi_image", cot=False)


def build_direct_multi_study(study, rng):
    return _report(study, rng, "direct_multi_study", "multi_study", cot=False)


def build_report_only(study, rng):
    """Phase 1: input ``<image>``, target the Findings section, no instruction."""
    report = (study.get("findings_text") or "").strip()
    if not report or not study.get("images"):
        return None
    image = _pick(rng, study["images"])
    return _conv(
        "report_only",
        [image["index"]],
        [(IMAGE_TOKEN, report)],
        study_id=study["study_id"],
        views=[image["view"]],
    )


def build_single_disease(study, rng):
    """``Is {finding} present ...?`` -> ``Yes.`` / ``No.`` / ``Uncertain.``; half the questions ask
    about a positive or uncertain finding when the study has one (else the set is mostly No.)."""
    if not study.get("images"):
        return None
    labels = study["labels"]
    present = [f for f in COT_FINDINGS if labels.get(LABEL_OF[f]) in (POSITIVE, UNCERTAIN)]
    absent = [f for f in labelled_findings(study) if f not in present]
    if not present and not absent:
        return None
    pool = present if present and (not absent or rng.random() < 0.5) else absent
    finding = _pick(rng, pool)
    value = labels.get(LABEL_OF[finding])
    answer = {POSITIVE: "Yes.", UNCERTAIN: "Uncertain."}.get(value, "No.")
    image = _pick(rng, study["images"])
    return _conv(
        "single_disease",
        [image["index"]],
        [(_single(SINGLE_DISEASE_Q.format(finding=finding)), answer)],
        study_id=study["study_id"],
        finding=finding,
        answer=answer,
    )


def build_multi_label(study, rng):
    """Multi-label classification: the CoT turn-1 question and answer as a task of its own."""
    if not study.get("images") or labelled_findings(study) != COT_FINDINGS:
        return None  # the question lists all 13 findings: the source must label all of them
    image = _pick(rng, study["images"])
    question = _join(
        image_prefix(1), COT_QUESTION.format(target="radiology image", findings=FINDINGS_LIST)
    )
    return _conv(
        "multi_label",
        [image["index"]],
        [(question, cot_answer(study["labels"]))],
        study_id=study["study_id"],
        positives=positive_findings(study["labels"]),
    )


def build_finding_grounding(study, rng):
    """``Is {finding} present ...? If so, ...`` -> ``Yes. [..].`` / ``Not present.``"""
    frontal = _frontal(study)
    if not frontal:
        return None
    image = _pick(rng, frontal)
    boxes = finding_boxes(image)
    negatives = negative_observations(study)
    if not boxes and not negatives:
        return None
    if boxes and (not negatives or rng.random() < 0.5):
        obs = _pick(rng, list(boxes))
        answer, rel = f"Yes. {format_boxes(boxes[obs])}.", boxes[obs]
    else:
        obs, answer, rel = _pick(rng, negatives), NOT_PRESENT, []
    return _conv(
        "finding_grounding",
        [image["index"]],
        [(finding_grounding_question(finding_name(obs)), answer)],
        study_id=study["study_id"],
        finding=finding_name(obs),
        boxes=rel,
    )


def build_grounded_finding(study, rng):
    """``Provide a finding name for this region. [..]`` -> ``{finding}``"""
    candidates = [
        (im, obs, b) for im in _frontal(study) for obs, bs in finding_boxes(im).items() for b in bs
    ]
    if not candidates:
        return None
    image, obs, box = _pick(rng, candidates)
    return _conv(
        "grounded_finding",
        [image["index"]],
        [(_single(GROUNDED_FINDING_Q.format(bbox=format_box(box))), finding_name(obs))],
        study_id=study["study_id"],
        finding=finding_name(obs),
        boxes=[box],
    )


def build_multi_finding_grounding(study, rng):
    """Candidates = the image's boxed positives + 2-4 certain negatives, in card order; the answer
    lists each present one with its boxes (``finding [..], [..], finding2 [..].``)."""
    frontal = _frontal(study)
    if not frontal:
        return None
    image = _pick(rng, frontal)
    boxes = finding_boxes(image)
    negatives = negative_observations(study)
    k = min(len(negatives), int(rng.integers(2, 5)))
    chosen = set(boxes) | {negatives[i] for i in rng.choice(len(negatives), k, replace=False)}
    if not chosen:
        return None
    names = [f for f in COT_FINDINGS if LABEL_OF[f] in chosen]
    parts = [f"{f} {format_boxes(boxes[LABEL_OF[f]])}" for f in names if LABEL_OF[f] in boxes]
    answer = ", ".join(parts) + "." if parts else NOT_FOUND
    question = _single(MULTI_FINDING_Q.format(findings=", ".join(names)))
    return _conv(
        "multi_finding_grounding",
        [image["index"]],
        [(question, answer)],
        study_id=study["study_id"],
        findings=names,
        boxes={finding_name(k): v for k, v in boxes.items()},
    )


def build_abnormality_detection(study, rng):
    """``Provide the bounding box coordinates of abnormal regions ...`` -> ``[..], [..].``"""
    candidates = []
    for im in _frontal(study):
        rel = [b for obs, bs in finding_boxes(im).items() if obs not in NON_ABNORMAL for b in bs]
        if rel:
            candidates.append((im, rel))
    if not candidates:
        return None
    image, rel = _pick(rng, candidates)
    return _conv(
        "abnormality_detection",
        [image["index"]],
        [(_single(ABNORMALITY_Q), f"{format_boxes(rel)}.")],
        study_id=study["study_id"],
        boxes=rel,
    )


def _organ_candidates(study):
    return [(im, organ, box) for im in _frontal(study)
            for organ, box in (organ_boxes(im) | region_boxes(im)).items()]  # fmt: skip


def build_organ_grounding(study, rng):
    candidates = _organ_candidates(study)
    if not candidates:
        return None
    image, organ, box = _pick(rng, candidates)
    return _conv(
        "organ_grounding",
        [image["index"]],
        [(_single(ORGAN_GROUNDING_Q.format(organ=organ)), format_box(box))],
        study_id=study["study_id"],
        organ=organ,
        boxes=[box],
    )


def build_grounded_organ(study, rng):
    candidates = _organ_candidates(study)
    if not candidates:
        return None
    image, organ, box = _pick(rng, candidates)
    return _conv(
        "grounded_organ",
        [image["index"]],
        [(_single(GROUNDED_ORGAN_Q.format(bbox=format_box(box))), organ)],
        study_id=study["study_id"],
        organ=organ,
        boxes=[box],
    )


def _phrase_candidates(study):
    out = []
    phrases: dict[str, str | None] = {}
    by_obs = {f["observation"]: f for f in study.get("findings", []) if f.get("status", 1) == 1}
    for im in _frontal(study):
        for item in im.get("phrase_boxes", []):  # sources that pair phrases with boxes (MS-CXR)
            rel = [to_relative(b, _image_hw(im)) for b in item["boxes"]]
            if rel and all(is_visible(b) for b in rel):
                out.append((im, item["observation"], sorted(rel), item["phrase"]))
        for obs, rel in finding_boxes(im).items():
            if obs not in phrases:
                finding = by_obs.get(obs, {"observation": obs})
                phrases[obs] = find_phrase(study.get("findings_text", ""), finding)
            if phrases[obs]:
                out.append((im, obs, rel, phrases[obs]))
    return out


def build_phrase_grounding(study, rng):
    """A sentence of the report -> the boxes of the finding it describes (``[..].``)."""
    candidates = _phrase_candidates(study)
    if not candidates:
        return None
    image, obs, rel, phrase = _pick(rng, candidates)
    return _conv(
        "phrase_grounding",
        [image["index"]],
        [(_single(PHRASE_GROUNDING_Q.format(phrase=phrase)), f"{format_boxes(rel)}.")],
        study_id=study["study_id"],
        finding=finding_name(obs),
        phrase=phrase,
        boxes=rel,
    )


def build_grounded_phrase(study, rng):
    """Boxes -> the report sentence describing them (``{phrase}.``)."""
    candidates = _phrase_candidates(study)
    if not candidates:
        return None
    image, obs, rel, phrase = _pick(rng, candidates)
    return _conv(
        "grounded_phrase",
        [image["index"]],
        [(_single(GROUNDED_PHRASE_Q.format(bbox=format_boxes(rel))), f"{phrase}.")],
        study_id=study["study_id"],
        finding=finding_name(obs),
        phrase=phrase,
        boxes=rel,
    )


def location_answer(finding: dict) -> str | None:
    """``left lower zone``, ``bilateral``, ``upper zone``, ...; None without side or zone."""
    side, zone = finding.get("side"), finding.get("zone")
    if not side and not zone:
        return None
    return _join(side or "", f"{zone} zone" if zone else "")


def vqa_questions(study: dict, image: dict) -> dict[str, list[tuple[str, str]]]:
    """Every (question, answer) the VQA task can ask about ``image`` of ``study``, by type."""
    labels = study["labels"]
    positives = [f for f in COT_FINDINGS if labels.get(LABEL_OF[f]) == POSITIVE]
    negatives = [finding_name(o) for o in negative_observations(study)]
    q = VQA_QUESTIONS
    out: dict[str, list[tuple[str, str]]] = {
        "presence": [(q["presence"].format(finding=f), "yes") for f in positives]
        + [(q["presence"].format(finding=f), "no") for f in negatives],
        "view": [(q["view"], VIEW_ANSWERS[image["view"]])],
        "abnormality_list": [(q["abnormality_list"], ", ".join(positives) or NO_ABNORMALITY)],
        "location": [],
        "severity": [],
    }
    certain = [f for f in study.get("findings", []) if f.get("status", 1) == POSITIVE]
    counts: dict[str, int] = {}
    for f in certain:
        counts[f["observation"]] = counts.get(f["observation"], 0) + 1
    for f in certain:
        if counts[f["observation"]] > 1:  # two effusions: "where is the effusion" is ambiguous
            continue
        name = finding_name(f["observation"])
        if (loc := location_answer(f)) is not None:
            out["location"].append((q["location"].format(finding=name), loc))
        if f.get("severity"):
            out["severity"].append((q["severity"].format(finding=name), f["severity"]))
    return {k: v for k, v in out.items() if v}


def _given_vqa(task: str, images: list[int], prefix: str, study: dict, item: dict) -> dict:
    """A dataset's own question (``qa`` / ``diff_qa`` item) in the card's wrapper."""
    wrapper = DIFF_VQA_Q if task == "difference_vqa" else VQA_Q
    user = _join(prefix, wrapper.format(question=item["question"].strip()))
    return _conv(task, images, [(user, item["answer"])], study_id=study["study_id"],
                 question_type=item.get("question_type"), answer=item["answer"],
                 answer_type=item.get("answer_type", "open"))  # fmt: skip


def _dialog(study: dict, image: dict) -> dict:
    """A given conversation (``dialog``: user / assistant turns): the image prefix goes first."""
    turns = [(t["user"], t["assistant"]) for t in study["dialog"]]
    turns[0] = (_single(turns[0][0]), turns[0][1])
    return _conv("vqa", [image["index"]], turns, study_id=study["study_id"],
                 question_type=study.get("task_type"), answer=turns[-1][1], answer_type="open")  # fmt: skip


def build_vqa(study, rng):
    """``Answer the question. {question}`` about one image; the question type is drawn uniformly
    among those the study supports, then the question (presence: yes/no balanced). A record of
    a VQA dataset asks one of its own questions (``qa``) or replays its ``dialog``."""
    if not study.get("images"):
        return None
    if study.get("dialog"):
        return _dialog(study, study["images"][0])
    if study.get("qa"):
        item = _pick(rng, study["qa"])
        image = study["images"][item.get("image", 0)]
        return _given_vqa("vqa", [image["index"]], _single(""), study, item)
    image = _pick(rng, study["images"])
    options = vqa_questions(study, image)
    qtype = _pick(rng, sorted(options))
    pairs = options[qtype]
    if qtype == "presence":  # balance yes / no
        yes = [p for p in pairs if p[1] == "yes"]
        no = [p for p in pairs if p[1] == "no"]
        pairs = yes if yes and (not no or rng.random() < 0.5) else no
    question, answer = _pick(rng, pairs)
    return _conv(
        "vqa",
        [image["index"]],
        [(_single(VQA_Q.format(question=question)), answer)],
        study_id=study["study_id"],
        question_type=qtype,
        answer=answer,
        answer_type="closed" if qtype in CLOSED_QUESTION_TYPES else "open",
    )


def difference_questions(changes: dict[str, str]) -> dict[str, list[tuple[str, str]]]:
    """Every (question, answer) of difference VQA for a ``changes`` record, by type."""
    order = [LABEL_OF[f] for f in COT_FINDINGS]
    ordered = [(o, changes[o]) for o in order if o in changes]
    unknown = set(changes) - set(order)
    if unknown or any(c not in CHANGE_WORDS for _, c in ordered):
        raise ConversationError(
            f"bad 'changes' record {changes}: keys must be CheXpert observations and values one "
            f"of {sorted(CHANGE_WORDS)}"
        )
    diffs = [f"{CHANGE_WORDS[c]} {finding_name(o)}" for o, c in ordered if c != "unchanged"]
    q = DIFF_VQA_QUESTIONS
    return {
        "difference": [(q["difference"], ", ".join(diffs) or NO_CHANGE)],
        "change": [
            (q["change"].format(finding=finding_name(o)), CHANGE_WORDS[c]) for o, c in ordered
        ],
        "new_finding": [(q["new_finding"], "yes" if any(c == "new" for _, c in ordered) else "no")],
    }


def build_difference_vqa(study, rng):
    """``reference: <image>, main: <image> Using the provided ...`` on prior vs current frontals
    (a VQA dataset's own difference questions, ``diff_qa``, when the record has them)."""
    prior = study.get("prior")
    if prior and study.get("diff_qa") and prior.get("images") and study.get("images"):
        images = [prior["images"][0]["index"], study["images"][0]["index"]]
        conv = _given_vqa("difference_vqa", images, DIFF_VQA_PREFIX, study,
                          _pick(rng, study["diff_qa"]))  # fmt: skip
        conv["meta"]["prior_study_id"] = prior.get("study_id")
        return conv
    if not prior or study.get("changes") is None:
        return None
    ref, main = _frontal(prior), _frontal(study)
    if not ref or not main:
        return None
    options = {k: v for k, v in difference_questions(study["changes"]).items() if v}
    qtype = _pick(rng, sorted(options))
    question, answer = _pick(rng, options[qtype])
    user = _join(DIFF_VQA_PREFIX, DIFF_VQA_Q.format(question=question))
    return _conv(
        "difference_vqa",
        [ref[0]["index"], main[0]["index"]],
        [(user, answer)],
        study_id=study["study_id"],
        prior_study_id=prior.get("study_id"),
        question_type=qtype,
        answer=answer,
        answer_type="closed" if qtype in CLOSED_QUESTION_TYPES else "open",
    )


BUILDERS: dict[str, Callable[[dict, np.random.Generator], dict | None]] = {
    "cot_single": build_cot_single,
    "cot_multi_image": build_cot_multi_image,
    "cot_multi_study": build_cot_multi_study,
    "single_disease": build_single_disease,
    "multi_label": build_multi_label,
    "finding_grounding": build_finding_grounding,
    "grounded_finding": build_grounded_finding,
    "multi_finding_grounding": build_multi_finding_grounding,
    "abnormality_detection": build_abnormality_detection,
    "organ_grounding": build_organ_grounding,
    "grounded_organ": build_grounded_organ,
    "phrase_grounding": build_phrase_grounding,
    "grounded_phrase": build_grounded_phrase,
    "vqa": build_vqa,
    "difference_vqa": build_difference_vqa,
    "report_only": build_report_only,
    "direct_report": build_direct_report,
    "direct_multi_image": build_direct_multi_image,
    "direct_multi_study": build_direct_multi_study,
}
assert set(BUILDERS) == set(ALL_TASKS), "every task of constants.TASK_GROUPS needs a builder"


def build_conversation(task: str, study: dict, rng: np.random.Generator | int) -> dict | None:
    """Build one conversation of ``task`` from a study record.

    Args:
        task: a task of ``constants.TASK_GROUPS`` or ``constants.EXTRA_TASKS``.
        study: a study record as saved in ``studies.jsonl``.
        rng: a ``numpy.random.Generator`` (or an int seed) for the random choices.

    Returns:
        The conversation dict, or None when the study cannot support the task (no prior study,
        no frontal image, no boxed positive finding, ...).
    """
    if task not in BUILDERS:
        raise ConversationError(f"unknown task '{task}'; known tasks: {', '.join(ALL_TASKS)}")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    return BUILDERS[task](study, rng)


def supported_tasks(study: dict, tasks: Sequence[str] = tuple(ALL_TASKS)) -> list[str]:
    """The tasks ``study`` can make a conversation for (one trial build with a fixed seed)."""
    return [t for t in tasks if build_conversation(t, study, np.random.default_rng(0)) is not None]
