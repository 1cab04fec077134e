"""Evaluation of inference outputs: report tables, grounding, VQA, baselines, labeler agreement.

Works on the plain records ``cxrlib.inference`` writes, so it runs (and is tested) without a
model:

* report records (``generate_reports``): ``study_id``, ``mode``, ``cot``, ``views``,
  ``reference``, ``report``, ``findings`` (parsed CoT turn 1 or None) ...;
* conversation records (``run_conversations``): ``task``, ``meta``, ``references``,
  ``predictions``.

    >>> labeler = get_labeler("auto")
    >>> result = report_metrics(records, labeler, views="frontal")
    >>> result["clinical"]["mF1-14"], result["labeler"]

Per the card, single-image records are scored per image (all views, or frontal only); multi-image
and multi-study records are scored once per frontal image of the study (their turn-2 report).
The two baselines make the numbers readable: an image-blind "most common report" and the report
of the nearest training image by encoder features. Every report table also carries the count of
degenerate outputs (empty, no words, box strings, prompt copies; ``cxrlib.metrics.degenerate_outputs``)
and flags a setting whose outputs are mostly such: the labeler reads them as "No Finding", which
scores on a mostly normal test set. Introduced in notebook 06.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import classification_report

from cxrlib import metrics
from cxrlib.answers import parse_findings, parse_grounding, parse_multi_finding
from cxrlib.constants import CHEXPERT_LABELS, COT_FINDINGS, FRONTAL_VIEWS, LABEL_OF, POSITIVE
from cxrlib.data.conversations import (
    NON_ABNORMAL,
    NOT_FOUND,
    finding_boxes,
    finding_name,
    organ_boxes,
    positive_findings,
    report_user_turns,
)
from cxrlib.inference import Chat, run_chats
from cxrlib.labeler import RuleBasedLabeler, get_labeler

BOX_TASKS = ("finding_grounding", "organ_grounding", "phrase_grounding", "abnormality_detection")
NAMING_TASKS = ("grounded_finding", "grounded_organ", "grounded_phrase", "single_disease")
VQA_TASKS = ("vqa", "difference_vqa")
VIEWS = ("all", "frontal")


# --- does the phase-2 model read the image? (notebook 04) ---------------------------------------


def findings_labels(findings: Sequence[str] | None) -> dict[str, int]:
    """A CoT turn-1 answer (parsed list of findings) as the 14 CheXpert labels.

    ``No Finding`` is 1 exactly when nothing is named; a malformed answer (None) names nothing.
    """
    named = {LABEL_OF[f] for f in (findings or [])}
    labels = {name: int(name in named) for name in CHEXPERT_LABELS}
    labels["No Finding"] = int(not named)
    return labels


def findings_answer_check(
    backend,
    studies: Sequence[dict],
    images: np.ndarray,
    train_studies: Sequence[dict],
    max_studies: int | None = None,
    max_new_tokens: int = 48,
    candidates: int = 20,
) -> dict:
    """Does the model read the image? Its CoT turn-1 answer vs the best image-blind answers.

    One frontal image per held-out study is asked the card's turn-1 question; the answer is
    parsed (``cxrlib.answers.parse_findings``, lenient) and scored as 14 CheXpert labels against
    the study's own labels (macro F1 over the 14, ``cxrlib.metrics.clinical_f1``). Image-blind
    answers give every study the same reply: the most common label set of the training split
    (the issue's baseline) and, stricter, the best of the ``candidates`` most common sets and
    "all 13 findings" chosen on these very studies (an oracle choice, so an upper bound for
    any constant answer we tried).

    Args:
        backend: ``cxrlib.inference.LocalBackend`` around the trained model.
        studies: held-out study records (e.g. the val split).
        images: the ``images.npy`` array.
        train_studies: the training split (for the most common label set).
        max_studies: score at most this many studies (the first ones), None = all.
        max_new_tokens: generation budget of the turn-1 answer (13 findings fit in ~40 tokens).

    It also reports the project's one **turn-1 findings F1** (``cot_findings_metrics``: macro F1
    over the 13 findings of the CoT question, strict parser, frontal images), the measure notebook
    06 reports on the test split, with the best constant answer in that measure.

    Returns:
        ``{"n", "turn1_findings_f1", "turn1_per_finding", "turn1_best_constant_f1",
        "turn1_best_constant_answer", "turn1_malformed_strict",
        "model_mF1_14", "model_uF1_14", "malformed", "most_common_answer",
        "most_common_mF1_14", "best_constant_answer", "best_constant_mF1_14", "per_label",
        "examples"}``.
    """
    chosen = []
    for s in studies:
        frontal = [im for im in s["images"] if im["view"] in FRONTAL_VIEWS]
        if frontal:
            chosen.append((s, frontal[0]["index"]))
    chosen = chosen[:max_studies] if max_studies else chosen
    if not chosen:
        raise ValueError("no held-out study with a frontal image to ask")
    question = report_user_turns("single", 1, cot=True)[0]
    chats = [
        Chat([question], [np.asarray(images[i])], {"study_id": s["study_id"]}) for s, i in chosen
    ]
    answers = [a[0] for a in run_chats(backend, chats, max_new_tokens, desc="turn-1 answers")]
    parsed = [parse_findings(a, strict=False) for a in answers]
    # the project's one "turn-1 findings F1" (notebooks 04 and 06): strict parser, 13 findings
    strict = [
        {"cot": True, "study_id": s["study_id"], "findings": parse_findings(a, strict=True)}
        for (s, _), a in zip(chosen, answers)
    ]
    study_labels = {s["study_id"]: s["labels"] for s, _ in chosen}
    turn1 = cot_findings_metrics(strict, study_labels)
    reference = [s["labels"] for s, _ in chosen]
    model = metrics.clinical_f1(reference, [findings_labels(p) for p in parsed])

    def text(findings) -> str:
        return ", ".join(findings) + "." if findings else NOT_FOUND

    sets = Counter(tuple(positive_findings(s["labels"])) for s in train_studies)
    most_common = list(sets.most_common(1)[0][0])
    options = [list(f) for f, _ in sets.most_common(candidates)] + [list(COT_FINDINGS)]
    scored = [
        (metrics.clinical_f1(reference, [findings_labels(o)] * len(chosen))["mF1-14"], o)
        for o in options
    ]
    best_score, best = max(scored, key=lambda x: x[0])
    turn1_constant = max(
        (cot_findings_metrics([{**r, "findings": o} for r in strict], study_labels)["macro_f1"], o)
        for o in options
    )
    return {
        "n": len(chosen),
        "turn1_findings_f1": turn1["macro_f1"],
        "turn1_per_finding": turn1["per_finding"],
        "turn1_best_constant_f1": turn1_constant[0],
        "turn1_best_constant_answer": text(turn1_constant[1]),
        "turn1_malformed_strict": turn1["malformed"],
        "model_mF1_14": model["mF1-14"],
        "model_uF1_14": model["uF1-14"],
        "malformed": sum(p is None for p in parsed),
        "most_common_answer": text(most_common),
        "most_common_mF1_14": metrics.clinical_f1(
            reference, [findings_labels(most_common)] * len(chosen)
        )["mF1-14"],
        "best_constant_answer": text(best),
        "best_constant_mF1_14": best_score,
        "per_label": model["per_label"],
        "examples": [
            {
                "study_id": s["study_id"],
                "answer": a,
                "reference": text(positive_findings(s["labels"])),
            }
            for (s, _), a in list(zip(chosen, answers))[:8]
        ],
    }


# --- inputs and outputs -------------------------------------------------------------------------


def held_out_studies(studies: Sequence[dict], max_studies: int | None = None) -> list[dict]:
    """The test split's studies, or an even mix of its sources when ``max_studies`` caps it.

    A plain ``[:max_studies]`` could keep only IU studies and leave the multi-study (longitudinal)
    mode with nothing to do, so the cap alternates between sources in file order.

    Args:
        studies: study records (``load_datasets(...).studies``).
        max_studies: the preset's ``eval.max_test_studies`` (None = all).
    """
    test = [s for s in studies if s["split"] == "test"]
    if not test:
        raise ValueError("no studies in the test split: rebuild the data (notebook 01-data-prep)")
    if max_studies is None or max_studies >= len(test):
        return test
    by_source: dict[str, list[dict]] = {}
    for s in test:
        by_source.setdefault(s.get("source", ""), []).append(s)
    picked, queues = [], [list(v) for v in by_source.values()]
    while len(picked) < max_studies:
        for q in queues:
            if q and len(picked) < max_studies:
                picked.append(q.pop(0))
    order = {s["study_id"]: i for i, s in enumerate(test)}
    return sorted(picked, key=lambda s: order[s["study_id"]])


def save_records(records: Sequence[dict], path: str | Path) -> Path:
    """Write records (report or conversation records) as JSON lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec, default=_builtin) + "\n")
    return path


