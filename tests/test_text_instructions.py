"""Text-only instruction conversations (issue 14) and per-part learning rates."""

import pytest
import torch
from conftest import example_study

from cxrlib.constants import IMAGE_TOKEN, SYSTEM_TEXT
from cxrlib.data.conversations import build_conversation
from cxrlib.data.text_instructions import (
    TextInstructionError,
    describe_image,
    image_checklist,
    packed_instruction_rows,
    text_conversations,
    to_text_conversation,
    with_text_instructions,
)
from cxrlib.optim_groups import part_of, part_param_groups
from cxrlib.tokenizer import train_bpe_tokenizer


def test_describe_image_names_findings_boxes_and_organs():
    study = example_study()
    text = describe_image(study, study["images"][0])
    assert text.startswith("PA view; cardiomegaly, mild at [27,45,82,86]")
    assert "pleural effusion, left lower zone, moderate at [55,68,94,99]" in text
    assert "possible atelectasis" in text  # uncertain: named as such, no box
    assert "left lung at [" in text and "heart at [" in text


def test_image_checklist_gives_every_cot_finding_its_own_slot():
    from cxrlib.constants import COT_FINDINGS

    study = example_study()
    words = image_checklist(study, study["images"][0])
    assert len(words) == 1 + len(COT_FINDINGS) and words[0] == "PA"
    slot = dict(zip(COT_FINDINGS, words[1:]))
    assert slot["cardiomegaly"] == "cardiomegaly" and slot["pleural effusion"] == "pleural effusion"
    assert slot["atelectasis"] == "possible"  # uncertain
    assert slot["fracture"] == "no"


def test_text_conversation_replaces_every_image_and_keeps_answers():
    study = example_study()
    for task in ("cot_multi_study", "organ_grounding", "difference_vqa", "finding_grounding"):
        conv = build_conversation(task, study, 0)
        text = to_text_conversation(conv, study)
        assert text["images"] == [] and text["task"] == task
        assert all(IMAGE_TOKEN not in t["user"] for t in text["turns"])
        assert [t["assistant"] for t in text["turns"]] == [t["assistant"] for t in conv["turns"]]
        assert text["turns"][0]["user"].count("view;") == len(conv["images"])
    organ = to_text_conversation(build_conversation("organ_grounding", study, 0), study)
    # the asked organ's box is in the description: the answer can be read off the words
    assert organ["turns"][0]["assistant"].rstrip(".") in organ["turns"][0]["user"]


def test_unknown_image_is_an_error():
    study = example_study()
    conv = {**build_conversation("vqa", study, 0), "images": [999]}
    with pytest.raises(TextInstructionError, match="999"):
        to_text_conversation(conv, study)


def test_text_conversations_use_the_training_split_only():
    train, test = example_study(), {**example_study(), "study_id": "T", "split": "test"}
    convs = text_conversations([train, test], n=30, seed=0)
    assert len(convs) == 30 and {
        c["meta"]["study_id"] for c in convs if "study_id" in c["meta"]
    } <= {"EX1"}
    assert convs == text_conversations([train, test], n=30, seed=0)  # seeded
    with pytest.raises(ValueError, match="training-split"):
        text_conversations([test], n=1, seed=0)


def test_packed_rows_are_the_chat_format():
    study = example_study()
    convs = text_conversations([study], n=20, seed=1)
    texts = [SYSTEM_TEXT] * 5 + [t["user"] + t["assistant"] for c in convs for t in c["turns"]]
    tok = train_bpe_tokenizer(texts, vocab_size=400)
    rows = packed_instruction_rows(convs, tok, seq_len=32)
    assert rows.ndim == 2 and rows.shape[1] == 32
    assert tok.decode(rows[0]).startswith(f"<s>[INST] {SYSTEM_TEXT[:20]}")
    assert "[/INST]" in tok.decode(rows.flatten())
    base = torch.utils.data.TensorDataset(torch.zeros(3, 32))
    assert with_text_instructions(base, [study], tok, {"seq_len": 32}, 0) is base  # off
    mixed = with_text_instructions(base, [study], tok, {"seq_len": 32, "text_instructions": 20}, 1)
    assert len(mixed) == 3 + len(rows) and torch.equal(mixed[3], rows[0])


