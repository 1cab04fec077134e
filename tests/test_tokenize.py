"""Tokenisation: the Mistral template, image expansion, label masking, truncation, collation."""

import numpy as np
import pytest
from conftest import example_study

from cxrlib.constants import IGNORE_INDEX, SYSTEM_TEXT
from cxrlib.data.conversations import build_conversation
from cxrlib.data.tokenize import TokenizeError, collate, encode_conversation, encode_prompt
from cxrlib.tokenizer import image_token_id, train_bpe_tokenizer


@pytest.fixture(scope="module")
def tok():
    study = example_study()
    texts = [SYSTEM_TEXT, study["findings_text"]] * 10
    for task in ("cot_multi_study", "vqa", "finding_grounding"):
        conv = build_conversation(task, study, 0)
        texts += [t["user"] + " " + t["assistant"] for t in conv["turns"]] * 5
    return train_bpe_tokenizer(texts, vocab_size=400)


def conv2():
    return {
        "task": "t",
        "images": [5],
        "turns": [
            {"user": "radiology image: <image> Q one?", "assistant": "A one."},
            {"user": "Q two?", "assistant": "A two."},
        ],
    }


def test_template_and_label_mask(tok):
    enc = encode_conversation(conv2(), tok, num_image_tokens=3)
    text = tok.decode(enc["input_ids"])
    assert text == (
        f"<s>[INST] {SYSTEM_TEXT} radiology image: <image><image><image> Q one? "
        "[/INST]A one.</s>[INST] Q two? [/INST]A two.</s>"
    )
    labels = [t for t in enc["labels"] if t != IGNORE_INDEX]
    assert tok.decode(labels) == "A one.</s>A two.</s>"
    # every labelled position carries its own input id (no shift inside the data layer)
    assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(enc["labels"], enc["input_ids"]))
    assert enc["input_ids"].count(image_token_id(tok)) == 3
    assert enc["num_images"] == 1 and not enc["truncated"]


def test_multi_study_expands_every_image(tok):
    conv = build_conversation("cot_multi_study", example_study(), 0)
    enc = encode_conversation(conv, tok, num_image_tokens=4)
    assert enc["input_ids"].count(image_token_id(tok)) == 16
    assert all(
        lab == IGNORE_INDEX
        for lab, i in zip(enc["labels"], enc["input_ids"])
        if i == image_token_id(tok)
    )


def test_truncation_keeps_images_and_warns(tok):
    full = encode_conversation(conv2(), tok, num_image_tokens=20)
    with pytest.warns(UserWarning, match="truncated"):
        enc = encode_conversation(
            conv2(), tok, num_image_tokens=20, max_length=len(full["input_ids"]) - 5
        )
    assert enc["truncated"] and len(enc["input_ids"]) == len(full["input_ids"]) - 5
    assert enc["input_ids"].count(image_token_id(tok)) == 20
    assert enc["input_ids"] == full["input_ids"][:-5]  # the end of the last answer goes first
    # even a budget smaller than the prompt text keeps every image token
    with pytest.warns(UserWarning):
        enc = encode_conversation(conv2(), tok, num_image_tokens=20, max_length=25)
    assert len(enc["input_ids"]) == 25 and enc["input_ids"].count(image_token_id(tok)) == 20


def test_images_that_do_not_fit_raise(tok):
    with pytest.raises(TokenizeError, match="max_length 10"):
        encode_conversation(conv2(), tok, num_image_tokens=20, max_length=10)


def test_placeholder_count_must_match(tok):
    conv = conv2()
    conv["images"] = [1, 2]
    with pytest.raises(TokenizeError, match="1 <image> placeholder"):
        encode_conversation(conv, tok, 2)


def test_prompt_matches_training_prefix(tok):
    conv = conv2()
    enc = encode_conversation(conv, tok, 3)
    prompt = encode_prompt([conv["turns"][0]], tok, 3)
    assert enc["input_ids"][: len(prompt)] == prompt
    assert tok.decode(prompt).endswith("Q one? [/INST]")
    second = encode_prompt(conv["turns"], tok, 3)
    assert enc["input_ids"][: len(second)] == second


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate(tok, side):
    a = encode_conversation(conv2(), tok, 2)
    b = encode_conversation(build_conversation("vqa", example_study(), 0), tok, 2)
    a.update(images=[np.zeros((4, 4), np.uint8)], image_indices=[5], task="t")
    b.update(images=[np.ones((4, 4), np.uint8)], image_indices=[0], task="vqa")
    batch = collate([a, b], pad_id=tok.pad_token_id, padding_side=side)
    n = max(len(a["input_ids"]), len(b["input_ids"]))
    assert batch["input_ids"].shape == batch["labels"].shape == (2, n)
    short = int(np.argmin([len(a["input_ids"]), len(b["input_ids"])]))
    row, mask = batch["input_ids"][short], batch["attention_mask"][short]
    pad = row == tok.pad_token_id
    assert (pad == (mask == 0)).all() and pad.any()
    assert bool(pad[0]) == (side == "left") and bool(pad[-1]) == (side == "right")
    assert (batch["labels"][short][pad] == IGNORE_INDEX).all()
    assert batch["image_indices"] == [[5], [0]] and len(batch["images"]) == 2
    assert batch["images"][0].dtype == np.uint8 and batch["tasks"] == ["t", "vqa"]
    with pytest.raises(ValueError, match="padding_side"):
        collate([a], 0, "middle")
