"""Text-only instruction conversations: the skills Mistral-7B-Instruct brings, taught from text.

M4CXR starts phase 1 from an LLM that already follows instructions, writes numbers and brackets,
answers yes/no and conditions a later turn on an earlier one. The small LLM of ``tiny`` learns
only report prose in notebook 02 (IU report text has about 300 digits in 640k characters), and
phase 2 trains only LoRA on q/v in it, so it cannot learn those skills there (issue 14).

This module makes the stand-in's missing skills out of text alone: every phase-2 task's
conversation of a *training* study (``cxrlib.data.conversations.build_conversation``, the card's
prompt strings), with each ``<image>`` replaced by that image's findings **written in words**
(``describe_image``: view, positive findings with location, severity and box, the organ boxes).
The model learns the answer formats (``"cardiomegaly, pleural effusion."``, ``"[12,3,42,80]."``,
``"Not present."``, ``"yes"``) and to read them off what precedes, and turn 2 to write the
report that turn 1's findings call for. Phases 1 and 2 then only have to teach it to read the
same facts from image tokens instead of words, as in the paper.

    convs = text_conversations(studies, n=4000, seed=0)            # training split only
    rows = packed_instruction_rows(convs, tokenizer, seq_len=128)  # (N, 128) token ids

Used by ``cxrlib.backbones.lm_pretrain_stage`` (``train.lm_pretrain.text_instructions``, ``tiny``
only: ``paper`` starts from Mistral-7B-Instruct, which has these skills).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from cxrlib.constants import (
    COT_FINDINGS,
    FRONTAL_VIEWS,
    IMAGE_TOKEN,
    MIXTURE_TASKS,
    POSITIVE,
    REPORT_SOURCES,
    UNCERTAIN,
)
from cxrlib.data.boxes import format_box
from cxrlib.data.conversations import (
    LABEL_OF,
    NOT_FOUND,
    build_conversation,
    cot_answer,
    finding_boxes,
    finding_name,
    location_answer,
    organ_boxes,
    rare_finding_repeats,
    report_user_turns,
)
from cxrlib.data.tokenize import cut_into_rows, encode_conversation, user_text

# Tasks whose answer is fully determined by the written description (every phase-2 task is).
# Tasks are drawn uniformly, so the list is fixed: the multi-image and multi-study direct prompts
# added for notebook 08's no-CoT arms would otherwise change the `tiny` corpus and every model.
TEXT_TASKS = (*MIXTURE_TASKS, "report_only", "direct_report")


class TextInstructionError(ValueError):
    """A conversation whose images cannot be described (an image index not in the studies)."""


def describe_image(record: dict, image: dict) -> str:
    """One image's content in words, e.g.
    ``"PA view; cardiomegaly, mild, at [38,50,76,71]; left lung at [56,10,93,76]; ..."``.

    Args:
        record: the study (or a study's ``prior``) the image belongs to: ``labels``, ``findings``.
        image: the image record (``view``, ``hw``, ``finding_boxes``, ``organ_boxes``).
    """
    parts = [f"{image['view'] if image['view'] in FRONTAL_VIEWS else 'lateral'} view"]
    labels = record.get("labels", {})
    boxes = finding_boxes(image) if image["view"] in FRONTAL_VIEWS else {}
    attributes = {f["observation"]: f for f in record.get("findings", [])}
    named = False
    for name, label in LABEL_OF.items():
        if name == "no finding":
            continue
        status = labels.get(label)
        if status == POSITIVE:
            words = [name]
            finding = attributes.get(label, {})
            if (loc := location_answer(finding)) is not None:
                words.append(loc)
            if finding.get("severity"):
                words.append(finding["severity"])
            text = ", ".join(words)
            if label in boxes:
                text += " at " + ", ".join(format_box(b) for b in boxes[label])
            parts.append(text)
            named = True
        elif status == UNCERTAIN:
            parts.append(f"possible {finding_name(label)}")
    if not named:
        parts.append("no abnormality")
    if image["view"] in FRONTAL_VIEWS:
        parts += [f"{organ} at {format_box(box)}" for organ, box in organ_boxes(image).items()]
    return "; ".join(parts)


def image_checklist(record: dict, image: dict) -> list[str]:
    """One image's findings as a fixed-slot list of words: the view, then one word per CoT finding
    in the card's order (its name if positive, ``"possible"`` if uncertain, ``"no"`` otherwise),
    e.g. ``["PA", "no", "cardiomegaly", "no", ...]``. Slot ``k`` always means the same finding,
    unlike ``describe_image``, where a finding's position depends on the words before it."""
    view = image["view"] if image["view"] in FRONTAL_VIEWS else "lateral"
    labels = record.get("labels", {})
    words = {POSITIVE: None, UNCERTAIN: "possible"}
    return [view] + [
        (words[labels[LABEL_OF[f]]] or f) if labels.get(LABEL_OF[f]) in words else "no"
        for f in COT_FINDINGS
    ]


def image_records(study: dict) -> dict[int, tuple[dict, dict]]:
    """image index -> (the record whose labels describe it, the image record)."""
    out = {im["index"]: (study, im) for im in study.get("images", [])}
    prior = study.get("prior") or {}
    out.update({im["index"]: (prior, im) for im in prior.get("images", [])})
    return out


# What stands in a text conversation where the image was (``train.lm_pretrain.image_words``).
IMAGE_WORDS = ("facts", "none")
INSTRUCTION_PACKING = ("cut", "whole")
NEUTRAL_IMAGE = "(image)"


def to_text_conversation(conv: dict, study: dict, image_words: str = "facts") -> dict:
    """``conv`` with each ``<image>`` of its user turns replaced, in order, by the words of the
    image it stands for (``describe_image``; ``image_words="facts"``) or by the neutral
    ``"(image)"`` (``"none"``: the answer formats and the prior, no facts to copy); ``images``
    becomes empty."""
    if image_words not in IMAGE_WORDS:
        raise TextInstructionError(f"image_words '{image_words}': use one of {IMAGE_WORDS}")
    records = image_records(study)
    try:
        described = [records[i] for i in conv["images"]]
    except KeyError as err:
        raise TextInstructionError(f"image {err} of a {conv['task']} conversation is not in study "
                                   f"{study['study_id']}") from err  # fmt: skip
    words = iter([f"({describe_image(*r)})" if image_words == "facts" else NEUTRAL_IMAGE
                  for r in described])  # fmt: skip
    turns = []
    for turn in conv["turns"]:
        pieces = turn["user"].split(IMAGE_TOKEN)
        user = pieces[0] + "".join(next(words) + p for p in pieces[1:])
        turns.append({**turn, "user": user})
    return {**conv, "images": [], "turns": turns, "meta": {**conv.get("meta", {}), "text": True}}


def text_conversations(
    studies: Sequence[dict],
    n: int,
    seed: int,
    tasks: Sequence[str] = TEXT_TASKS,
    image_words: str = "facts",
    weights: Mapping[str, float] | None = None,
) -> list[dict]:
    """``n`` text-only conversations of training-split studies, tasks drawn uniformly among those
    a drawn study supports (so rare tasks such as grounding get as much text as reports), or in
    proportion to ``weights`` (task -> weight; a task not named keeps weight 1).

    Never uses a validation or test study: the held-out evaluation stays unseen.
    """
    train = [s for s in studies if s["split"] == "train"]
    if n and not train:
        raise ValueError("no training-split studies to write text instructions from (notebook 01)")
    unknown = sorted(set(weights or {}) - set(tasks))
    if unknown:
        raise TextInstructionError(f"text instruction weights name unknown tasks {unknown}; "
                                   f"tasks are {list(tasks)}")  # fmt: skip
    p = np.array([float((weights or {}).get(t, 1.0)) for t in tasks])
    if (p < 0).any() or p.sum() <= 0:
        raise TextInstructionError(f"text instruction weights must be >= 0, not all 0: {weights}")
    p = p / p.sum()
    rng = np.random.default_rng(seed)
    out: list[dict] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n:
            raise ValueError(f"only {len(out)} of {n} text conversations could be built")
        study = train[int(rng.integers(len(train)))]
        task = (
            tasks[int(rng.choice(len(tasks), p=p))]
            if weights
            else tasks[int(rng.integers(len(tasks)))]
        )
        conv = build_conversation(task, study, rng)
        if conv is not None:
            out.append(to_text_conversation(conv, study, image_words))
    return out


def packed_instruction_rows(
    conversations: Sequence[dict],
    tokenizer,
    seq_len: int,
    max_length: int = 4096,
    packing: str = "cut",
) -> torch.Tensor:
    """The conversations in the card's chat format (``cxrlib.data.tokenize``, system text
    included, ``</s>`` after each answer) as rows of ``seq_len`` ids.

    ``packing="cut"`` concatenates them and cuts rows anywhere, as ``cxrlib.backbones.PackedText``
    does for report text. ``"whole"`` puts whole conversations into rows (first fit, in order)
    and fills the rest with ``<pad>`` (``collate_rows`` gives padding no loss), so a turn-2
    answer is always learnt with its turn 1 in view; conversations longer than ``seq_len`` are
    left out (counted in the warning).
    """
    if packing not in INSTRUCTION_PACKING:
        raise TextInstructionError(f"packing '{packing}': use one of {INSTRUCTION_PACKING}")
    encoded = [encode_conversation(conv, tokenizer, 1, max_length)["input_ids"]  # no <image>
               for conv in conversations]  # fmt: skip
    if packing == "cut":
        return cut_into_rows([t for row in encoded for t in row], seq_len, "conversations")
    fitting = [row for row in encoded if len(row) <= seq_len]
    if len(fitting) < len(encoded):
        warnings.warn(f"{len(encoded) - len(fitting)} of {len(encoded)} text conversations are "
                      f"longer than seq_len {seq_len} and were left out", stacklevel=2)  # fmt: skip
    if not fitting:
        raise ValueError(f"no text conversation fits in a row of {seq_len} tokens")
    rows: list[list[int]] = []
    for conv_ids in fitting:
        row = next((r for r in rows if len(r) + len(conv_ids) <= seq_len), None)
        if row is None:
            rows.append(row := [])
        row += conv_ids
    pad = tokenizer.pad_token_id
    return torch.tensor([r + [pad] * (seq_len - len(r)) for r in rows])


def findings_report_rows(
    studies: Sequence[dict],
    tokenizer,
    seq_len: int,
    abnormal_repeats: int = 1,
    rare_finding_power: float = 0.0,
) -> torch.Tensor:
    """The training reports as the tail of a CoT conversation, packed and cut like report text:
    ``<s>{turn-1 answer}</s>[INST] {turn-2 question} [/INST]{Findings}</s>``.

    The turn-1 answer is the study's own CoT answer (its labels), so every report the LM reads is
    preceded by the findings it names: the skill turn 2 needs (write the report that the findings
    of turn 1 call for). Plain packed reports never show that link and whole CoT conversations
    show it once per ~200 tokens (docs/recipe-log.md E5). IU / MIMIC-CXR training studies only;
    a study with a positive finding appears ``abnormal_repeats`` times (class balance: 71% of the
    IU training reports name none, and the link lives in the others), times its rare-finding
    factor (``rare_finding_repeats`` at ``rare_finding_power``: a report that names edema is as
    rare a lesson as an edema image, docs/recipe-log.md E14).
    """
    turn2 = user_text(report_user_turns("single", 1, cot=True)[1], first=False)
    turn2_ids = list(tokenizer(turn2, add_special_tokens=False)["input_ids"])
    reports = [
        s for s in studies
        if s["split"] == "train" and s["source"] in REPORT_SOURCES
        and (s.get("findings_text") or "").strip()
    ]  # fmt: skip
    rarity = rare_finding_repeats(reports, rare_finding_power)
    ids: list[int] = []
    for s, rare in zip(reports, rarity):
        text = s["findings_text"].strip()
        answer_text = cot_answer(s["labels"])
        answer = tokenizer(answer_text, add_special_tokens=False)["input_ids"]
        report = tokenizer(text, add_special_tokens=False)["input_ids"]
        repeats = abnormal_repeats * rare if answer_text != NOT_FOUND else 1
        ids += repeats * [tokenizer.bos_token_id, *answer, tokenizer.eos_token_id, *turn2_ids,
                          *report, tokenizer.eos_token_id]  # fmt: skip
    return cut_into_rows(ids, seq_len, "findings and reports")


class InstructionRows(Dataset):
    """Packed rows of token ids (``packed_instruction_rows``) as a dataset of rows, the item
    type of ``cxrlib.backbones.PackedText``, so both mix in one ``ConcatDataset``."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows[i]


def with_text_instructions(train_set: Dataset, studies, tokenizer, section: dict, seed: int):
    """``train_set`` (packed report text) plus ``section["text_instructions"]`` text-only
    conversations packed into rows of ``section["seq_len"]``; unchanged when that is 0/absent."""
    n = int(section.get("text_instructions", 0) or 0)
    if n <= 0:
        return train_set
    convs = text_conversations(studies, n, seed, image_words=section.get("image_words", "facts"),
                               weights=section.get("text_instruction_weights"))  # fmt: skip
    rows = packed_instruction_rows(convs, tokenizer, section["seq_len"],
                                   packing=section.get("instruction_packing", "cut"))  # fmt: skip
    return ConcatDataset([train_set, InstructionRows(rows)])