def test_whole_packing_keeps_each_conversation_in_one_row_and_pads_without_loss():
    from cxrlib.backbones import collate_rows
    from cxrlib.data.tokenize import encode_conversation

    study = example_study()
    convs = text_conversations([study], n=12, seed=2)
    texts = [SYSTEM_TEXT] * 5 + [t["user"] + t["assistant"] for c in convs for t in c["turns"]]
    tok = train_bpe_tokenizer(texts, vocab_size=400)
    lengths = [len(encode_conversation(c, tok, 1)["input_ids"]) for c in convs]
    seq_len = max(lengths) + 4
    rows = packed_instruction_rows(convs, tok, seq_len=seq_len, packing="whole")
    assert rows.shape[1] == seq_len
    # every conversation starts a <s> inside a row, none is split across rows
    assert int((rows == tok.bos_token_id).sum()) == len(convs)
    real = rows != tok.pad_token_id
    assert int(real.sum()) == sum(lengths)
    batch = collate_rows(list(rows), pad_id=tok.pad_token_id)
    assert bool((batch["labels"][~real] == -100).all())
    assert torch.equal(batch["labels"][real], rows[real])
    with pytest.warns(UserWarning, match="left out"):
        short = packed_instruction_rows(convs, tok, seq_len=min(lengths), packing="whole")
    assert int((short == tok.bos_token_id).sum()) == sum(n <= min(lengths) for n in lengths)
    with pytest.raises(TextInstructionError, match="packing"):
        packed_instruction_rows(convs, tok, seq_len=32, packing="nope")


def test_text_instruction_weights_shift_the_task_draw():
    study = example_study()
    convs = text_conversations([study], n=60, seed=0, weights={"cot_single": 30.0})
    share = sum(c["task"] == "cot_single" for c in convs) / len(convs)
    assert share > 0.4  # uniform over 17 tasks would give about 0.06
    with pytest.raises(TextInstructionError, match="unknown tasks"):
        text_conversations([study], n=1, seed=0, weights={"no_such_task": 1.0})


def test_part_param_groups_scale_one_part():
    named = [
        ("encoder.layer.0.weight", torch.nn.Parameter(torch.zeros(2, 2))),
        ("encoder.layer.0.bias", torch.nn.Parameter(torch.zeros(2))),
        ("projector.w", torch.nn.Parameter(torch.zeros(2, 2))),
        ("llm.base_model.q_proj.lora_A.default.weight", torch.nn.Parameter(torch.zeros(2, 2))),
    ]
    assert [part_of(n) for n, _ in named] == ["encoder", "encoder", "projector", "lora"]
    groups = part_param_groups(named, 0.1, 1e-3, {"encoder": 0.1})
    lr = {(g["part"], g["weight_decay"]): g["lr"] for g in groups}
    assert lr == {("encoder", 0.1): 1e-4, ("encoder", 0.0): 1e-4, ("projector", 0.1): 1e-3,
                  ("lora", 0.1): 1e-3}  # fmt: skip
    assert sum(len(g["params"]) for g in groups) == len(named)
    with pytest.raises(ValueError, match="unknown parts"):
        part_param_groups(named, 0.1, 1e-3, {"decoder": 0.1})
    with pytest.raises(ValueError, match="train no parameter"):
        part_param_groups(named[2:], 0.1, 1e-3, {"encoder": 0.1})
    part_param_groups(named[2:], 0.1, 1e-3, {"encoder": 1.0})  # 1 = the default: no error


