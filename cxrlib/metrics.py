"""Evaluation metrics of the paper: clinical F1, language metrics, grounding IoU, VQA accuracy.

All scores are fractions in [0, 1] (tables multiply by 100 to compare with the paper).

Clinical accuracy (the card's protocol). Reference and generated reports are labeled with the same
labeler (``cxrlib.labeler``); a label counts as present when it is 1 (positive), everything else
(0, -1, blank) as absent. F1 is computed per label, then

* ``mF1-14`` = macro average over the 14 CheXpert labels (No Finding included),
* ``uF1-14`` = micro average (pooled true/false positives and false negatives) over the 14,
* ``mF1-5`` / ``uF1-5`` = the same over Atelectasis, Cardiomegaly, Consolidation, Edema and
  Pleural Effusion.

``uncertain_as_positive=True`` counts -1 as present on both sides (the paper's second variant).
``bootstrap_ci`` resamples studies with replacement (seeded) for 95% confidence intervals.

    >>> clinical_f1(reference_labels, generated_labels)["mF1-14"]

Language metrics: BLEU-1..4, ROUGE-L and CIDEr from ``pycocoevalcap`` (the COCO caption
reference code, pure Python) on lowercased word tokens (``tokenize``); METEOR from
``pycocoevalcap``'s METEOR 1.5 when Java is installed, else NLTK's re-implementation when NLTK's
WordNet data is present, else left out (``meteor_backend`` says which).

Degenerate outputs (``degenerate_outputs``): the labeler reads an empty or non-report output as
"No Finding" (CheXpert's rule, kept), which scores well on a mostly normal test set. So every
clinical table also counts outputs that are empty, have no word, hold box strings or copy the
prompt, and flags the table when most of its outputs are such.

Grounding: boxes in the card's 0-100 convention, parsed by ``cxrlib.data.boxes``; an answer
without a well-formed box scores IoU 0. VQA: exact match after lowercasing and stripping the
final period, overall and by question type. Introduced in notebook 06.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache

import numpy as np
import pandas as pd

from cxrlib.constants import CHEXPERT_LABELS, FIVE_LABELS, POSITIVE, SYSTEM_TEXT, UNCERTAIN
from cxrlib.data.boxes import box_iou, parse_boxes
from cxrlib.data.conversations import report_user_turns

CLINICAL_KEYS = ("mF1-14", "uF1-14", "mF1-5", "uF1-5")
LANGUAGE_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
IOU_THRESHOLD = 0.5
GRID = 100  # boxes live on a 0-100 grid (cxrlib.data.boxes.SCALE)


# --- clinical accuracy --------------------------------------------------------------------------


def as_label_frame(labels) -> pd.DataFrame:
    """Labels as a DataFrame with the 14 ``CHEXPERT_LABELS`` columns.

    Args:
        labels: a DataFrame (from ``cxrlib.labeler``) or a sequence of ``{label: 1|0|-1|None}``.
    """
    frame = labels if isinstance(labels, pd.DataFrame) else pd.DataFrame(list(labels))
    missing = [name for name in CHEXPERT_LABELS if name not in frame.columns]
    if missing:
        raise ValueError(
            f"labels lack the columns {missing}; label the reports with cxrlib.labeler first"
        )
    return frame[CHEXPERT_LABELS]


def binarize(labels, uncertain_as_positive: bool = False) -> np.ndarray:
    """``(n, 14)`` bool array: True where the label is 1 (or -1 if ``uncertain_as_positive``)."""
    values = as_label_frame(labels).to_numpy(dtype=float, na_value=np.nan)
    present = values == POSITIVE
    if uncertain_as_positive:
        present |= values == UNCERTAIN
    return present


def f1_from_counts(tp, fp, fn) -> np.ndarray:
    """F1 = 2TP / (2TP + FP + FN), and 0 where the denominator is 0 (sklearn's zero_division=0)."""
    tp, fp, fn = (np.asarray(x, dtype=float) for x in (tp, fp, fn))
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(denom), where=denom > 0)