def load_records(path: str | Path) -> list[dict]:
    """Read records written by ``save_records``."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _builtin(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a record")


# --- labeling -----------------------------------------------------------------------------------


def label_texts(texts: Sequence[str], labeler=None) -> pd.DataFrame:
    """Label reports, each distinct text once (references repeat across images and modes).

    Args:
        texts: reports.
        labeler: from ``cxrlib.labeler.get_labeler``; default the rule-based labeler.

    Returns:
        DataFrame with the 14 ``CHEXPERT_LABELS`` columns, one row per text, in order.
    """
    labeler = labeler or RuleBasedLabeler()
    texts = ["" if t is None else str(t) for t in texts]
    unique = list(dict.fromkeys(texts))
    table = labeler(unique).reset_index(drop=True)
    row_of = {t: i for i, t in enumerate(unique)}
    return table.iloc[[row_of[t] for t in texts]].reset_index(drop=True)


# --- report generation --------------------------------------------------------------------------


def scoring_rows(records: Sequence[dict], views: str = "all") -> list[dict]:
    """The records to score, one per image, following the card's protocol.

    Args:
        records: report records of ONE mode.
        views: ``"all"`` or ``"frontal"`` (PA/AP). Single-image records are kept or dropped by
            their view; a multi-image / multi-study record is repeated once per frontal image of
            its study (per image of any view when ``views="all"``).

    Returns:
        The records, repeated or filtered (the same dict objects).
    """
    if views not in VIEWS:
        raise ValueError(f"views must be one of {VIEWS}, got {views!r}")
    rows = []
    for rec in records:
        rec_views = rec.get("views") or [rec.get("view")]
        if rec.get("mode", "single") == "single":
            if views == "all" or rec_views[0] in FRONTAL_VIEWS:
                rows.append(rec)
        else:
            keep = rec_views if views == "all" else [v for v in rec_views if v in FRONTAL_VIEWS]
            rows += [rec] * len(keep)
    return rows


def report_metrics(
    records: Sequence[dict],
    labeler=None,
    views: str = "all",
    bootstrap_samples: int = 1000,
    seed: int = 0,
    meteor: str = "auto",
    language: bool = True,
    radgraph=None,
) -> dict:
    """Clinical accuracy and language metrics of generated reports.

    Args:
        records: report records (``reference`` and ``report`` keys) of one mode.
        labeler: the labeler for both sides; default ``get_labeler("auto")``.
        views: ``"all"`` or ``"frontal"`` (see ``scoring_rows``).
        bootstrap_samples: resamples for the 95% CIs (0 = no CIs).
        seed: bootstrap seed.
        meteor: METEOR backend (``cxrlib.metrics.meteor_backend``).
        language: also compute BLEU/METEOR/ROUGE-L/CIDEr.
        radgraph: a ``cxrlib.radgraph_f1.RadGraphScorer`` (``radgraph_scorer()``) to add RadGraph
            F1 (``simple``, ``partial`` = the paper's, ``complete``); None = left out.

    Returns:
        ``{"n", "views", "labeler", "clinical": {...}, "clinical_ci": {...},
        "clinical_uncertain_as_positive": {...}, "language": {...}, "degenerate": {...}}``;
        ``degenerate`` counts the outputs that are not reports (``metrics.degenerate_outputs``),
        with a warning when they are most of them.
    """
    rows = scoring_rows(records, views)
    if not rows:
        raise ValueError(f"no records to score with views={views!r} (no frontal images?)")
    missing = [k for k in ("reference", "report") if k not in rows[0]]
    if missing:
        raise ValueError(f"report records need the keys {missing}; use cxrlib.inference output")
    labeler = labeler or get_labeler("auto")
    refs = [r["reference"] or "" for r in rows]
    hyps = [r["report"] or "" for r in rows]
    ref_labels, hyp_labels = label_texts(refs, labeler), label_texts(hyps, labeler)
    degenerate = metrics.degenerate_outputs([r["report"] for r in rows])
    if degenerate["mostly_degenerate"]:
        warnings.warn(
            f"{degenerate['degenerate']} of {degenerate['n']} outputs are not reports "
            f"({_kinds(degenerate)}); the labeler reads them as 'No Finding', so this table's "
            "clinical F1 does not measure report quality",
            stacklevel=2,
        )
    out = {
        "n": len(rows),
        "views": views,
        "labeler": labeler.name,
        "degenerate": degenerate,
        "clinical": metrics.clinical_f1(ref_labels, hyp_labels),
        "clinical_uncertain_as_positive": metrics.clinical_f1(
            ref_labels, hyp_labels, uncertain_as_positive=True
        ),
    }
    if bootstrap_samples:
        out["clinical_ci"] = metrics.clinical_f1_ci(
            ref_labels, hyp_labels, samples=bootstrap_samples, seed=seed
        )
    if language:
        out["language"] = metrics.language_metrics(refs, hyps, meteor=meteor)
    if radgraph is not None:
        scores = radgraph.score(hyps, refs)
        out["radgraph"] = {k: v for k, v in scores.items() if k != "per_pair_partial"}
    return out


def cot_findings_metrics(records: Sequence[dict], study_labels: dict[str, dict]) -> dict:
    """How well the CoT first turn names the 13 findings, against the studies' own labels.

    Args:
        records: CoT report records with ``findings`` (the parsed turn-1 list, None if malformed)
            and ``study_id``.
        study_labels: ``{study_id: {label: 1|0|-1|None}}`` (``labels`` of studies.jsonl).

    Returns:
        ``{"n", "malformed", "macro_f1", "micro_f1", "per_finding": {finding: F1}}``; a
        malformed answer counts as naming nothing.
    """
    rows = [r for r in records if r.get("cot")]
    if not rows:
        raise ValueError("no CoT records (cot=True) to score")
    y_true = np.array(
        [
            [study_labels[r["study_id"]].get(LABEL_OF[f]) == POSITIVE for f in COT_FINDINGS]
            for r in rows
        ]
    )
    y_pred = np.array([[f in (r.get("findings") or []) for f in COT_FINDINGS] for r in rows])
    tp = (y_true & y_pred).sum(0)
    fp = (~y_true & y_pred).sum(0)
    fn = (y_true & ~y_pred).sum(0)
    per = metrics.f1_from_counts(tp, fp, fn)
    return {
        "n": len(rows),
        "malformed": sum(r.get("findings") is None for r in rows),
        "macro_f1": float(per.mean()),
        "micro_f1": float(metrics.f1_from_counts(tp.sum(), fp.sum(), fn.sum())),
        "per_finding": dict(zip(COT_FINDINGS, per.tolist())),
    }


def agreement_counts(turn1: Sequence[Sequence[str]], reports: Sequence[str], labeler=None) -> dict:
    """Counts behind ``turn_agreement``: findings named in turn 1 (``turn1_named``), of them
    positive in the report (``turn1_in_report``), the report's positives among the 13 CoT
    findings (``report_positive``) and, of them, named in turn 1 (``report_in_turn1``)."""
    table = label_texts(reports, labeler).fillna(0)  # NA: not mentioned
    counts = dict.fromkeys(
        ("turn1_named", "turn1_in_report", "report_positive", "report_in_turn1"), 0
    )
    for said, (_, labels) in zip(turn1, table.iterrows()):
        said = set(said)
        found = {f for f in COT_FINDINGS if labels[LABEL_OF[f]] == POSITIVE}
        counts["turn1_named"] += len(said)
        counts["turn1_in_report"] += len(said & found)
        counts["report_positive"] += len(found)
        counts["report_in_turn1"] += len(found & said)
    return counts


def turn_agreement(records: Sequence[dict], labeler=None) -> dict:
    """Does the CoT report follow its own turn 1? Over CoT records (``findings`` = the parsed
    turn-1 answer): ``turn1_in_report``, the share of turn-1 findings that the labeler finds
    positive in the turn-2 report, and ``report_in_turn1``, the share of the report's positive
    findings (the 13 CoT findings) that turn 1 named (None where nothing was named)."""
    rows = [r for r in records if r.get("findings") is not None]
    c = agreement_counts([r["findings"] for r in rows], [r["report"] for r in rows], labeler)
    named, positive = c["turn1_named"], c["report_positive"]
    return {
        "n": len(rows),
        "turn1_named": named,
        "turn1_in_report": c["turn1_in_report"] / named if named else None,
        "report_positive": positive,
        "report_in_turn1": c["report_in_turn1"] / positive if positive else None,
    }


def findings_jaccard(record: dict, study_labels: dict[str, dict]) -> float | None:
    """Overlap of a CoT turn-1 answer with the study's positive findings (1 = exact; None if
    the answer was malformed). Used to pick good and bad examples."""
    if record.get("findings") is None:
        return None
    labels = study_labels[record["study_id"]]
    true = {f for f in COT_FINDINGS if labels.get(LABEL_OF[f]) == POSITIVE}
    pred = set(record["findings"])
    return 1.0 if not true | pred else len(true & pred) / len(true | pred)


def _kinds(degenerate: dict) -> str:
    return ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in degenerate["counts"].items() if n)


def summary_row(name: str, result: dict) -> dict:
    """One table row (values x100) from a ``report_metrics`` result; ``degenerate %`` is the
    share of outputs that are not reports, ``flag`` says when they are most of them."""
    row = {"setting": name, "n": result["n"]}
    if "degenerate" in result:
        row["degenerate %"] = 100 * result["degenerate"]["fraction"]
        row["flag"] = "MOSTLY DEGENERATE" if result["degenerate"]["mostly_degenerate"] else ""
    row.update({k: 100 * result["clinical"][k] for k in metrics.CLINICAL_KEYS})
    row.update(
        {f"{k} (unc+)": 100 * result["clinical_uncertain_as_positive"][k] for k in ("mF1-14",)}
    )
    for key in metrics.LANGUAGE_KEYS:
        value = result.get("language", {}).get(key)
        row[key] = None if value is None else 100 * value
    if "radgraph" in result:  # only when the radgraph package and its weights were there
        row["RadGraph F1"] = 100 * result["radgraph"]["partial"]
    return row


def degenerate_table(results: dict[str, dict]) -> pd.DataFrame:
    """Degenerate outputs per setting (counts by kind), to print next to a clinical table."""
    rows = []
    for name, r in results.items():
        d = r["degenerate"]
        rows.append(
            {
                "setting": name,
                "n": d["n"],
                **{k.replace("_", " "): d["counts"][k] for k in metrics.DEGENERATE_KINDS},
                "degenerate %": 100 * d["fraction"],
                "flag": "MOSTLY DEGENERATE" if d["mostly_degenerate"] else "",
            }
        )
    return pd.DataFrame(rows).set_index("setting")


def degenerate_note(results: dict[str, dict]) -> str:
    """A Markdown line naming the settings whose outputs are mostly degenerate ("" if none)."""
    flagged = [
        f"{name} ({r['degenerate']['degenerate']} of {r['degenerate']['n']}: "
        f"{_kinds(r['degenerate'])})"
        for name, r in results.items()
        if r["degenerate"]["mostly_degenerate"]
    ]
    if not flagged:
        return ""
    return (
        "**Mostly degenerate outputs** (empty, no words, box strings or prompt copies, which the "
        "labeler reads as 'No Finding'): the clinical F1 of these rows does not measure report "
        "quality: " + "; ".join(flagged) + "."
    )


def per_label_table(results: dict[str, dict]) -> pd.DataFrame:
    """Per-label F1 (x100) of several ``report_metrics`` results, one column per setting."""
    return pd.DataFrame(
        {
            name: {k: 100 * v for k, v in r["clinical"]["per_label"].items()}
            for name, r in results.items()
        }
    ).loc[CHEXPERT_LABELS]


# --- grounding, naming, VQA ---------------------------------------------------------------------


# the turn-1 findings F1 (notebooks 04-06) reads the model's answer list, not a report
ANSWER_SCORER = "cxrlib.answers.parse_findings (the turn-1 findings list) vs the study's labels"


def scorer_notes(labeler=None, radgraph=None, radgraph_note: str | None = None) -> dict:
    """What scored a metrics file's clinical numbers, with versions (one entry per measure).

    Args:
        labeler: the report labeler of the clinical F1 (``get_labeler``); None when the file's F1
            compares answer lists only (notebooks 04 and 05).
        radgraph: a ``cxrlib.radgraph_f1.RadGraphScorer`` when RadGraph F1 was computed.
        radgraph_note: why it was not (``radgraph_scorer``'s note).

    Returns:
        ``{"turn1_findings_f1": ..., "clinical_f1": {"scorer", "version"}, "radgraph_f1": ...}``.
    """
    from cxrlib import __version__

    out: dict = {"turn1_findings_f1": f"{ANSWER_SCORER}, cxrlib {__version__}"}
    if labeler is not None:
        out["clinical_f1"] = {"scorer": labeler.name, "version": labeler.version}
    if radgraph is not None:
        out["radgraph_f1"] = {"scorer": radgraph.name}
    elif labeler is not None:
        out["radgraph_f1"] = {"note": radgraph_note or "RadGraph F1 not computed"}
    return out


# The two box tasks that can be asked without a box (about absent findings); every other box
# task is built only from boxes, so a source without them makes none of its questions.
ASKED_WITHOUT_BOXES = ("finding_grounding", "multi_finding_grounding")


def drop_unboxed_tasks(
    conversations: Sequence[dict], studies: Sequence[dict]
) -> tuple[list[dict], dict[str, str]]:
    """Leave out the finding-box tasks when no image of ``studies`` has a finding box, with why.

    A source without boxes (MIMIC-CXR-JPG alone: reports and labels only) still makes
    ``finding_grounding`` questions about absent findings ("Not present.") and
    ``multi_finding_grounding`` ones whose answer is always "Not found."; scoring those would
    reward a model that never points. A source with boxes keeps all its questions, the ones
    whose finding happens to be absent included (the phantom path is unchanged).

    Returns:
        ``(kept conversations, {task: reason})``.
    """
    from cxrlib.data.conversations import has_finding_box

    if any(has_finding_box(s) for s in studies):
        return list(conversations), {}
    asked = Counter(c["task"] for c in conversations if c["task"] in ASKED_WITHOUT_BOXES)
    skipped = {
        task: f"skipped: no test image has a finding box, so none of its {n} questions could "
        "name a place (the source gives no boxes; e.g. add MS-CXR or VinDr-CXR, "
        "docs/datasets.md)"
        for task, n in asked.items()
    }
    return [c for c in conversations if c["task"] not in skipped], skipped


def _boxes_of(answer: str | None) -> list[list[int]] | None:
    return parse_grounding(answer)


def _grounding_items(records: Sequence[dict], boxes_of, finding_boxes_of) -> dict[str, list]:
    """``{task: [(predicted boxes or None, target boxes), ...]}`` of every scored grounding item:
    ``BOX_TASKS`` records with target boxes, and each boxed finding of ``multi_finding_grounding``.
    ``boxes_of(rec)`` gives a record's boxes; ``finding_boxes_of(rec)`` a multi-finding record's
    ``{finding: boxes}`` (None = malformed answer, a finding left out = said absent)."""
    items: dict[str, list[tuple[list | None, list]]] = {}
    for rec in records:
        task, meta = rec["task"], rec.get("meta", {})
        if task in BOX_TASKS and meta.get("boxes"):
            items.setdefault(task, []).append((boxes_of(rec), meta["boxes"]))
        elif task == "multi_finding_grounding" and meta.get("boxes"):
            parsed = finding_boxes_of(rec)
            for name, target in meta["boxes"].items():
                boxes = None if parsed is None else parsed.get(name, [])
                items.setdefault(task, []).append((boxes, target))
    if not items:
        raise ValueError("no grounding items with target boxes among the records")
    return items


def grounding_metrics(records: Sequence[dict], threshold: float = metrics.IOU_THRESHOLD) -> dict:
    """mIoU and accuracy at IoU >= 0.5 of box answers, per task and overall.

    Args:
        records: conversation records (``run_conversations``); items of ``BOX_TASKS`` whose
            ``meta["boxes"]`` is non-empty are scored, plus each boxed finding of
            ``multi_finding_grounding``.
        threshold: IoU counted as a hit.

    Returns:
        ``{task: {"mIoU", "accuracy", "n", "malformed", "said_absent", "ious"}, "overall": ...}``;
        ``malformed`` = no box could be read and the answer is not a "not present"; both score 0.
    """

    def model_boxes(rec: dict) -> list | None:
        return _boxes_of(rec["predictions"][0] if rec.get("predictions") else None)

    def model_finding_boxes(rec: dict) -> dict | None:
        return parse_multi_finding(rec["predictions"][0] if rec.get("predictions") else None)

    items = _grounding_items(records, model_boxes, model_finding_boxes)
    out = {}
    for task, pairs in list(items.items()) + [("overall", [p for v in items.values() for p in v])]:
        scores = metrics.grounding_scores(
            [p or [] for p, _ in pairs], [t for _, t in pairs], threshold
        )
        scores["malformed"] = sum(p is None for p, _ in pairs)
        scores["said_absent"] = sum(p == [] for p, _ in pairs)
        del scores["no_box"]
        out[task] = scores
    return out


def mean_training_boxes(train_studies: Sequence[dict]) -> dict[str, list[int]]:
    """The mean 0-100 box of every organ, every finding and of "abnormal" (all abnormal-finding
    boxes) over the frontal images of ``train_studies``: the constant-box baseline's answers."""
    sums: dict[str, list[np.ndarray]] = {}
    for study in train_studies:
        for image in study.get("images", []):
            if image["view"] not in FRONTAL_VIEWS:
                continue
            for organ, box in organ_boxes(image).items():
                sums.setdefault(f"organ:{organ}", []).append(np.asarray(box, float))
            for obs, boxes in finding_boxes(image).items():
                for box in boxes:
                    sums.setdefault(f"finding:{finding_name(obs)}", []).append(
                        np.asarray(box, float)
                    )
                    if obs not in NON_ABNORMAL:
                        sums.setdefault("abnormal", []).append(np.asarray(box, float))
    return {k: np.rint(np.mean(v, axis=0)).astype(int).tolist() for k, v in sums.items()}


def _constant_key(task: str, meta: dict) -> str:
    if task == "organ_grounding":
        return f"organ:{meta['organ']}"
    if task == "abnormality_detection":
        return "abnormal"
    return f"finding:{meta['finding']}"  # finding and phrase grounding name their finding


def constant_box_metrics(
    records: Sequence[dict],
    train_studies: Sequence[dict],
    threshold: float = metrics.IOU_THRESHOLD,
) -> dict:
    """``grounding_metrics`` of an image-blind answer: every question answered with the mean
    training box of its organ / finding (``mean_training_boxes``). Organs barely move between
    patients, so this baseline is high for organ grounding; a model must beat it to show that
    it reads the box off the image. Items whose key has no training box score IoU 0."""
    boxes = mean_training_boxes(train_studies)

    def constant(key: str) -> list:
        return [boxes[key]] if key in boxes else []

    def finding_constants(rec: dict) -> dict:
        return {name: constant(f"finding:{name}") for name in rec["meta"]["boxes"]}

    items = _grounding_items(
        records, lambda rec: constant(_constant_key(rec["task"], rec["meta"])), finding_constants
    )
    out = {}
    for task, pairs in list(items.items()) + [("overall", [p for v in items.values() for p in v])]:
        scores = metrics.grounding_scores([p for p, _ in pairs], [t for _, t in pairs], threshold)
        del scores["no_box"]
        out[task] = scores
    return out


def vqa_metrics(records: Sequence[dict]) -> dict:
    """Exact-match accuracy of VQA answers by question type, and of box->name / yes-no tasks.

    Returns:
        ``{"vqa": {...} (cxrlib.metrics.vqa_accuracy over vqa + difference_vqa),
        "naming": {task: {"accuracy", "n"}}}``; either key is absent without such records.
    """
    out: dict = {}
    vqa = [r for r in records if r["task"] in VQA_TASKS]
    if vqa:
        out["vqa"] = metrics.vqa_accuracy(
            [(r.get("predictions") or [""])[0] for r in vqa],
            [r["references"][0] for r in vqa],
            [r["meta"].get("question_type", r["task"]) for r in vqa],
            [r["meta"].get("answer_type", "unknown") for r in vqa],
        )
        out["vqa"]["by_task"] = {
            t: metrics.vqa_accuracy(
                [(r.get("predictions") or [""])[0] for r in vqa if r["task"] == t],
                [r["references"][0] for r in vqa if r["task"] == t],
            )
            for t in VQA_TASKS
            if any(r["task"] == t for r in vqa)
        }
    naming = {}
    for task in NAMING_TASKS:
        rows = [r for r in records if r["task"] == task]
        if rows:
            naming[task] = metrics.vqa_accuracy(
                [(r.get("predictions") or [""])[0] for r in rows],
                [r["references"][0] for r in rows],
            )
    if naming:
        out["naming"] = naming
    return out


# --- instruction following (notebook 08) --------------------------------------------------------

CLOSED_NAMING = ("grounded_finding", "grounded_organ", "single_disease")  # answers from a list


def answer_vocabulary(train_conversations: Sequence[dict]) -> dict[str, set[str]]:
    """The normalised training answers of each VQA question type and each closed naming task:
    what ``instruction_following`` accepts as an answer in the asked format."""
    vocab: dict[str, set[str]] = {}
    for conv in train_conversations:
        if conv["task"] in VQA_TASKS:
            key = conv["meta"].get("question_type", conv["task"])
        elif conv["task"] in CLOSED_NAMING:
            key = conv["task"]
        else:
            continue
        vocab.setdefault(key, set()).add(metrics.normalize_answer(conv["turns"][0]["assistant"]))
    return vocab


def _format_checks(record: dict, vocabulary: dict[str, set[str]]) -> list[tuple[str, bool]]:
    """(what was asked, answered in its format) for one report or conversation record."""
    if "report" in record:  # a report record of generate_reports
        checks = [("report", metrics.degenerate_kind(record["report"]) is None)]
        if record.get("cot"):
            checks.insert(0, ("CoT turn 1", record.get("findings") is not None))
        return checks
    task = record["task"]
    answer = (record.get("predictions") or [None])[0]
    if task in BOX_TASKS:
        boxes = parse_grounding(answer)
        ok = boxes is not None and (bool(boxes) or task == "finding_grounding")
    elif task == "multi_finding_grounding":
        ok = parse_multi_finding(answer) is not None
    elif task == "grounded_phrase":
        ok = metrics.degenerate_kind(answer) is None
    else:
        key = record["meta"].get("question_type", task) if task in VQA_TASKS else task
        ok = metrics.normalize_answer(answer) in vocabulary.get(key, set())
    return [(task, ok)]


def instruction_following(records: Sequence[dict], vocabulary: dict[str, set[str]]) -> dict:
    """The share of answers given in the format the question asked for.

    A report must be report text (``metrics.degenerate_kind``), a CoT turn 1 a list the strict
    parser reads, a box answer a box (or "Not present." where the question allows it), a
    multi-finding answer readable, a VQA or closed naming answer one of the answers the training
    set gives to that question type (``answer_vocabulary``), a phrase words rather than boxes.

    Returns:
        ``{"share", "n", "by_task": {asked: share}, "items": [1 / 0 per answer]}``.
    """
    pairs = [c for r in records for c in _format_checks(r, vocabulary)]
    if not pairs:
        raise ValueError("no records to check for instruction following")
    by_task: dict[str, list[bool]] = {}
    for task, ok in pairs:
        by_task.setdefault(task, []).append(ok)
    items = [int(ok) for _, ok in pairs]
    return {
        "share": float(np.mean(items)),
        "n": len(items),
        "by_task": {t: float(np.mean(v)) for t, v in by_task.items()},
        "items": items,
    }


def exact_match(record: dict) -> int:
    """1 when a conversation record's first answer equals its reference (normalised), else 0."""
    answer = (record.get("predictions") or [""])[0]
    return int(
        metrics.normalize_answer(answer) == metrics.normalize_answer(record["references"][0])
    )


# --- lateral vs frontal (notebook 08, open question 2) ---------------------------------------------


def view_f1_by_finding(
    single: Sequence[dict],
    multi_image: Sequence[dict],
    labeler=None,
    samples: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Per-finding report F1 from a frontal image, from a lateral image and from both, over the
    studies that have both views, with 95% intervals and the frontal - lateral difference.

    Args:
        single: single-image report records (every view, ``generate_reports(mode="single")``).
        multi_image: multi-image records of the same studies (the "both" column).
        labeler: labels reference and generated reports alike.
        samples: bootstrap resamples; studies are resampled, so the difference is paired.

    Returns:
        One row per CheXpert label (and ``macro``): ``frontal``, ``lateral``, ``both``,
        ``frontal - lateral`` with ``... low`` / ``... high`` interval columns, ``positives``
        (studies whose reference names the finding), ``n`` (studies).
    """
    frontal = {r["study_id"]: r for r in single if r["views"][0] in FRONTAL_VIEWS}
    lateral = {r["study_id"]: r for r in single if r["views"][0] not in FRONTAL_VIEWS}
    both = {r["study_id"]: r for r in multi_image}
    studies = sorted(set(frontal) & set(lateral) & set(both))
    if not studies:
        raise ValueError(
            "no study has a frontal and a lateral single-image record and a multi-image one"
        )
    ref = metrics.binarize(label_texts([frontal[s]["reference"] or "" for s in studies], labeler))
    hyp = {
        name: metrics.binarize(label_texts([recs[s]["report"] or "" for s in studies], labeler))
        for name, recs in (("frontal", frontal), ("lateral", lateral), ("both", both))
    }

    def per_label(idx: np.ndarray) -> dict[str, float]:
        out = {}
        for name, pred in hyp.items():
            f1 = metrics.f1_from_counts(*metrics.label_counts(ref[idx], pred[idx]))
            out.update({f"{name}|{lab}": float(v) for lab, v in zip(CHEXPERT_LABELS, f1)})
            out[f"{name}|macro"] = float(f1.mean())
        for lab in [*CHEXPERT_LABELS, "macro"]:
            out[f"frontal - lateral|{lab}"] = out[f"frontal|{lab}"] - out[f"lateral|{lab}"]
        return out

    point = per_label(np.arange(len(studies)))
    ci = metrics.bootstrap_ci(per_label, len(studies), samples, seed) if samples else {}
    rows = {}
    for lab in [*CHEXPERT_LABELS, "macro"]:
        row = {}
        for name in ("frontal", "lateral", "both", "frontal - lateral"):
            key = f"{name}|{lab}"
            row[name] = point[key]
            if key in ci:
                row[f"{name} low"], row[f"{name} high"] = ci[key]
        if lab != "macro":
            row["positives"] = int(ref[:, CHEXPERT_LABELS.index(lab)].sum())
        rows[lab] = row
    frame = pd.DataFrame(rows).T
    frame["n"] = len(studies)
    return frame


# --- baselines ----------------------------------------------------------------------------------


def most_common_answers(train_conversations: Sequence[dict]) -> dict[str, str]:
    """The most frequent answer per VQA question type among training conversations (built with
    ``cxrlib.data.conversations.build_conversation``): the constant-answer baseline."""
    by_type: dict[str, Counter] = {}
    for conv in train_conversations:
        if conv["task"] in VQA_TASKS:
            qtype = conv["meta"].get("question_type", conv["task"])
            by_type.setdefault(qtype, Counter())[conv["turns"][0]["assistant"]] += 1
    return {q: c.most_common(1)[0][0] for q, c in by_type.items()}


def constant_vqa_metrics(records: Sequence[dict], answers: dict[str, str]) -> dict:
    """``vqa_metrics``'s exact match when every question is answered with its type's most
    common training answer (``most_common_answers``); a type unseen in training scores 0."""
    vqa = [r for r in records if r["task"] in VQA_TASKS]
    if not vqa:
        raise ValueError("no VQA records to score")
    types = [r["meta"].get("question_type", r["task"]) for r in vqa]
    return metrics.vqa_accuracy(
        [answers.get(t, "") for t in types],
        [r["references"][0] for r in vqa],
        types,
        [r["meta"].get("answer_type", "unknown") for r in vqa],
    )


def most_common_report(train_reports: Sequence[str], labeler=None) -> str:
    """The image-blind baseline: one report for every test image.

    The training reports' positive-label patterns are counted; among the reports with the most
    common pattern (on IU: "No Finding" only) the most frequent text is returned (ties: the
    shortest, then alphabetical, so the choice is deterministic).

    Args:
        train_reports: the training split's reference reports.
        labeler: default rule-based.

    Returns:
        The report text.
    """
    texts = [t for t in train_reports if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("most_common_report needs at least one non-empty training report")
    present = metrics.binarize(label_texts(texts, labeler))
    patterns = [tuple(row) for row in present]
    top_pattern = Counter(patterns).most_common(1)[0][0]
    counts = Counter(t for t, p in zip(texts, patterns) if p == top_pattern)
    return min(counts, key=lambda t: (-counts[t], len(t), t))


def nearest_neighbour_reports(
    train_features: np.ndarray, train_reports: Sequence[str], query_features: np.ndarray
) -> tuple[list[str], np.ndarray]:
    """The retrieval baseline: each query gets the report of its most similar training image.

    Args:
        train_features: ``(N, D)`` image features of the training images (e.g. the encoder's
            mean patch embedding).
        train_reports: the report of each training image.
        query_features: ``(M, D)`` features of the test images.

    Returns:
        (M reports, M indices into the training set), by cosine similarity.
    """
    train = np.asarray(train_features, dtype=np.float64)
    query = np.asarray(query_features, dtype=np.float64)
    if train.ndim != 2 or query.ndim != 2 or train.shape[1] != query.shape[1]:
        raise ValueError(
            f"features must be (N, D) and (M, D) with the same D, got {train.shape} and "
            f"{query.shape}"
        )
    if len(train) != len(train_reports):
        raise ValueError(f"{len(train)} training feature rows but {len(train_reports)} reports")
    if len(train) == 0:
        raise ValueError("no training images to retrieve from")

    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    index = (unit(query) @ unit(train).T).argmax(axis=1)
    return [train_reports[i] for i in index], index


def image_features(model, images: Sequence[np.ndarray], cfg: dict, batch_size: int = 64):
    """Mean patch embedding of the model's vision encoder, one row per image (retrieval baseline).

    Args:
        model: an ``M4CXR`` (e.g. ``cxrlib.model.load_trained``).
        images: grayscale uint8 ``(H, W)`` arrays.
        cfg: the preset (image preprocessing).
        batch_size: images per forward pass.

    Returns:
        ``(len(images), encoder_width)`` float32 array.
    """
    import torch

    from cxrlib.model import ImageProcessor

    processor = ImageProcessor(cfg)
    device = next(model.parameters()).device
    rows = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            pixels = processor([np.array(im) for im in images[start : start + batch_size]])
            feats = model.image_features(pixels.to(device)).float().mean(dim=1)
            rows.append(feats.cpu().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32)


def with_reports(records: Sequence[dict], reports: Sequence[str] | str) -> list[dict]:
    """Copies of ``records`` whose ``report`` is replaced (one text for all, or one per record)."""
    if isinstance(reports, str):
        reports = [reports] * len(records)
    if len(reports) != len(records):
        raise ValueError(f"{len(reports)} reports for {len(records)} records")
    return [dict(r, report=t) for r, t in zip(records, reports)]


# --- labeler agreement --------------------------------------------------------------------------


def labeler_agreement(
    texts: Sequence[str],
    reference_labels,
    labeler=None,
    uncertain_as_positive: bool = False,
) -> pd.DataFrame:
    """Per-label precision, recall and F1 of a labeler against reference labels (e.g. MeSH).

    Args:
        texts: the reports.
        reference_labels: their reference labels (DataFrame or list of label dicts).
        labeler: default rule-based.
        uncertain_as_positive: count -1 as present on both sides.

    Returns:
        DataFrame indexed by label (+ ``macro`` and ``micro`` rows): ``n_ref``, ``n_pred``,
        ``precision``, ``recall``, ``f1`` (fractions).
    """
    if len(texts) != len(reference_labels):
        raise ValueError(f"{len(texts)} texts but {len(reference_labels)} reference label rows")
    y_true = metrics.binarize(reference_labels, uncertain_as_positive)
    y_pred = metrics.binarize(label_texts(texts, labeler), uncertain_as_positive)
    report = classification_report(
        y_true, y_pred, target_names=CHEXPERT_LABELS, output_dict=True, zero_division=0
    )
    rows = {}
    for name, key in [
        *((n, n) for n in CHEXPERT_LABELS),
        ("macro", "macro avg"),
        ("micro", "micro avg"),
    ]:
        scores = report[key]
        rows[name] = {"n_ref": int(scores["support"]), "n_pred": 0}
        rows[name].update({k: float(scores[k]) for k in ("precision", "recall", "f1-score")})
    table = pd.DataFrame.from_dict(rows, orient="index").rename(columns={"f1-score": "f1"})
    predicted = y_pred.sum(0)
    table.loc[CHEXPERT_LABELS, "n_pred"] = predicted
    table.loc[["macro", "micro"], "n_pred"] = int(predicted.sum())
    return table


# --- output -------------------------------------------------------------------------------------


def markdown_table(frame: pd.DataFrame, digits: int = 1) -> str:
    """A DataFrame as a GitHub Markdown table (no ``tabulate`` needed).

    Floats are rounded to ``digits``; a column whose values are all whole numbers (counts) is
    printed as integers; None/NaN as ``-``. A named or non-default index becomes the first column.
    """
    if frame.index.name or not isinstance(frame.index, pd.RangeIndex):
        frame = frame.reset_index()
    whole = {
        c
        for c in frame.columns
        if pd.api.types.is_numeric_dtype(frame[c])
        and frame[c].dropna().map(lambda v: float(v).is_integer()).all()
    }

    def cell(column, v):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "-"
        if column in whole and isinstance(v, int | float | np.number):
            return str(int(v))
        if isinstance(v, float | np.floating):
            return f"{v:.{digits}f}"
        return str(v)

    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = [
        "| " + " | ".join(cell(c, v) for c, v in zip(frame.columns, row)) + " |"
        for row in frame.itertuples(index=False)
    ]
    return "\n".join([header, rule, *body])