def test_image_words_none_leaves_no_facts_to_copy():
    study = example_study()
    conv = build_conversation("multi_label", study, 0)
    user = to_text_conversation(conv, study, image_words="none")["turns"][0]["user"]
    assert "(image)" in user and "cardiomegaly, mild" not in user
    with pytest.raises(TextInstructionError, match="image_words"):
        to_text_conversation(conv, study, image_words="pixels")


def _report_tokenizer(studies):
    from cxrlib.backbones import prompt_strings

    texts = [s["findings_text"] for s in studies] + prompt_strings() * 3
    return train_bpe_tokenizer(texts * 5, vocab_size=600)


def test_findings_report_rows_put_each_report_after_its_findings():
    from cxrlib.data.text_instructions import findings_report_rows

    abnormal = {**example_study(), "source": "iu"}  # cardiomegaly + pleural effusion
    normal = {**abnormal, "study_id": "N1",
              "labels": dict.fromkeys(abnormal["labels"]), "findings_text": "The lungs are clear."}  # fmt: skip
    held_out = {**abnormal, "study_id": "V1", "split": "val", "findings_text": "Val only."}
    follow_up = {**abnormal, "study_id": "L1", "source": "longitudinal", "findings_text": "Nope."}
    tok = _report_tokenizer([abnormal, normal])
    once = findings_report_rows([abnormal, normal, held_out, follow_up], tok, seq_len=1)
    text = tok.decode(once.flatten(), skip_special_tokens=False)
    assert "cardiomegaly, pleural effusion.</s>[INST] Based on the previous conversation" in text
    assert "Not found.</s>[INST]" in text and "The lungs are clear." in text
    assert "Val only" not in text and "Nope" not in text  # training reports of IU / MIMIC only
    twice = findings_report_rows([abnormal, normal, held_out], tok, seq_len=1, abnormal_repeats=3)
    assert tok.decode(twice.flatten()).count("cardiomegaly, pleural effusion.") == 3
    assert tok.decode(twice.flatten()).count("Not found.") == 1


def test_findings_report_rows_repeat_a_rare_finding_s_report_more_often():
    """rare_finding_power 1: three cardiomegaly reports and one edema report, so the edema
    report is read 3x (and x abnormal_repeats); power 0 keeps one copy each."""
    from cxrlib.data.text_instructions import findings_report_rows

    def report(i, label, text):
        return {**example_study(), "source": "iu", "study_id": f"R{i}",
                "labels": {label: 1}, "findings_text": text}  # fmt: skip

    studies = [report(i, "Cardiomegaly", "The heart is enlarged.") for i in range(3)]
    studies.append(report(3, "Edema", "There is pulmonary edema."))
    tok = _report_tokenizer(studies)

    def count(power, repeats=1):
        rows = findings_report_rows(studies, tok, 1, repeats, rare_finding_power=power)
        text = tok.decode(rows.flatten())
        return text.count("heart is enlarged"), text.count("pulmonary edema")

    assert count(0.0) == (3, 1)
    assert count(1.0) == (3, 3)
    assert count(1.0, repeats=2) == (6, 6)


def test_turn2_dependence_counts_what_turn1_named():
    from transformers import MistralConfig, MistralForCausalLM

    from cxrlib.backbones import turn2_dependence

    study = {**example_study(), "split": "val", "source": "iu"}
    tok = _report_tokenizer([study])
    torch.manual_seed(0)
    lm = MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=2,
                                          num_key_value_heads=1))  # fmt: skip
    out = turn2_dependence(lm, tok, [study, {**study, "split": "train"}], max_new_tokens=5)
    assert out["studies"] == 1 and out["studies_with_finding"] == 1  # the val study only
    assert out["turn1_named"] == 2  # cardiomegaly, pleural effusion
    assert isinstance(out["nll_gain"], float) and out["distinct_reports"] == 1
    assert 0 <= out["turn1_in_report"] <= out["turn1_named"]
