""" "What this run shows": each notebook's closing text, written from its stored metrics.

The numbers of a run change with the preset, the seed and the training recipe, so a summary typed
into a notebook goes stale (and can end up contradicting the very table above it). Every notebook
therefore ends with

    >>> from IPython.display import Markdown
    >>> Markdown(what_this_run_shows("03-projector-pretraining", metrics))

which compares this run's metrics with its baselines in words. The wording rules (what counts as
"at chance", "no image dependence", "beats") are the constants below, in one place.
"""

from __future__ import annotations

from collections.abc import Callable

from cxrlib.config import num_patches

CHANCE_AUROC = 0.5
# AUROC bands: below the first "at chance", then "slightly above", "above", "clearly above".
AUROC_BANDS = (0.55, 0.65, 0.75)
# A loss change smaller than this (relative) is "no change": training noise, not learning.
SAME_LOSS = 0.005
PAPER_PATCHES, PAPER_TOKENS, PAPER_CONTEXT = 1369, 361, 4095


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _f(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def compare(value: float, baseline: float, tolerance: float = 0.0) -> str:
    """``"above"``, ``"below"`` or ``"level with"`` (within ``tolerance``) a baseline."""
    if value > baseline + tolerance:
        return "above"
    if value < baseline - tolerance:
        return "below"
    return "level with"


def auroc_words(auroc: float) -> str:
    """A macro AUROC in words (0.5 = chance)."""
    low, mid, high = AUROC_BANDS
    if auroc < low:
        return "at chance level: the features carry no usable finding information yet"
    if auroc < mid:
        return "only slightly above chance: the features carry a little finding information"
    if auroc < high:
        return "above chance: the features carry some finding information"
    return "clearly above chance: the features carry finding information"


def loss_change(before: float | None, after: float | None) -> str:
    """``"fell from a to b (-x%)"``, ``"rose ..."`` or ``"stayed at ..."``."""
    if before is None or after is None:
        return "was not measured"
    rel = (after - before) / before if before else 0.0
    if abs(rel) < SAME_LOSS:
        return f"stayed at {after:.3f} (from {before:.3f}, no real change)"
    word = "fell" if after < before else "rose"
    return f"{word} from {before:.3f} to {after:.3f} ({100 * rel:+.1f}%)"


def _bullets(lines: list[str]) -> str:
    return "**What this run shows** (written from the stored metrics)\n\n" + "\n".join(
        f"- {line}" for line in lines
    )


# --- one function per notebook ----------------------------------------------------------------


def overview(m: dict, cfg: dict) -> list[str]:
    tokens = cfg["projector"]["num_queries"]
    context = cfg["llm"]["max_length"]
    four = 4 * tokens
    return [
        f"At this preset an image is {num_patches(cfg)} patches, passed to the LLM as {tokens} "
        f"tokens; a four-image multi-study prompt costs {four} image tokens of the "
        f"{context}-token context ({_pct(four / context)}).",
        f"In the paper, four images of {PAPER_PATCHES} patches would need "
        f"{4 * PAPER_PATCHES:,} positions, more than Mistral's {PAPER_CONTEXT:,} before any "
        f"text; the C-Abstractor's {PAPER_TOKENS} tokens per image make it "
        f"{4 * PAPER_TOKENS:,}.",
    ]


def data_prep(m: dict, cfg: dict) -> list[str]:
    shares = m.get("mixture_paper_group_shares", {})
    lines = [
        f"{m['num_studies']} studies with {m['num_images']} images; splits "
        + ", ".join(f"{k} {v}" for k, v in m["split_sizes"].items())
        + ".",
    ]
    if "mesh_mapped_pct" in m:  # IU-Phantom
        lines.append(
            f"{m['mesh_mapped_pct']:.1f}% of the MeSH terms map to a CheXpert observation."
        )
    else:  # a real source: what its adapter read
        lines.append(
            f"Source {m.get('data_source')}: {m.get('studies_with_prior', 0)} studies have a prior "
            "study of the same subject (the multi-study task)."
        )
    if shares:
        lines.append(
            "The paper mixture's group shares here: "
            + ", ".join(f"{k} {_pct(v)}" for k, v in shares.items())
            + " (the paper: report 54%, classification 9% + localisation 26%, VQA 11%)."
        )
    frac = m.get("truncated_fraction", 0.0)
    lines.append(
        f"{_pct(frac)} of the sampled conversations are longer than llm.max_length and lose text "
        "at the end" + (" (none do)." if frac == 0 else "; their targets are cut short.")
    )
    return lines


def backbones(m: dict, cfg: dict) -> list[str]:
    lines = []
    lm = m.get("lm_pretrain", {})
    ppl, vocab = lm.get("val_perplexity"), m.get("tokenizer", {}).get("vocab_size")
    if ppl is not None and vocab:
        verdict = (
            "close to a model that learnt nothing (uniform guessing)"
            if ppl > 0.5 * vocab
            else "far below uniform guessing: it has learnt which words follow which"
        )
        lines.append(
            f"The LLM's validation perplexity is {ppl:.1f} against {vocab} for uniform guessing "
            f"over the vocabulary: {verdict}."
        )
    t2 = m.get("lm_turn2") or {}
    if t2.get("turn1_named"):
        follows = t2["turn1_in_report"]
        lines.append(
            f"Given turn 1 in words, the LM's greedy turn 2 names {follows} of the "
            f"{t2['turn1_named']} findings that turn 1 listed ({_pct(follows / t2['turn1_named'])}; "
            f"{t2['distinct_reports']} distinct reports for {t2['studies']} validation studies), "
            + (
                f"and the true turn 1 saves {t2['nll_gain']:.2f} nats per report against "
                '"Not found.": '
                if t2["nll_gain"] >= 0
                else f"and the real report is {-t2['nll_gain']:.2f} nats less likely after the "
                'true turn 1 than after "Not found.": '
            )
            + (
                "turn 2 does not follow turn 1 yet."
                if follows == 0
                else "turn 2 follows turn 1 only for some findings."
                if follows < 0.5 * t2["turn1_named"]
                else "turn 2 mostly follows turn 1."
            )  # fmt: skip
        )
    enc = m.get("encoder_pretrain", {})
    auroc = enc.get("val_label_macro_auroc")
    if auroc is not None:
        lines.append(
            f"The encoder's findings head reaches a validation macro AUROC of {auroc:.3f} "
            f"(chance {CHANCE_AUROC}): {auroc_words(auroc)}."
        )
    for name in ("lm_pretrain", "encoder_pretrain"):
        s = m.get(name, {})
        if "first_loss" in s:
            lines.append(
                f"`{name}`: training loss {loss_change(s['first_loss'], s['final_loss'])} "
                f"in {s['steps']} steps."
            )
    return lines


def projector_pretraining(m: dict, cfg: dict) -> list[str]:
    lines = []
    align = m.get("word_alignment")
    if align:
        learnt = align["final_loss"] < align["constant_loss"]
        lines.append(
            f"Word alignment ({align['steps']} steps): the distance of the image tokens to their "
            f"description's word embeddings fell from {align['first_loss']:.3f} to "
            f"{align['final_loss']:.3f}, "
            + (
                f"below the {align['constant_loss']:.3f} of the best image-blind output: the "
                "tokens carry image-specific words."
                if learnt
                else f"not below the {align['constant_loss']:.3f} of the best image-blind output: "
                "the alignment learnt nothing image-specific."
            )
        )
    lines.append(
        f"Validation loss on Findings tokens {loss_change(m['val_loss_before'], m['val_loss'])}."
    )
    right, shuffled = m.get("val_loss"), m.get("val_loss_shuffled_images")
    if right is not None and shuffled is not None:
        gap = shuffled - right
        if gap <= SAME_LOSS * right:
            lines.append(
                f"With every validation image swapped for another the loss is {shuffled:.3f} vs "
                f"{right:.3f} with the right images (difference {gap:+.4f}): the projector has "
                "**not** learnt anything image-specific yet; the text does not depend on the image."
            )
        else:
            lines.append(
                f"Swapping the images raises the validation loss from {right:.3f} to "
                f"{shuffled:.3f} ({gap:+.4f}): the predicted text depends on the image."
            )
    after = [s["after"] for s in m.get("samples", [])]
    if len(after) > 1:
        if len(set(after)) == 1:
            lines.append(
                f"All {len(after)} validation images get the same generated text after training."
            )
        else:
            lines.append(
                f"The {len(after)} validation images get {len(set(after))} different texts."
            )
    share = m["trainable_parameters"] / m["total_parameters"]
    lines.append(
        f"{m['trainable_parameters']:,} of {m['total_parameters']:,} parameters trained "
        f"({_pct(share)}), the projector only."
    )
    return lines


def instruction_tuning(m: dict, cfg: dict) -> list[str]:
    check = m["findings_check"]
    model, common, best = (
        check["model_mF1_14"],
        check["most_common_mF1_14"],
        check["best_constant_mF1_14"],
    )

    def verdict(base: float) -> str:
        return "beats" if model > base else "does **not** beat"

    lines = [
        f"Turn-1 findings on {check['n']} validation studies: mF1-14 {model:.3f}. The model "
        f"{verdict(common)} the most common answer ({common:.3f}, "
        f"'{check['most_common_answer']}') and {verdict(best)} the best constant answer chosen "
        f"with hindsight ({best:.3f}).",
    ]
    if model <= common:
        lines.append(
            "So this run gives no evidence that the model reads the image: an image-blind answer "
            "scores as well."
        )
    if check.get("malformed"):
        lines.append(f"{check['malformed']} of {check['n']} turn-1 answers were malformed.")
    val, before = m.get("val_loss", {}), m.get("val_loss_before", {})
    if "all" in val and "all" in before:
        lines.append(f"Validation loss over all tasks {loss_change(before['all'], val['all'])}.")
        deltas = {t: val[t] - before[t] for t in val if t != "all" and t in before}
        if deltas:
            best_task = min(deltas, key=deltas.get)
            lines.append(
                f"Largest drop: `{best_task}` ({deltas[best_task]:+.3f}); "
                f"{sum(d < 0 for d in deltas.values())} of {len(deltas)} tasks improved."
            )
    share = m["trainable_parameters"] / m["total_parameters"]
    lines.append(
        f"{m['trainable_parameters']:,} of {m['total_parameters']:,} parameters trained "
        f"({_pct(share)})."
    )
    return lines


def cot_inference(m: dict, cfg: dict) -> list[str]:
    lines = []
    reports = m.get("reports", {})
    cot = reports.get("cot_single")
    if cot:
        mal = cot["malformed turn 1"] / max(cot["requests"], 1)
        lines.append(
            f"{_pct(mal)} of the single-image turn-1 answers are malformed (not a list of the 13 "
            "finding names nor 'Not found.')."
        )
    f = m.get("cot_findings")
    if f:
        lines.append(
            f"Turn-1 findings F1 (13 findings, strict parser, frontal test images): macro "
            f"{f['macro_f1']:.3f}, micro {f['micro_f1']:.3f}."
        )
    if "direct_single" in reports:
        lines.append(
            "The direct (single-turn) prompt is scored for comparison only: "
            + (
                "this model trained on it."
                if m.get("direct_trained")
                else "this model never trained on it with an image (the phase-2 mixture has CoT "
                "reports only; the small LM met the prompt only in its text-only corpus), so it "
                "is not the paper's no-CoT ablation, which trains a model on direct reports."
            )
        )
    g = m.get("grounding", {}).get("overall")
    if g:
        lines.append(
            f"Grounding: mIoU {g['mIoU']:.3f}, accuracy at IoU >= 0.5 {g['accuracy']:.3f} over "
            f"{g['n']} answers; {g['malformed']} had no readable box"
            + (" and no predicted box overlaps a true one." if g["mIoU"] == 0 else ".")
        )
    vqa = m.get("vqa", {}).get("vqa")
    if vqa:
        lines.append(f"VQA exact match {vqa['accuracy']:.3f} over {vqa['n']} questions.")
    return lines


MODEL_ROW = "CoT, single image, frontal"
BASELINE_ROWS = ("baseline: most common report, frontal", "baseline: nearest neighbour, frontal")


def evaluation(m: dict, cfg: dict) -> list[str]:
    reports = m["reports"]
    lines = [f"Labeler: `{m['labeler']}` (the paper: CheXbert)."]
    if MODEL_ROW not in reports:
        return lines + [f"No '{MODEL_ROW}' result to compare."]
    model = reports[MODEL_ROW]
    for metric in ("mF1-14", "uF1-14"):
        value = model["clinical"][metric]
        lo, hi = model.get("clinical_ci", {}).get(metric, (None, None))
        for base_name in BASELINE_ROWS:
            if base_name not in reports:
                continue
            base = reports[base_name]["clinical"][metric]
            word = compare(value, base)
            inside = lo is not None and lo <= base <= hi
            lines.append(
                f"{metric}: the CoT model ({100 * value:.1f}) is {word} the "
                f"{base_name.removeprefix('baseline: ').removesuffix(', frontal')} baseline "
                f"({100 * base:.1f})"
                + (", within the model's 95% interval: not distinguishable." if inside else ".")
            )
    direct = reports.get("direct, single image, frontal")
    if direct:
        a, b = model["clinical"]["mF1-14"], direct["clinical"]["mF1-14"]
        trained = "a training format" if m.get("direct_trained") else "not a training format"
        lines.append(
            f"CoT vs direct prompt, mF1-14: {100 * a:.1f} vs {100 * b:.1f} (CoT {compare(a, b)} "
            f"direct; the direct prompt was {trained} of this model)."
        )
    t = m.get("turn_agreement") or {}
    if t.get("turn1_named"):
        back = t.get("report_in_turn1")
        lines.append(
            f"Chain of thought: the reports state {_pct(t['turn1_in_report'])} of the "
            f"{t['turn1_named']} findings that turn 1 named"
            + (
                f", and turn 1 had named {_pct(back)} of the {t['report_positive']} findings the "
                f"reports state"
                if back is not None
                else ", and state no finding at all"
            )  # fmt: skip
            + (
                f" ({t['distinct_reports']} distinct reports for {t['n']} frontal images)."
                if "distinct_reports" in t
                else "."
            )  # fmt: skip
        )
    g = m.get("grounding", {}).get("overall")
    if g:
        lines.append(f"Grounding mIoU {g['mIoU']:.3f} ({g['malformed']} of {g['n']} malformed).")
    return lines


def explorer(m: dict, cfg: dict) -> list[str]:
    agree = m["exact_label_agreement"]
    common = m.get("most_common_report_agreement")
    lines = [
        f"The labels of the CoT report equal the reference's in {_pct(agree)} of "
        f"{m['studies']} test studies."
    ]
    if common is not None:
        lines.append(
            f"The most common training report, given to every study, would agree on "
            f"{_pct(common)}: the model is {compare(agree, common)} this image-blind baseline."
        )
    return lines


def _interval(value: float | None, ci, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def _versus(c: dict) -> str:
    """``"below the recipe (intervals apart)"`` from ``ablations.compare_to_recipe``."""
    if c["arm"] is None or c["recipe"] is None:
        return "not measured"
    side = compare(c["arm"], c["recipe"])
    if c["overlap"] is None:
        return f"{side} the recipe (no intervals)"
    if c["overlap"]:
        return f"{side} the recipe, intervals overlap: not separated"
    return f"{side} the recipe, intervals apart"


def ablation_study(m: dict, cfg: dict) -> list[str]:
    from cxrlib import ablations

    cards = m["arms"]
    recipe = cards[ablations.RECIPE]
    r_value, r_ci = ablations.measure(recipe, "mF1-14")
    lines = [
        f"Every arm trained {m['steps']} phase-2 steps (seed {m['seed']}) from the shared phase 1 "
        f"and was scored on {m['test_studies']} test studies and {m['test_questions']} questions. "
        f"The recipe arm's frontal CoT report: mF1-14 {_interval(r_value, r_ci)}, "
        f"{recipe['reports']['single']['distinct']} distinct report(s)"
        + (
            f" (the main model, {m['main_model_steps']} steps, notebook 06: "
            f"{100 * m['main_model_mF1_14']:.1f})."
            if m.get("main_model_mF1_14") is not None
            else "."
        )
    ]
    compared: list[dict] = []
    measures = {
        "cot": ["mF1-14"],
        "task_groups": ["mF1-14", "grounding mIoU", "VQA %", "follows format %"],
        "sampling": ["mF1-14", "grounding mIoU", "VQA %", "follows format %"],
        "vqa_share": ["mF1-14", "VQA %", "follows format %"],
        "projector": ["mF1-14"],
    }
    for question, names in measures.items():
        arms = [n for n, c in cards.items() if c["question"] == question]
        if not arms:
            continue
        parts = []
        modes = ("single", "multi_image", "multi_study") if question == "projector" else ("single",)
        for arm in arms:
            said = []
            for name in names:
                for mode in modes:
                    c = ablations.compare_to_recipe(cards, arm, name, mode)
                    if c["arm"] is None:
                        continue
                    compared.append(c)
                    digits = 3 if name == "grounding mIoU" else 1
                    label = name if mode == "single" else f"{name} ({mode.replace('_', '-')})"
                    said.append(f"{label} {_interval(c['arm'], c['arm_ci'], digits)}, {_versus(c)}")
            parts.append(f"*{arm}*: " + "; ".join(said))
        lines.append(f"**{ablations.QUESTIONS[question]}.** " + " | ".join(parts) + ".")
        if question == "cot":
            comps = [ablations.compare_to_recipe(cards, a, "mF1-14") for a in arms]
            if all(c["overlap"] is False and c["arm"] < c["recipe"] for c in comps):
                verdict = "agrees with the paper's claim: the recipe's interval lies above every no-CoT arm's"
            elif any(c["overlap"] is False and c["arm"] > c["recipe"] for c in comps):
                verdict = "goes against the paper's claim: a no-CoT arm lies above the recipe"
            else:
                verdict = ("cannot test the paper's claim: the intervals overlap, so the toy run does "
                           "not separate CoT from the direct prompt")  # fmt: skip
            lines.append(f"Chain of thought at this scale {verdict}.")
    apart = [c for c in compared if c["overlap"] is False]
    if compared:
        lines.append(
            f"Of {len(compared)} arm-vs-recipe comparisons, {len(apart)} have intervals apart; "
            "the rest are within this run's noise (a toy model, short phase 2, synthetic images), "
            "so they neither confirm nor refute the paper's findings."
        )
    views = m.get("lateral_vs_frontal")
    if views:
        macro = views["macro"]
        diffs = {k: v for k, v in views.items() if k != "macro" and v.get("positives")}
        worst = max(diffs, key=lambda k: diffs[k]["frontal - lateral"]) if diffs else None
        line = (
            f"**Lateral vs frontal (open question 2, the main model).** Over {int(macro['n'])} studies "
            f"with both views, macro F1 from the frontal image {_f(macro['frontal'])}, the lateral "
            f"{_f(macro['lateral'])}, both {_f(macro['both'])}; frontal - lateral "
            f"{_interval(macro['frontal - lateral'], _ci(macro, 'frontal - lateral'), 3)}."
        )
        if worst is not None:
            w = diffs[worst]
            line += (
                f" The finding that loses most on the lateral view: {worst} "
                f"({_interval(w['frontal - lateral'], _ci(w, 'frontal - lateral'), 3)}, "
                f"{int(w['positives'])} positive studies)."
            )
        lines.append(line)
    return lines


def _ci(row: dict, name: str):
    low, high = row.get(f"{name} low"), row.get(f"{name} high")
    return None if low is None or high is None else [low, high]


WRITERS: dict[str, Callable[[dict, dict], list[str]]] = {
    "00-overview": overview,
    "01-data-prep": data_prep,
    "02-backbones": backbones,
    "03-projector-pretraining": projector_pretraining,
    "04-instruction-tuning-lora": instruction_tuning,
    "05-cot-inference": cot_inference,
    "06-evaluation": evaluation,
    "07-explorer": explorer,
    "08-ablations": ablation_study,
}


def what_this_run_shows(notebook: str, metrics: dict, cfg: dict | None = None) -> str:
    """Markdown bullets comparing one notebook's stored metrics with its baselines.

    Args:
        notebook: the notebook's stem, e.g. ``"03-projector-pretraining"``.
        metrics: what the notebook saved with ``save_metrics``.
        cfg: the resolved preset (needed by ``00-overview``).
    """
    if notebook not in WRITERS:
        raise KeyError(f"no summary writer for '{notebook}'; known: {sorted(WRITERS)}")
    return _bullets(WRITERS[notebook](metrics, cfg or {}))
