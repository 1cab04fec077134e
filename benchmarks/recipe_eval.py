"""Score one trained `phase2` checkpoint against issue 14's targets, on the held-out test split.

The same library calls as notebooks 05 and 06 (``generate_reports``, ``run_conversations``,
``evaluate.report_metrics`` / ``cot_findings_metrics`` / ``grounding_metrics`` /
``vqa_metrics``), with the notebooks' settings (150 questions per grounding / VQA task), so a
recipe can be compared without running the notebooks. Used for docs/recipe-log.md:

    python benchmarks/recipe_eval.py --out build/tiny [--studies N] [--json results.json]

Prints one JSON object: CoT single-image frontal report mF1-14 (+ 95% CI), distinct reports,
turn-1 findings macro F1 (frontal and all views), turn-1 -> turn-2 agreement, grounding per task
(mIoU, acc@0.5, malformed share), VQA exact match by question type.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cxrlib import evaluate
from cxrlib.constants import CHEXPERT_LABELS, FRONTAL_VIEWS
from cxrlib.data.conversations import build_conversation
from cxrlib.data.datasets import load_datasets
from cxrlib.inference import LocalBackend, generate_reports, run_conversations
from cxrlib.labeler import get_labeler

MAX_PER_TASK = 150  # notebook 05's questions per grounding / VQA task (tiny)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="build/tiny")
    parser.add_argument("--studies", type=int, default=None, help="first N test studies")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    out = Path(args.out)
    data = load_datasets(out / "data")
    test = evaluate.held_out_studies(data.studies, args.studies)
    study_labels = {s["study_id"]: s["labels"] for s in data.studies}
    backend = LocalBackend.from_checkpoint(out / "phase2", device="cpu")
    labeler = get_labeler("auto")
    t0 = time.perf_counter()
    cot = generate_reports(backend, test, data.images, mode="single", cot=True, max_new_tokens=120)
    frontal = [r for r in cot if r["views"][0] in FRONTAL_VIEWS]
    rep = evaluate.report_metrics(
        cot, labeler, "frontal", bootstrap_samples=args.bootstrap, language=False
    )
    res: dict = {
        "test_studies": len(test),
        "cot_frontal_mF1_14": 100 * rep["clinical"]["mF1-14"],
        "cot_frontal_mF1_14_ci": [100 * v for v in rep["clinical_ci"]["mF1-14"]],
        "distinct_reports_frontal": len({r["report"] for r in frontal}),
        "distinct_reports_all": len({r["report"] for r in cot}),
        "turn1_not_found_share": float(np.mean([r["findings"] == [] for r in cot])),
        "cot_findings_frontal": evaluate.cot_findings_metrics(frontal, study_labels),
        "cot_findings_all_views": evaluate.cot_findings_metrics(cot, study_labels)["macro_f1"],
        "agreement_frontal": evaluate.turn_agreement(frontal, labeler),
        "report_seconds": time.perf_counter() - t0,
    }
    # the two report baselines of notebook 06, scored the same way
    train = data.split("train")
    common = evaluate.most_common_report([s["findings_text"] for s in train], labeler)
    model = backend.model
    train_images = [im for s in train for im in s["images"]]
    train_feats = evaluate.image_features(model, [data.images[im["index"]] for im in train_images],
                                          backend.cfg)  # fmt: skip
    query = evaluate.image_features(model, [data.images[r["image_indices"][0]] for r in cot],
                                    backend.cfg)  # fmt: skip
    nn_reports, _ = evaluate.nearest_neighbour_reports(
        train_feats, [s["findings_text"] for s in train for _ in s["images"]], query
    )
    for name, reports in (("most_common", common), ("nearest_neighbour", nn_reports)):
        base = evaluate.report_metrics(evaluate.with_reports(cot, reports), labeler, "frontal",
                                       bootstrap_samples=0, language=False)  # fmt: skip
        res[f"{name}_mF1_14"] = 100 * base["clinical"]["mF1-14"]
    res["ci_above_most_common"] = res["cot_frontal_mF1_14_ci"][0] > res["most_common_mF1_14"]
    per_label = rep["clinical"].get("per_label") or {}
    res["report_per_label_f1"] = {k: per_label.get(k) for k in CHEXPERT_LABELS if k in per_label}
    rng = np.random.default_rng(0)
    convs = []
    tasks = list(evaluate.BOX_TASKS) + ["multi_finding_grounding"]
    tasks += list(evaluate.NAMING_TASKS) + list(evaluate.VQA_TASKS)
    for task in tasks:
        built = [c for s in test if (c := build_conversation(task, s, rng)) is not None]
        convs += built[:MAX_PER_TASK]
    t0 = time.perf_counter()
    recs = run_conversations(backend, convs, data.images, max_new_tokens=48)
    res["conversation_seconds"] = time.perf_counter() - t0
    grounding = evaluate.grounding_metrics(recs)
    res["grounding"] = {
        t: {k: g[k] for k in ("mIoU", "accuracy", "n", "malformed", "said_absent") if k in g}
        for t, g in grounding.items()
    }
    constant = evaluate.constant_box_metrics(recs, train)
    res["grounding_constant_box"] = {t: {"mIoU": g["mIoU"], "accuracy": g["accuracy"]}
                                     for t, g in constant.items()}  # fmt: skip
    n_box = sum(r["task"] in evaluate.BOX_TASKS or r["task"] == "multi_finding_grounding"
                for r in recs)  # fmt: skip
    res["grounding_answers"] = n_box
    vqa = evaluate.vqa_metrics(recs)
    v = vqa.get("vqa", {})
    res["vqa_accuracy"] = v.get("accuracy")
    res["vqa_by_type"] = {
        k: {"accuracy": d["accuracy"], "n": d["n"]}
        for k, d in v.get("by_question_type", {}).items()
    }
    res["naming"] = vqa.get("naming")
    train_convs = [c for s in train for t in evaluate.VQA_TASKS
                   if (c := build_conversation(t, s, rng)) is not None]  # fmt: skip
    const_vqa = evaluate.constant_vqa_metrics(recs, evaluate.most_common_answers(train_convs))
    res["vqa_constant_accuracy"] = const_vqa["accuracy"]
    res["vqa_constant_by_type"] = {k: d["accuracy"]
                                   for k, d in const_vqa["by_question_type"].items()}  # fmt: skip
    text = json.dumps(res, indent=1, default=float)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