def label_counts(
    y_true: np.ndarray, y_pred: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-label true positives, false positives and false negatives of binary label arrays."""
    tp = (y_true & y_pred).sum(axis=0)
    fp = (~y_true & y_pred).sum(axis=0)
    fn = (y_true & ~y_pred).sum(axis=0)
    return tp, fp, fn


def _clinical_from_binary(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    tp, fp, fn = label_counts(y_true, y_pred)
    five = [CHEXPERT_LABELS.index(name) for name in FIVE_LABELS]
    per_label = f1_from_counts(tp, fp, fn)
    return {
        "mF1-14": float(per_label.mean()),
        "uF1-14": float(f1_from_counts(tp.sum(), fp.sum(), fn.sum())),
        "mF1-5": float(per_label[five].mean()),
        "uF1-5": float(f1_from_counts(tp[five].sum(), fp[five].sum(), fn[five].sum())),
    }


def _check_pair(reference, generated) -> tuple[np.ndarray, np.ndarray]:
    if len(reference) != len(generated):
        raise ValueError(
            f"{len(reference)} reference label rows but {len(generated)} generated ones: "
            "label the same reports in the same order"
        )
    if len(reference) == 0:
        raise ValueError("no reports to score")
    return reference, generated


def clinical_f1(reference, generated, uncertain_as_positive: bool = False) -> dict:
    """The card's clinical-accuracy F1 scores.

    Args:
        reference: labels of the reference reports (DataFrame or list of label dicts).
        generated: labels of the generated reports, same order.
        uncertain_as_positive: count -1 as present (the paper's second variant).

    Returns:
        ``{"mF1-14", "uF1-14", "mF1-5", "uF1-5": float, "per_label": {label: F1},
        "support": {label: number of reference positives}, "n": reports}``.
    """
    reference, generated = _check_pair(reference, generated)
    y_true = binarize(reference, uncertain_as_positive)
    y_pred = binarize(generated, uncertain_as_positive)
    tp, fp, fn = label_counts(y_true, y_pred)
    out: dict = _clinical_from_binary(y_true, y_pred)
    out["per_label"] = dict(zip(CHEXPERT_LABELS, f1_from_counts(tp, fp, fn).tolist()))
    out["support"] = dict(zip(CHEXPERT_LABELS, y_true.sum(axis=0).astype(int).tolist()))
    out["n"] = int(len(y_true))
    return out


def bootstrap_ci(
    score_fn: Callable[[np.ndarray], Mapping[str, float]],
    n: int,
    samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals over ``n`` items (studies or images).

    Args:
        score_fn: maps an index array (a resample of ``range(n)``) to ``{metric: value}``.
        n: number of items.
        samples: bootstrap resamples.
        seed: seeds the resampling (same seed -> same intervals).
        level: coverage of the interval.

    Returns:
        ``{metric: (low, high)}``.
    """
    if n < 1 or samples < 1:
        raise ValueError(f"bootstrap needs n >= 1 and samples >= 1, got n={n}, samples={samples}")
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(samples):
        for key, value in score_fn(rng.integers(0, n, size=n)).items():
            draws.setdefault(key, []).append(value)
    tail = 100 * (1 - level) / 2
    return {
        key: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail)))
        for key, v in draws.items()
    }


