"""The `paper` text path with Mistral-7B's real tokenizer (the SentencePiece model that the
``mistral-common`` wheel ships): template, BOS/EOS, ``<image>`` expansion to 361 positions, the
assistant-only loss mask, the inference prompt and the token budget of the card's conversations.

mistral-common's own chat encoder (``MistralTokenizer.v1``, the v0.1/v0.2 template) is the
reference the project's encoding is compared with, token for token.
"""

import copy
import warnings
from pathlib import Path

import pytest
from conftest import example_study

from cxrlib.config import load_preset
from cxrlib.constants import IGNORE_INDEX, IMAGE_TOKEN, SYSTEM_TEXT
from cxrlib.data.conversations import build_conversation
from cxrlib.data.iuxray import load_iu_reports
from cxrlib.data.tokenize import collate, encode_conversation, encode_prompt, user_text
from cxrlib.model.build import TokenIds
from cxrlib.tokenizer import tokenizer_from_sentencepiece

mistral_common = pytest.importorskip(
    "mistral_common",
    reason="mistral-common is not installed (pip install -e '.[dev]'): it ships Mistral-7B's "
    "tokenizer.model.v1 that these tests need",
)
from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage  # noqa: E402
from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: E402
from mistral_common.protocol.instruct.validator import ValidationMode  # noqa: E402
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer  # noqa: E402

MODEL_FILE = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
PAPER = load_preset("paper")
M = PAPER["projector"]["num_queries"]  # 361
MAX_LENGTH = PAPER["llm"]["max_length"]  # 4095


@pytest.fixture(scope="module")
def tok():
    return tokenizer_from_sentencepiece(MODEL_FILE)


@pytest.fixture(scope="module")
def reference():
    """mistral-common's chat encoders for the same file (the v1 template: Mistral-7B v0.1/v0.2):
    fine-tuning mode takes a chat that ends with an answer, test mode one that ends with a
    user message (a generation prompt)."""
    return {
        "train": MistralTokenizer.from_file(MODEL_FILE, mode=ValidationMode.finetuning),
        "prompt": MistralTokenizer.from_file(MODEL_FILE, mode=ValidationMode.test),
    }


def mistral_chat_ids(reference, users, answers, system_text=SYSTEM_TEXT):
    """Ids of the chat as mistral-common encodes it (system text in the first user message)."""
    messages = []
    for k, user in enumerate(users):
        messages.append(UserMessage(content=f"{system_text} {user}" if k == 0 else user))
        if k < len(answers):
            messages.append(AssistantMessage(content=answers[k]))
    request = ChatCompletionRequest(messages=messages)
    encoder = reference["train" if len(answers) == len(users) else "prompt"]
    return encoder.encode_chat_completion(request).tokens


def test_vocabulary_and_special_ids(tok):
    assert MODEL_FILE.is_file()
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) == 32001 and tok.convert_tokens_to_ids(IMAGE_TOKEN) == 32000
    assert tok.pad_token_id == 0  # <unk>: Mistral has no pad token
    ids = TokenIds(tok)  # what build_model reads from the tokenizer
    assert (ids.vocab_size, ids.image, ids.bos, ids.eos, ids.pad) == (32001, 32000, 1, 2, 0)
    # [INST] is plain text in v0.2 (three pieces), unlike the BPE of smoke/tiny
    assert tok.tokenize("[INST]") == ["▁[", "INST", "]"]


def test_conversation_matches_mistral_common_without_images(tok, reference):
    """The whole training sequence (prompt + answers + </s>) equals mistral-common's chat."""
    conv = build_conversation("cot_single", example_study(), 0)
    for t in conv["turns"]:  # mistral-common knows no <image>: compare the text around it
        t["user"] = t["user"].replace(IMAGE_TOKEN, "X")
    conv["images"] = []
    enc = encode_conversation(conv, tok, num_image_tokens=M)
    users = [t["user"] for t in conv["turns"]]
    answers = [t["assistant"] for t in conv["turns"]]
    expected = mistral_chat_ids(reference, users, answers)
    assert enc["input_ids"] == expected
    # the inference prompt of turn 1 is the request with one user message
    prompt = encode_prompt([{"user": users[0]}], tok, M, num_images=0)
    assert prompt == mistral_chat_ids(reference, users[:1], [])


