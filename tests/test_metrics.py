"""Metrics against independent computations: scikit-learn F1, NLTK BLEU, rouge-score, CIDEr-D by
hand, IoU by hand; bootstrap CIs; VQA exact match."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from sklearn.metrics import f1_score

from cxrlib import metrics
from cxrlib.constants import CHEXPERT_LABELS, FIVE_LABELS

# --- clinical F1 --------------------------------------------------------------------------------


def random_labels(rng, n):
    values = [1, 0, -1, None]
    return [{k: values[rng.integers(0, 4)] for k in CHEXPERT_LABELS} for _ in range(n)]


def to_matrix(rows, uncertain_as_positive=False):
    ok = (1, -1) if uncertain_as_positive else (1,)
    return np.array([[r[k] in ok for k in CHEXPERT_LABELS] for r in rows]).astype(int)


@pytest.mark.parametrize("uncertain_as_positive", [False, True])
def test_clinical_f1_matches_sklearn(uncertain_as_positive):
    rng = np.random.default_rng(0)
    ref, gen = random_labels(rng, 60), random_labels(rng, 60)
    got = metrics.clinical_f1(ref, gen, uncertain_as_positive)
    y_true, y_pred = to_matrix(ref, uncertain_as_positive), to_matrix(gen, uncertain_as_positive)
    five = [CHEXPERT_LABELS.index(k) for k in FIVE_LABELS]
    kw = dict(zero_division=0)
    assert got["mF1-14"] == pytest.approx(f1_score(y_true, y_pred, average="macro", **kw))
    assert got["uF1-14"] == pytest.approx(f1_score(y_true, y_pred, average="micro", **kw))
    assert got["mF1-5"] == pytest.approx(
        f1_score(y_true[:, five], y_pred[:, five], average="macro", **kw)
    )
    assert got["uF1-5"] == pytest.approx(
        f1_score(y_true[:, five], y_pred[:, five], average="micro", **kw)
    )
    per = f1_score(y_true, y_pred, average=None, **kw)
    assert list(got["per_label"].values()) == pytest.approx(per.tolist())
    assert got["support"]["Cardiomegaly"] == y_true[:, 2].sum()


def test_clinical_f1_hand_case():
    # Cardiomegaly: 1 TP, 1 FN; everything else absent on both sides -> F1 0 (zero_division=0).
    ref = [{"Cardiomegaly": 1}, {"Cardiomegaly": 1}, {"Cardiomegaly": -1}]
    gen = [{"Cardiomegaly": 1}, {"Cardiomegaly": 0}, {"Cardiomegaly": None}]
    ref = [{k: r.get(k) for k in CHEXPERT_LABELS} for r in ref]
    gen = [{k: g.get(k) for k in CHEXPERT_LABELS} for g in gen]
    got = metrics.clinical_f1(ref, gen)
    assert got["per_label"]["Cardiomegaly"] == pytest.approx(2 / 3)
    assert got["uF1-14"] == pytest.approx(2 / 3)
    assert got["mF1-14"] == pytest.approx(2 / 3 / 14)
    assert got["mF1-5"] == pytest.approx(2 / 3 / 5)
    # Uncertain as positive: the third reference becomes a false negative.
    assert metrics.clinical_f1(ref, gen, True)["per_label"]["Cardiomegaly"] == pytest.approx(0.5)


def test_clinical_f1_rejects_bad_input():
    with pytest.raises(ValueError, match="same reports in the same order"):
        metrics.clinical_f1([{k: 1 for k in CHEXPERT_LABELS}], [])
    with pytest.raises(ValueError, match="lack the columns"):
        metrics.clinical_f1([{"Edema": 1}], [{"Edema": 1}])


def test_bootstrap_ci_contains_estimate_and_is_seeded():
    rng = np.random.default_rng(1)
    ref = random_labels(rng, 80)
    gen = [dict(r) if rng.random() < 0.6 else g for r, g in zip(ref, random_labels(rng, 80))]
    point = metrics.clinical_f1(ref, gen)
    ci = metrics.clinical_f1_ci(ref, gen, samples=200, seed=3)
    for key in metrics.CLINICAL_KEYS:
        low, high = ci[key]
        assert low <= point[key] <= high and low < high
    assert ci == metrics.clinical_f1_ci(ref, gen, samples=200, seed=3)
    assert ci != metrics.clinical_f1_ci(ref, gen, samples=200, seed=4)


def test_bootstrap_ci_of_a_mean():
    values = np.arange(100, dtype=float)
    low, high = metrics.bootstrap_ci(lambda i: {"mean": values[i].mean()}, 100, 500, seed=0)["mean"]
    # standard error of the mean ~ 29 / 10 = 2.9 -> 95% interval about 49.5 +- 5.7
    assert 42 < low < 46 and 53 < high < 57


# --- language metrics ---------------------------------------------------------------------------

REFS = [
    "The heart is normal in size. The lungs are clear. No pleural effusion or pneumothorax.",
    "Mild cardiomegaly. Small left pleural effusion with basilar atelectasis.",
    "There is a right lower lobe consolidation. No pneumothorax is seen.",
    "The lungs are clear. There is no focal consolidation.",
]
HYPS = [
    "The heart is normal in size. The lungs are clear. No pleural effusion.",
    "Moderate cardiomegaly. Small left pleural effusion.",
    "There is a right lower lobe consolidation. No pleural effusion.",
    "The heart is normal. The lungs are clear.",
]


def test_tokenize_lowercases_and_drops_punctuation():
    assert metrics.tokenize("Heart size is NORMAL. No effusion, 2.5 cm!") == (
        "heart size is normal no effusion 2.5 cm"
    )


def test_bleu_hand_case():
    # Unigram precision 4/4, brevity penalty exp(1 - 6/4).
    got = metrics.language_metrics(["the heart is normal in size"], ["the heart is normal"], "none")
    assert got["BLEU-1"] == pytest.approx(math.exp(1 - 6 / 4), rel=1e-6)
    # Bigrams 3/3, trigrams 2/2, 4-grams 1/1: all precisions 1 -> every BLEU-n equals the BP.
    assert got["BLEU-4"] == pytest.approx(math.exp(1 - 6 / 4), rel=1e-6)


def test_bleu_matches_nltk():
    from nltk.translate.bleu_score import corpus_bleu

    got = metrics.language_metrics(REFS, HYPS, meteor="none")
    refs = [[metrics.tokenize(r).split()] for r in REFS]
    hyps = [metrics.tokenize(h).split() for h in HYPS]
    for n in range(1, 5):
        weights = tuple([1 / n] * n)
        assert got[f"BLEU-{n}"] == pytest.approx(corpus_bleu(refs, hyps, weights), rel=1e-6)


def test_rouge_l_matches_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    beta = 1.2  # the COCO implementation's F_beta
    expected = []
    for r, h in zip(REFS, HYPS):
        s = scorer.score(metrics.tokenize(r), metrics.tokenize(h))["rougeL"]
        p, rec = s.precision, s.recall
        expected.append((1 + beta**2) * p * rec / (rec + beta**2 * p) if p and rec else 0.0)
    got = metrics.language_metrics(REFS, HYPS, meteor="none")
    assert got["ROUGE-L"] == pytest.approx(np.mean(expected), rel=1e-9)


def cider_d(refs: list[str], hyps: list[str], n_max=4, sigma=6.0) -> float:
    """CIDEr-D (Vedantam et al. 2015), one reference per item, written from the paper."""

    def ngrams(words, n):
        return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))

    refs_w, hyps_w = [r.split() for r in refs], [h.split() for h in hyps]
    num = len(refs)
    scores = []
    for rw, hw in zip(refs_w, hyps_w):
        total = 0.0
        for n in range(1, n_max + 1):
            df = Counter(g for r in refs_w for g in set(ngrams(r, n)))

            def vec(counts, df=df):
                return {g: c * math.log(num / max(1.0, df[g])) for g, c in counts.items()}

            gh, gr = vec(ngrams(hw, n)), vec(ngrams(rw, n))
            nh = math.sqrt(sum(v * v for v in gh.values()))
            nr = math.sqrt(sum(v * v for v in gr.values()))
            dot = sum(min(v, gr.get(g, 0.0)) * gr.get(g, 0.0) for g, v in gh.items())
            sim = dot / (nh * nr) if nh and nr else 0.0
            total += sim * math.exp(-((len(hw) - len(rw)) ** 2) / (2 * sigma**2))
        scores.append(10 * total / n_max)
    return float(np.mean(scores))


def test_cider_matches_paper_definition():
    got = metrics.language_metrics(REFS, HYPS, meteor="none")
    toks = [metrics.tokenize(t) for t in REFS], [metrics.tokenize(t) for t in HYPS]
    assert got["CIDEr"] == pytest.approx(cider_d(*toks), rel=1e-9)
    assert got["CIDEr"] > 0


def test_language_metrics_rank_and_empty_hypotheses():
    perfect = metrics.language_metrics(REFS, REFS, meteor="none")
    partial = metrics.language_metrics(REFS, HYPS, meteor="none")
    empty = metrics.language_metrics(REFS, [""] * len(REFS), meteor="none")
    for key in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert perfect[key] > partial[key] > empty[key] >= 0
    assert perfect["BLEU-4"] == pytest.approx(1.0) and perfect["ROUGE-L"] == pytest.approx(1.0)
    assert partial["METEOR"] is None and partial["meteor_backend"] is None
    with pytest.raises(ValueError, match="are empty"):
        metrics.language_metrics(["", "a b"], ["a", "b"], meteor="none")
    with pytest.raises(ValueError, match="unknown METEOR backend"):
        metrics.language_metrics(REFS, HYPS, meteor="java8")


@pytest.mark.slow  # starts a JVM (~10 s on 2 cores)
@pytest.mark.skipif(not metrics._java_available(), reason="METEOR 1.5 needs Java")
def test_meteor_java():
    got = metrics.language_metrics(REFS, HYPS, meteor="java")
    same = metrics.language_metrics(REFS, REFS, meteor="java")
    assert got["meteor_backend"].startswith("pycocoevalcap")
    assert 0 < got["METEOR"] < same["METEOR"] <= 1
    assert same["METEOR"] > 0.9


# --- grounding ----------------------------------------------------------------------------------


def test_iou_by_hand():
    assert metrics.boxes_iou([[0, 0, 10, 10]], [[5, 5, 15, 15]]) == pytest.approx(25 / 175)
    assert metrics.boxes_iou([[0, 0, 10, 10]], [[0, 0, 10, 10]]) == 1.0
    assert metrics.boxes_iou([[0, 0, 10, 10]], [[20, 20, 30, 30]]) == 0.0
    # Two halves of one target box cover it exactly: region IoU 1.
    assert metrics.boxes_iou([[0, 0, 10, 10], [10, 0, 20, 10]], [[0, 0, 20, 10]]) == 1.0
    # One of two target boxes found: half the union.
    assert metrics.boxes_iou([[0, 0, 10, 10]], [[0, 0, 10, 10], [50, 50, 60, 60]]) == 0.5
    assert metrics.boxes_iou([], [[0, 0, 10, 10]]) == 0.0
    with pytest.raises(ValueError, match="at least one box"):
        metrics.boxes_iou([[0, 0, 1, 1]], [])


def test_grounding_scores_count_malformed_as_zero():
    answers = [
        "Yes. [0,0,10,10].",  # IoU 1
        "[5,5,15,15]",  # IoU 25/175
        "the box is somewhere",  # malformed
        "[0,0,10]",  # malformed (3 numbers)
        "[12,80,300,90]",  # malformed (out of range)
        [[0, 0, 10, 10]],  # already parsed
    ]
    target = [[0, 0, 10, 10]]
    got = metrics.grounding_scores(answers, [target] * len(answers))
    assert got["ious"] == pytest.approx([1, 25 / 175, 0, 0, 0, 1])
    assert got["mIoU"] == pytest.approx((2 + 25 / 175) / 6)
    assert got["accuracy"] == pytest.approx(2 / 6)
    assert got["no_box"] == 3 and got["n"] == 6


# --- VQA ----------------------------------------------------------------------------------------


def test_vqa_exact_match_by_type():
    preds = ["Yes.", "no", "left lower zone", "Moderate.", "PA", "mild"]
    answers = ["yes", "yes", "left  lower zone", "moderate", "pa", "severe"]
    qtypes = ["presence", "presence", "location", "severity", "view", "severity"]
    atypes = ["closed", "closed", "open", "open", "open", "open"]
    got = metrics.vqa_accuracy(preds, answers, qtypes, atypes)
    assert got["accuracy"] == pytest.approx(4 / 6) and got["n"] == 6
    assert got["by_question_type"]["presence"] == {"accuracy": 0.5, "n": 2}
    assert got["by_question_type"]["severity"] == {"accuracy": 0.5, "n": 2}
    assert got["by_question_type"]["view"]["accuracy"] == 1.0
    assert got["by_answer_type"]["closed"]["accuracy"] == 0.5
    assert metrics.normalize_answer(None) == ""
    assert metrics.normalize_answer("  Left  Lower zone. ") == "left lower zone"
    with pytest.raises(ValueError, match="predictions but"):
        metrics.vqa_accuracy(["a"], [])


# --- degenerate outputs (issue 11, item 6) ----------------------------------------------------


@pytest.mark.parametrize(
    "text, kind",
    [
        (None, "empty"),
        ("   \n", "empty"),
        ("[12, 30, 55, 80]", "boxes"),
        ("Yes. [1,2,3,4], [5,6,7,8].", "boxes"),
        (".", "no_words"),
        ("il.", "no_words"),
        ("Provide a description of the findings in the radiology image.", "prompt_copy"),
        ("Which of the following findings are present in the radiology image?", "prompt_copy"),
        ("lung opacity, lung lesion, edema", "prompt_copy"),  # the prompt's list, not a report
        ("The following is a conversation between a curious human and an AI", "prompt_copy"),
        ("The heart is normal in size. The lungs are clear.", None),
        ("Pleural effusion.", None),
        ("No acute cardiopulmonary abnormality.", None),
    ],
)
def test_degenerate_kind(text, kind):
    assert metrics.degenerate_kind(text) == kind


def test_degenerate_outputs_count_and_flag():
    texts = ["", "il.", "[1, 2, 3, 4]", "The lungs are clear.", None]
    got = metrics.degenerate_outputs(texts)
    assert got["counts"] == {"empty": 2, "boxes": 1, "no_words": 1, "prompt_copy": 0}
    assert (got["n"], got["degenerate"], got["fraction"]) == (5, 4, 0.8)
    assert got["mostly_degenerate"] and got["examples"]["boxes"] == "[1, 2, 3, 4]"
    half = metrics.degenerate_outputs(["", "The lungs are clear."])
    assert not half["mostly_degenerate"]  # flagged above half only
    assert metrics.degenerate_outputs([])["fraction"] == 0.0