def clinical_f1_ci(
    reference,
    generated,
    uncertain_as_positive: bool = False,
    samples: int = 1000,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Bootstrap 95% CIs of mF1-14, uF1-14, mF1-5, uF1-5 (resampling reports)."""
    reference, generated = _check_pair(reference, generated)
    y_true = binarize(reference, uncertain_as_positive)
    y_pred = binarize(generated, uncertain_as_positive)
    return bootstrap_ci(
        lambda idx: _clinical_from_binary(y_true[idx], y_pred[idx]), len(y_true), samples, seed
    )


# --- language metrics ---------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?")


def tokenize(text: str) -> str:
    """Lowercase and keep word tokens (punctuation dropped, like the COCO PTB tokenizer).

    ``"Heart size is normal. No effusion."`` -> ``"heart size is normal no effusion"``;
    decimals stay one token ("2.5").
    """
    if not isinstance(text, str):
        raise TypeError(f"expected report text, got {type(text).__name__}")
    return " ".join(_TOKEN_RE.findall(text.lower()))


def _java_available() -> bool:
    return shutil.which("java") is not None


@lru_cache(maxsize=1)
def _nltk_wordnet_available() -> bool:
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return True
    except (LookupError, ImportError, OSError):
        return False


def meteor_backend(choice: str = "auto") -> str | None:
    """Which METEOR implementation can run here.

    Args:
        choice: ``"auto"`` (Java METEOR 1.5 if ``java`` is on PATH, else NLTK if its WordNet data
            is installed), ``"java"``, ``"nltk"`` or ``"none"``.

    Returns:
        ``"pycocoevalcap-meteor-1.5 (java)"``, ``"nltk-meteor (wordnet)"`` or None (METEOR is
        left out).
    """
    java, nltk = "pycocoevalcap-meteor-1.5 (java)", "nltk-meteor (wordnet)"
    if choice == "none":
        return None
    if choice == "java":
        if not _java_available():
            raise RuntimeError("METEOR 'java' needs a Java runtime on PATH (apt-get install "
                               "default-jre-headless), or use meteor='nltk'/'none'")  # fmt: skip
        return java
    if choice == "nltk":
        if not _nltk_wordnet_available():
            raise RuntimeError("METEOR 'nltk' needs NLTK's WordNet data (python -m nltk.downloader "
                               "wordnet on a machine with internet), or use meteor='none'")  # fmt: skip
        return nltk
    if choice == "auto":
        if _java_available():
            return java
        return nltk if _nltk_wordnet_available() else None
    raise ValueError(f"unknown METEOR backend '{choice}': choose auto, java, nltk or none")


@lru_cache(maxsize=1)
def _java_meteor():
    """One METEOR 1.5 scorer per process: starting its JVM takes ~10 s on 2 cores."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def _meteor(refs: dict, hyps: dict, backend: str) -> float:
    if backend.startswith("pycocoevalcap"):
        score, _ = _java_meteor().compute_score(refs, hyps)
        return float(score)
    from nltk.translate.meteor_score import meteor_score

    scores = [meteor_score([r.split() for r in refs[k]], hyps[k][0].split()) for k in refs]
    return float(np.mean(scores))


def language_metrics(
    references: Sequence[str], hypotheses: Sequence[str], meteor: str = "auto"
) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr of generated reports against their references.

    Args:
        references: one reference report per item.
        hypotheses: one generated report per item, same order (empty strings score 0).
        meteor: METEOR backend, see ``meteor_backend``.

    Returns:
        ``{"BLEU-1", ..., "BLEU-4", "METEOR" (None when no backend), "ROUGE-L", "CIDEr": float,
        "meteor_backend": str | None, "n": int}``. BLEU is corpus-level (closest reference length),
        ROUGE-L the mean per-report F (beta 1.2), CIDEr is CIDEr-D with IDF from these references.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("no reports to score")
    refs = {i: [tokenize(r)] for i, r in enumerate(references)}
    hyps = {i: [tokenize(h)] for i, h in enumerate(hypotheses)}
    empty = [i for i, r in refs.items() if not r[0]]
    if empty:
        raise ValueError(f"references {empty[:5]} are empty: drop studies without a report first")
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    rouge, _ = Rouge().compute_score(refs, hyps)
    cider, _ = Cider().compute_score(refs, hyps)
    backend = meteor_backend(meteor)
    out = {f"BLEU-{k + 1}": float(b) for k, b in enumerate(bleu)}
    out["METEOR"] = _meteor(refs, hyps, backend) if backend else None
    out["ROUGE-L"] = float(rouge)
    out["CIDEr"] = float(cider)
    out["meteor_backend"] = backend
    out["n"] = len(references)
    return out


# --- degenerate outputs -------------------------------------------------------------------------

DEGENERATE_KINDS = ("empty", "boxes", "no_words", "prompt_copy")  # checked in this order
MOSTLY_DEGENERATE = 0.5  # a table is flagged when more than this share of outputs is degenerate
PROMPT_COPY_WORDS = 6  # this many consecutive words of a prompt make an output a copy
_BOX_STRING_RE = re.compile(r"\[\s*\d+\s*,\s*\d+\s*,\s*\d+\s*,\s*\d+\s*\]")
_REAL_WORD_RE = re.compile(r"[a-z]{3,}")  # "il." or "." has none; every report has some
_LETTERS_RE = re.compile(r"[a-z]+")


@lru_cache(maxsize=1)
def _prompt_texts() -> tuple[tuple[str, ...], ...]:
    """The word sequences of every report prompt (all modes, CoT and direct) and the system text."""
    texts = [SYSTEM_TEXT]
    for mode, n in (("single", 1), ("multi_image", 2), ("multi_study", 1)):
        for cot in (True, False):
            texts += report_user_turns(mode, n, "prior", 1 if mode == "multi_study" else 0, cot=cot)
    return tuple(tuple(_LETTERS_RE.findall(t.lower())) for t in texts)


@lru_cache(maxsize=1)
def _prompt_ngrams() -> frozenset:
    n = PROMPT_COPY_WORDS
    return frozenset(p[i : i + n] for p in _prompt_texts() for i in range(len(p) - n + 1))


def _copies_prompt(words: list[str]) -> bool:
    n = PROMPT_COPY_WORDS
    if len(words) >= n:
        grams = _prompt_ngrams()
        return any(tuple(words[i : i + n]) in grams for i in range(len(words) - n + 1))
    if len(words) < 3:  # "pleural effusion." is a report, even though the prompt lists it
        return False
    return any(
        tuple(words) == p[i : i + len(words)]
        for p in _prompt_texts()
        for i in range(len(p) - len(words) + 1)
    )


def degenerate_kind(text: str | None) -> str | None:
    """Why an output is not a report (``DEGENERATE_KINDS``), or None when it may be one.

    ``empty``: None or blank; ``boxes``: holds a box string such as ``[12, 30, 55, 80]`` (a
    grounding answer); ``no_words``: no word of three letters or more (``"."``, ``"il."``);
    ``prompt_copy``: repeats ``PROMPT_COPY_WORDS`` consecutive words of a report prompt or the
    system text (or is, whole, a 3-5 word piece of one).
    """
    if text is None or not str(text).strip():
        return "empty"
    lower = str(text).lower()
    if _BOX_STRING_RE.search(lower):
        return "boxes"
    if not _REAL_WORD_RE.search(lower):
        return "no_words"
    if _copies_prompt(_LETTERS_RE.findall(lower)):
        return "prompt_copy"
    return None


def degenerate_outputs(texts: Sequence[str | None]) -> dict:
    """Count the outputs that are not reports, by kind, and flag a mostly degenerate set.

    Returns:
        ``{"n", "degenerate", "fraction", "mostly_degenerate", "counts": {kind: n},
        "examples": {kind: the first such output}}``.
    """
    kinds = [degenerate_kind(t) for t in texts]
    counts = {k: kinds.count(k) for k in DEGENERATE_KINDS}
    bad = sum(counts.values())
    fraction = bad / len(texts) if len(texts) else 0.0
    return {
        "n": len(texts),
        "degenerate": bad,
        "fraction": fraction,
        "mostly_degenerate": fraction > MOSTLY_DEGENERATE,
        "counts": counts,
        "examples": {
            k: next(t for t, kk in zip(texts, kinds) if kk == k)
            for k in DEGENERATE_KINDS
            if counts[k]
        },  # fmt: skip
    }


# --- grounding ----------------------------------------------------------------------------------


def _mask(boxes: Sequence[Sequence[int]]) -> np.ndarray:
    grid = np.zeros((GRID, GRID), dtype=bool)
    for x1, y1, x2, y2 in boxes:
        grid[int(y1) : int(y2), int(x1) : int(x2)] = True
    return grid


def boxes_iou(predicted: Sequence[Sequence[int]], target: Sequence[Sequence[int]]) -> float:
    """IoU of two sets of 0-100 boxes: ``box_iou`` for one box each, else of their unions.

    Several boxes are compared as regions (union of unit cells on the 0-100 grid), so a model
    that splits one target box into two adjacent boxes is not punished. No predicted box -> 0.
    """
    if not target:
        raise ValueError("a grounding target needs at least one box")
    if not predicted:
        return 0.0
    if len(predicted) == 1 and len(target) == 1:
        return float(box_iou(predicted[0], target[0]))
    p, t = _mask(predicted), _mask(target)
    union = (p | t).sum()
    return float((p & t).sum() / union) if union else 0.0


def grounding_scores(
    answers: Sequence[str | Sequence[Sequence[int]] | None],
    targets: Sequence[Sequence[Sequence[int]]],
    threshold: float = IOU_THRESHOLD,
) -> dict:
    """mIoU and accuracy at IoU >= ``threshold`` of grounding answers.

    Args:
        answers: model outputs as text (e.g. ``"Yes. [12,30,40,66]."``, parsed leniently by
            ``cxrlib.data.boxes.parse_boxes``) or as already parsed box lists; None = no answer.
        targets: the true boxes (0-100) of each item, at least one per item.
        threshold: IoU that counts as a hit (the card: 0.5).

    Returns:
        ``{"mIoU", "accuracy": float, "n", "no_box": int (answers without any well-formed box,
        scored IoU 0), "ious": list[float]}``.
    """
    if len(answers) != len(targets):
        raise ValueError(f"{len(answers)} answers but {len(targets)} targets")
    if not answers:
        raise ValueError("no grounding answers to score")
    ious, no_box = [], 0
    for answer, target in zip(answers, targets):
        if isinstance(answer, str):
            boxes = parse_boxes(answer, strict=False)
        else:
            boxes = [list(b) for b in answer or []]
        no_box += not boxes
        ious.append(boxes_iou(boxes, target))
    ious_arr = np.array(ious)
    return {
        "mIoU": float(ious_arr.mean()),
        "accuracy": float((ious_arr >= threshold).mean()),
        "n": len(ious),
        "no_box": int(no_box),
        "ious": ious,
    }


# --- VQA ----------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Lowercase, squeeze spaces, strip surrounding spaces and a final period."""
    if not isinstance(text, str):
        return ""
    return " ".join(text.lower().split()).rstrip(".").strip()


def vqa_accuracy(
    predictions: Sequence[str],
    answers: Sequence[str],
    question_types: Sequence[str] | None = None,
    answer_types: Sequence[str] | None = None,
) -> dict:
    """Exact-match accuracy of VQA answers, overall and by question / answer type.

    Args:
        predictions: model answers.
        answers: true answers.
        question_types: e.g. ``presence``, ``location``, ``severity``, ``view``, ``difference``
            (``meta["question_type"]`` of the conversations).
        answer_types: ``closed`` (yes/no) or ``open`` (``meta["answer_type"]``).

    Returns:
        ``{"accuracy", "n", "by_question_type": {type: {"accuracy", "n"}},
        "by_answer_type": {...}}`` (the groupings only when the types are given).
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers")
    if not answers:
        raise ValueError("no VQA answers to score")
    correct = np.array(
        [normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers)]
    )
    out: dict = {"accuracy": float(correct.mean()), "n": len(correct)}
    for key, types in (("by_question_type", question_types), ("by_answer_type", answer_types)):
        if types is None:
            continue
        if len(types) != len(correct):
            raise ValueError(f"{key}: {len(types)} types for {len(correct)} answers")
        groups: dict[str, list[bool]] = {}
        for t, c in zip(types, correct):
            groups.setdefault(str(t), []).append(bool(c))
        out[key] = {
            t: {"accuracy": float(np.mean(v)), "n": len(v)} for t, v in sorted(groups.items())
        }
    return out