def test_image_expansion_bos_eos_and_loss_mask(tok):
    conv = build_conversation("cot_single", example_study(), 0)
    enc = encode_conversation(conv, tok, num_image_tokens=M, max_length=MAX_LENGTH)
    ids, labels = enc["input_ids"], enc["labels"]
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids.count(image_id) == M == 361
    first = ids.index(image_id)
    assert ids[first : first + M] == [image_id] * M  # one contiguous block
    assert not enc["truncated"]
    # labels: exactly each answer's ids followed by </s>; everything else ignored
    targets = [t for t in labels if t != IGNORE_INDEX]
    expected = []
    for turn in conv["turns"]:
        expected += tok(turn["assistant"], add_special_tokens=False)["input_ids"] + [2]
    assert targets == expected
    assert ids.count(tok.eos_token_id) == 2 and ids[-1] == tok.eos_token_id
    assert tok.decode(targets, skip_special_tokens=True).endswith(conv["turns"][1]["assistant"])
    # the prompt of turn 1 is the training sequence up to its first target
    prompt = encode_prompt(conv["turns"][:1], tok, M, num_images=1)
    first_target = next(j for j, t in enumerate(labels) if t != IGNORE_INDEX)
    assert prompt == ids[:first_target]
    # turn 2 continues with the later-turn text as LocalBackend tokenizes it
    turn2 = tok(user_text(conv["turns"][1]["user"], first=False), add_special_tokens=False)
    after_eos = ids.index(tok.eos_token_id) + 1
    assert ids[after_eos : after_eos + len(turn2["input_ids"])] == turn2["input_ids"]
    batch = collate([enc], pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape == (1, len(ids))


def _study(current: str, prior: str, k: int) -> dict:
    """The example study with the given findings texts and k images in each of the two studies."""
    base = example_study()
    s = copy.deepcopy(base)
    s["findings_text"] = current
    s["images"] = [dict(base["images"][0], index=i) for i in range(k)]
    s["prior"]["findings_text"] = prior
    s["prior"]["images"] = [dict(base["prior"]["images"][0], index=10 + i) for i in range(k)]
    return s


def test_token_budget_of_multi_image_and_multi_study(tok):
    """Every IU findings section as the current study (the one before it as the prior), with the
    card's maximum of 5 images per study: how many conversations exceed 4,095 tokens."""
    reports = [r.findings for r in load_iu_reports()[0] if r.findings]
    assert len(reports) > 3000
    lengths = {}
    for task in ("cot_multi_image", "cot_multi_study"):
        convs = [
            build_conversation(task, _study(reports[i + 1], reports[i], 5), 0)
            for i in range(len(reports) - 1)
        ]
        lengths[task] = [len(encode_conversation(c, tok, M)["input_ids"]) for c in convs]
        image_tokens = (5 if task == "cot_multi_image" else 10) * M
        assert min(lengths[task]) > image_tokens
        longest = convs[max(range(len(convs)), key=lengths[task].__getitem__)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            enc = encode_conversation(longest, tok, M, max_length=MAX_LENGTH)
        assert enc["truncated"] == (max(lengths[task]) > MAX_LENGTH)
        assert enc["input_ids"].count(tok.convert_tokens_to_ids(IMAGE_TOKEN)) == image_tokens
        n_over = sum(n > MAX_LENGTH for n in lengths[task])
        print(
            f"{task} (5 images per study): {len(convs)} conversations, median "
            f"{sorted(lengths[task])[len(convs) // 2]} tokens, max {max(lengths[task])}, "
            f"over {MAX_LENGTH}: {n_over}"
        )
    # 5 images of one study leave more than half of the budget for text
    assert max(lengths["cot_multi_image"]) < MAX_LENGTH - 5 * M
    # 10 images take 3,610 positions: IU's short findings still fit, with little to spare
    assert max(lengths["cot_multi_study"]) > MAX_LENGTH - 200
