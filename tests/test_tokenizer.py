"""The BPE tokenizer keeps the special tokens whole and round-trips text."""

import pytest

from cxrlib.constants import IMAGE_TOKEN
from cxrlib.tokenizer import (
    MissingWeightsError,
    image_token_id,
    load_pretrained_tokenizer,
    load_tokenizer,
    train_bpe_tokenizer,
)
from cxrlib.utils import MissingArtifactError

TEXTS = [
    "The heart is normal in size. The lungs are clear.",
    "Small left pleural effusion. No pneumothorax.",
    "Mild cardiomegaly with pulmonary edema.",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS, vocab_size=300)


def test_special_tokens_have_mistral_ids(tokenizer):
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token_id == 3 and image_token_id(tokenizer) == 4


def test_image_and_chat_markers_stay_single_tokens(tokenizer):
    ids = tokenizer("[INST] radiology image: <image> Is it? [/INST]", add_special_tokens=False)
    tokens = tokenizer.convert_ids_to_tokens(ids.input_ids)
    assert tokens.count(IMAGE_TOKEN) == 1 and "[INST]" in tokens and "[/INST]" in tokens


def test_text_round_trips(tokenizer):
    text = "Small left pleural effusion. XXXX unseen-word 123!"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text


def test_save_and_load(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    again = load_tokenizer({"llm": {"hf_id": None}}, tmp_path)
    assert again("Mild cardiomegaly").input_ids == tokenizer("Mild cardiomegaly").input_ids


def test_missing_tokenizer_names_the_notebook(tmp_path):
    with pytest.raises(MissingArtifactError, match="02-backbones"):
        load_tokenizer({"llm": {"hf_id": None}}, tmp_path)


def test_missing_hub_tokenizer_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError, match="huggingface-cli download no-org/no-model"):
        load_pretrained_tokenizer("no-org/no-model")
