"""Notebook 08's library: the arms' mixtures and configs, the cache keys, the score helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import example_study

from cxrlib import ablations, evaluate, narrative
from cxrlib.config import ConfigError, load_preset
from cxrlib.constants import CHEXPERT_LABELS, MIXTURE_TASKS, TASK_GROUPS
from cxrlib.data.conversations import build_conversation
from cxrlib.data.mixture import GROUP_SHARES, group_shares, mixture_weights
from cxrlib.data.text_instructions import TEXT_TASKS


def shares(weights) -> dict[str, float]:
    return {g: round(100 * v, 6) for g, v in group_shares(mixture_weights(weights)).items()}


def test_no_cot_mixture_moves_each_report_task_to_its_direct_prompt():
    plain = ablations.no_cot_mixture()
    assert not set(TASK_GROUPS["report"]) & set(plain)
    assert plain["direct_multi_image"] / plain["direct_report"] == pytest.approx(120 / 200)
    assert shares(plain) == pytest.approx({g: v for g, v in GROUP_SHARES.items()})
    with_cls = ablations.no_cot_mixture(classification_task=True)
    assert sum(with_cls[t] for t in ablations.DIRECT_REPORT_TASKS) == pytest.approx(27.0)
    assert with_cls["multi_label"] == pytest.approx(plain["multi_label"] + 27.0)


def test_group_and_vqa_share_mixtures():
    assert "vqa" not in shares(ablations.mixture_with_groups(vqa=0))
    no_image = shares(ablations.mixture_with_groups(classification=0, localization=0))
    assert set(no_image) == {"report", "vqa"}
    assert no_image["report"] / no_image["vqa"] == pytest.approx(54 / 11)
    s25 = shares(ablations.mixture_with_vqa_share(25))
    assert s25["vqa"] == pytest.approx(25) and s25["report"] / s25["localization"] == pytest.approx(
        54 / 26
    )
    assert shares(ablations.mixture_with_vqa_share(11)) == pytest.approx(GROUP_SHARES)
    with pytest.raises(ValueError, match="percentage"):
        ablations.mixture_with_vqa_share(100)
    with pytest.raises(ValueError, match="unknown task group"):
        ablations.mixture_with_groups(vqq=0)


def test_equal_thirds_with_every_task_equal_inside():
    w = ablations.equal_groups_uniform()
    s = shares(w)
    assert s["report"] == pytest.approx(100 / 3) and s["vqa"] == pytest.approx(100 / 3)
    assert s["classification"] + s["localization"] == pytest.approx(100 / 3)
    image = TASK_GROUPS["classification"] + TASK_GROUPS["localization"]
    assert len({round(w[t], 9) for t in image}) == 1  # every image-understanding task equal


def test_sweep_default_full_and_student_changes():
    tiny = load_preset("tiny")
    default = ablations.sweep(cfg=tiny)
    assert default[0].name == ablations.RECIPE
    assert {a.question for a in default[1:]} == set(ablations.QUESTIONS) - {"recipe", "projector"}
    smoke_default = ablations.sweep(cfg=load_preset("smoke"))
    assert [a.name for a in smoke_default if a.question == "projector"] == ["1 tokens"]
    full = ablations.sweep(full=True, cfg=tiny)
    assert len(full) > len(default) and len({a.name for a in full}) == len(full)
    names = {a.name for a in full}
    assert "VQA 11%" not in names and "VQA 0%" not in names  # the recipe's share, and "no VQA"
    mine = ablations.sweep(vqa_shares=[7], tokens=[1, 16], depths=[3], cfg=tiny)
    assert [a.name for a in mine if a.question in ("vqa_share", "projector")] == [
        "VQA 7%",
        "1 tokens",
        "depth 3",
    ]
    assert all(a.own_phase1 for a in mine if a.question == "projector")
    with pytest.raises(ValueError, match="square"):
        ablations.sweep(tokens=[8], cfg=tiny)
    smoke = ablations.sweep(tokens=[4, 36], cfg=load_preset("smoke"))  # 4x4 patch grid
    assert not [a for a in smoke if a.question == "projector"]  # 4 = recipe, 36 > 16 patches


def test_arm_config_sets_steps_and_replaces_the_mixture():
    arm = ablations._named_arms()["no VQA"]
    overrides = {"data": {"mixture": {"cot_single": 1.0, "vqa": 5.0}}, "lora": {"r": 4}}
    cfg = ablations.arm_config("smoke", overrides, arm, steps=3, seed=5)
    assert cfg["train"]["phase2"]["steps"] == 3 and cfg["seed"] == 5 and cfg["lora"]["r"] == 4
    assert cfg["data"]["mixture"] == arm.changes["data"]["mixture"]  # not merged with OVERRIDES
    assert "vqa" not in cfg["data"]["mixture"]
    tiny = ablations.arm_config("tiny", {}, arm, steps=200, seed=0)
    assert tiny["train"]["phase2"]["warmup_steps"] == round(50 * 200 / 600)
    few = ablations.arm_config("smoke", {}, arm, 3, 0, tasks_with_data=["cot_single", "vqa"])
    assert set(few["data"]["mixture"]) == {"cot_single"}
    proj = ablations.Arm(
        "64 tokens", "projector", {"projector": {"num_queries": 64}}, own_phase1=True
    )
    with pytest.raises(ConfigError, match="num_queries"):
        ablations.arm_config("smoke", {}, proj, 3, 0)


def test_arm_key_follows_what_training_depends_on(tmp_path):
    named = ablations._named_arms()
    no_vqa = named["no VQA"]
    zero = ablations.Arm(
        "VQA 0%", "vqa_share", {"data": {"mixture": ablations.mixture_with_vqa_share(0)}}
    )

    def key(arm):
        return ablations.arm_key(ablations.arm_config("smoke", {}, arm, 3, 0), arm, tmp_path)

    assert key(no_vqa) == key(zero)  # the same training: one folder, trained once
    assert key(no_vqa) != key(named["uniform"])
    before = key(no_vqa)
    (tmp_path / "phase1").mkdir()
    (tmp_path / "phase1" / "trained.safetensors").write_bytes(b"new phase 1")
    assert key(no_vqa) != before  # a retrained phase 1 is a new arm
    proj = ablations.Arm(
        "1 tokens", "projector", {"projector": {"num_queries": 1}}, own_phase1=True
    )
    k1 = key(proj)
    (tmp_path / "phase1" / "trained.safetensors").write_bytes(b"another phase 1")
    assert key(proj) == k1  # an arm with its own phase 1 does not read the shared one
    cfg = ablations.arm_config("smoke", {}, no_vqa, 3, 0)
    assert ablations.arm_dir(cfg, no_vqa, tmp_path).parent == tmp_path / "ablations"


def test_train_arm_refuses_a_run_without_phase1(tmp_path):
    arm = ablations._named_arms()["no VQA"]
    for name in ablations.SHARED:
        (tmp_path / name).mkdir()
    cfg = ablations.arm_config("smoke", {}, arm, 2, 0)
    with pytest.raises(FileNotFoundError, match="phase1 is missing: run notebook 03"):
        ablations.train_arm(cfg, arm, tmp_path, device="cpu")


def test_cached_score_computes_once_per_settings(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"x": len(calls)}

    assert ablations.cached_score(tmp_path, {"a": 1}, compute) == {"x": 1}
    assert ablations.cached_score(tmp_path, {"a": 1}, compute) == {"x": 1}
    assert ablations.cached_score(tmp_path, {"a": 2}, compute) == {"x": 2}
    assert len(calls) == 2 and len(list(tmp_path.glob("score-*.json"))) == 2


def test_direct_prompt_in_every_input_mode():
    study = example_study()
    for task, n_images in (("direct_multi_image", 2), ("direct_multi_study", 4)):
        conv = build_conversation(task, study, 0)
        assert len(conv["turns"]) == 1 and conv["turns"][0]["assistant"] == study["findings_text"]
        assert conv["turns"][0]["user"].count("<image>") == len(conv["images"]) == n_images
        assert "Which of the following findings" not in conv["turns"][0]["user"]
    # the text-only corpus of the small LLM keeps its task list (adding tasks would change tiny)
    assert TEXT_TASKS == (*MIXTURE_TASKS, "report_only", "direct_report")


def conv(task, prediction, reference, **meta):
    return {"task": task, "meta": meta, "references": [reference], "predictions": [prediction]}


def test_instruction_following_checks_each_asked_format():
    vocab = evaluate.answer_vocabulary(
        [
            {"task": "vqa", "meta": {"question_type": "view"}, "turns": [{"assistant": "PA"}]},
            {"task": "vqa", "meta": {"question_type": "view"}, "turns": [{"assistant": "AP"}]},
            {"task": "grounded_organ", "meta": {}, "turns": [{"assistant": "left lung"}]},
            {"task": "cot_single", "meta": {}, "turns": [{"assistant": "ignored"}]},
        ]
    )
    assert vocab == {"view": {"pa", "ap"}, "grounded_organ": {"left lung"}}
    records = [
        conv("organ_grounding", "[1,2,30,40]", "[1,2,30,40]"),  # ok
        conv("organ_grounding", "Not present.", "[1,2,30,40]"),  # no box: not the format
        conv("finding_grounding", "Not present.", "Not present."),  # allowed here
        conv("multi_finding_grounding", "edema [1,2,3,4].", "Not found."),  # ok
        conv("vqa", "AP.", "PA", question_type="view"),  # a known answer, wrong: format ok
        conv("vqa", "maybe", "PA", question_type="view"),  # not an answer of this type
        conv("grounded_organ", "left lung", "left lung"),
        conv("grounded_phrase", "[1,2,3,4]", "Small effusion."),  # a box, not words
        {"report": "The heart is normal.", "cot": True, "findings": None},  # turn 1 malformed
        {"report": "", "cot": False, "findings": None},  # empty report
    ]
    got = evaluate.instruction_following(records, vocab)
    assert got["items"] == [1, 0, 1, 1, 1, 0, 1, 0, 0, 1, 0]
    assert got["by_task"]["organ_grounding"] == 0.5 and got["by_task"]["CoT turn 1"] == 0.0
    assert got["share"] == pytest.approx(6 / 11) and got["n"] == 11
    with pytest.raises(ValueError, match="no records"):
        evaluate.instruction_following([], vocab)
    assert evaluate.exact_match(conv("vqa", "PA.", "pa")) == 1


def test_view_f1_by_finding_pairs_studies_and_intervals():
    cardio, normal = "The heart is enlarged.", "The lungs are clear."
    single, multi = [], []
    for i in range(6):
        ref = cardio if i < 3 else normal
        sid = f"s{i}"
        single.append({"study_id": sid, "views": ["PA"], "reference": ref, "report": ref})
        single.append({"study_id": sid, "views": ["LATERAL"], "reference": ref, "report": normal})
        multi.append({"study_id": sid, "views": ["PA", "LATERAL"], "reference": ref, "report": ref})
    single.append(
        {"study_id": "frontal-only", "views": ["PA"], "reference": cardio, "report": cardio}
    )
    table = evaluate.view_f1_by_finding(single, multi, samples=50, seed=0)
    row = table.loc["Cardiomegaly"]
    assert row["frontal"] == 1.0 and row["lateral"] == 0.0 and row["both"] == 1.0
    assert row["frontal - lateral"] == 1.0 and row["frontal - lateral low"] == 1.0
    assert row["positives"] == 3 and int(row["n"]) == 6  # the frontal-only study is left out
    assert set(CHEXPERT_LABELS) <= set(table.index) and "macro" in table.index
    with pytest.raises(ValueError, match="no study"):
        evaluate.view_f1_by_finding(single[:1], multi[:1])


def card(question, mf1, ci, value=None):
    return {
        "question": question,
        "value": value,
        "tokens_per_image": 16,
        "reports": {"single": {"mF1-14": mf1, "mF1-14 ci": ci, "uF1-14": 0.5, "uF1-14 ci": None,
                               "not report %": 0.0, "distinct": 3, "turn-1 F1": 0.1}},
        "grounding": {"mIoU": {"mean": 0.3, "ci": [0.2, 0.4]}},
        "vqa": {"mean": 0.5, "ci": [0.4, 0.6]},
        "instruction_following": {"mean": 0.9, "ci": [0.85, 0.95]},
        "phase2_seconds": 10.0,
    }  # fmt: skip


def test_results_and_narrative_read_the_intervals():
    cards = {
        ablations.RECIPE: card("recipe", 0.12, [0.11, 0.13]),
        "no CoT": card("cot", 0.05, [0.04, 0.06]),
        "no CoT + classification": card("cot", 0.08, [0.07, 0.09]),
        "no VQA": card("task_groups", 0.125, [0.115, 0.135]),
    }
    rows = {r["arm"]: r for r in ablations.results_table(cards)}
    assert rows["no CoT"]["mF1-14"] == "5.0 [4.0, 6.0]" and rows["recipe"]["train s"] == 10
    c = ablations.compare_to_recipe(cards, "no VQA", "mF1-14")
    assert c["overlap"] is True and c["arm"] == pytest.approx(12.5)
    m = {"arms": cards, "steps": 200, "seed": 0, "test_studies": 10, "test_questions": 40}
    text = narrative.what_this_run_shows("08-ablations", m, {})
    assert "agrees with the paper's claim" in text
    assert "no VQA*: mF1-14 12.5 [11.5, 13.5], above the recipe, intervals overlap" in text
    cards["no CoT"] = card("cot", 0.2, [0.19, 0.21])
    assert "goes against the paper's claim" in narrative.what_this_run_shows("08-ablations", m, {})
    cards["no CoT"] = card("cot", 0.12, [0.10, 0.14])
    assert "cannot test the paper's claim" in narrative.what_this_run_shows("08-ablations", m, {})


def test_describe_arm_shows_group_shares():
    arm = ablations._named_arms()["no CoT + classification"]
    cfg = ablations.arm_config("smoke", {}, arm, 2, 0)
    row = ablations.describe_arm(
        arm, cfg, dict.fromkeys(MIXTURE_TASKS + list(ablations.DIRECT_REPORT_TASKS), 1)
    )
    assert row["report prompt"] == "direct" and row["report %"] == pytest.approx(27.0)
    assert (
        row["classification %"] == pytest.approx(36.0)
        and row["changes"] == "data.mixture=task weights"
    )
    json.dumps(row)  # a plain row


def test_mean_ci_is_a_bootstrap_of_the_mean():
    got = ablations._mean_ci([0, 1, 1, 1], samples=200, seed=0)
    assert got["mean"] == 0.75 and got["ci"][0] <= 0.75 <= got["ci"][1] and got["n"] == 4
    assert ablations._mean_ci([], 10, 0) == {"mean": None, "ci": None, "n": 0}
    assert np.isclose(ablations._mean_ci([2.0] * 5, 20, 0)["ci"], [2.0, 2.0]).all()


def test_error_bars_never_negative():
    err = ablations.error_bars([0.5, 0.2, np.nan], [[0.6, 0.9], [0.1, 0.3], None])
    assert err.shape == (2, 3) and (err >= 0).all()
    assert err[:, 0].tolist() == [0.0, pytest.approx(0.4)] and err[:, 1] == pytest.approx(
        [0.1, 0.1]
    )
