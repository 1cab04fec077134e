"""Conversation -> token ids and loss labels (Mistral chat format), and batch collation.

The card's template, with the system text only in the first turn::

    <s>[INST] {SYSTEM_TEXT} {user} [/INST]{assistant}</s>[INST] {user} [/INST]{assistant}</s>

Each ``<image>`` in a user turn becomes ``num_image_tokens`` copies of the image token id (the
model writes the projector's outputs there). Labels are ``IGNORE_INDEX`` (-100) everywhere except
on assistant tokens and the ``</s>`` that closes each answer, so the loss teaches answering only.

    enc = encode_conversation(conv, tokenizer, num_image_tokens=16, max_length=512)
    batch = collate([enc, enc2], pad_id=tokenizer.pad_token_id, padding_side="right")

Truncation (when the sequence is longer than ``max_length``) drops TEXT tokens from the end and
never an image token: a cut image would misalign the projector outputs. If the images alone do
not fit, ``TokenizeError`` says so. A truncation sets ``truncated=True`` and warns.

Each piece (user turn, assistant turn) is tokenized separately so the label boundary is exact;
``encode_prompt`` uses the same pieces, so inference prompts match training token for token.
Introduced in notebook 01.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from cxrlib.constants import IGNORE_INDEX, IMAGE_TOKEN, INST_CLOSE, INST_OPEN, SYSTEM_TEXT


def cut_into_rows(ids: Sequence[int], seq_len: int, what: str = "text") -> torch.Tensor:
    """``ids`` cut into ``(n, seq_len)`` rows (packing: no padding; the tail that does not fill a
    row is dropped). ``what`` names the tokens in the error when not one row fills."""
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"{len(ids)} tokens of {what} do not fill one row of {seq_len}")
    return torch.tensor(list(ids[: n * seq_len])).view(n, seq_len)


class TokenizeError(ValueError):
    """A conversation that cannot be encoded (image count mismatch, images longer than max)."""


def _image_token_id(tokenizer) -> int:
    tid = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if tid is None or tid == tokenizer.unk_token_id:
        raise TokenizeError(
            f"the tokenizer has no {IMAGE_TOKEN} token: use cxrlib.tokenizer.train_bpe_tokenizer "
            f"or load_pretrained_tokenizer, which add it"
        )
    return tid


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def user_text(user: str, first: bool, system_text: str = SYSTEM_TEXT) -> str:
    """``[INST] {system} {user} [/INST]`` (system text only in the first turn)."""
    body = f"{system_text} {user}" if first and system_text else user
    return f"{INST_OPEN} {body} {INST_CLOSE}"


def _pieces(turns, tokenizer, system_text):
    """(ids, is_target) pieces; the last turn may have no assistant (a generation prompt)."""
    pieces = [([tokenizer.bos_token_id], False)]
    for i, turn in enumerate(turns):
        pieces.append((_ids(tokenizer, user_text(turn["user"], i == 0, system_text)), False))
        answer = turn.get("assistant")
        if answer is None:
            if i != len(turns) - 1:
                raise TokenizeError(f"turn {i} has no assistant text but is not the last turn")
            break
        if IMAGE_TOKEN in answer:
            raise TokenizeError(f"assistant text of turn {i} contains {IMAGE_TOKEN}")
        pieces.append((_ids(tokenizer, answer) + [tokenizer.eos_token_id], True))
    return pieces


def _expand(pieces, image_id: int, num_image_tokens: int, num_images: int):
    """Expand image placeholders; returns ids, labels, image mask."""
    ids, labels, is_image = [], [], []
    found = 0
    for piece, target in pieces:
        for t in piece:
            if t == image_id:
                found += 1
                ids += [image_id] * num_image_tokens
                labels += [IGNORE_INDEX] * num_image_tokens
                is_image += [True] * num_image_tokens
            else:
                ids.append(t)
                labels.append(t if target else IGNORE_INDEX)
                is_image.append(False)
    if found != num_images:
        raise TokenizeError(
            f"the text has {found} {IMAGE_TOKEN} placeholder(s) but the conversation lists "
            f"{num_images} image(s); they must match one to one"
        )
    return ids, labels, is_image


def encode_conversation(
    conv: dict,
    tokenizer,
    num_image_tokens: int,
    max_length: int | None = None,
    system_text: str = SYSTEM_TEXT,
) -> dict:
    """Token ids and labels of a conversation in the Mistral chat format.

    Args:
        conv: a conversation dict (``task``, ``images``, ``turns``, ``meta``).
        tokenizer: a tokenizer with ``<s>``, ``</s>`` and ``<image>`` (``cxrlib.tokenizer``).
        num_image_tokens: positions per image (``projector.num_queries``).
        max_length: longest allowed sequence (``llm.max_length``); None = no limit.
        system_text: prepended to the first user turn (the card's system text).

    Returns:
        ``{"input_ids": list[int], "labels": list[int], "num_images": int, "truncated": bool}``.

    Raises:
        TokenizeError: placeholder count differs from ``conv["images"]``, or the image tokens
            alone exceed ``max_length``.
    """
    if num_image_tokens < 1:
        raise TokenizeError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    if not conv.get("turns"):
        raise TokenizeError("a conversation needs at least one turn")
    image_id = _image_token_id(tokenizer)
    num_images = len(conv.get("images", []))
    pieces = _pieces(conv["turns"], tokenizer, system_text)
    if not pieces[-1][1]:
        raise TokenizeError("the last turn has no assistant text; use encode_prompt for prompts")
    ids, labels, is_image = _expand(pieces, image_id, num_image_tokens, num_images)
    truncated = False
    if max_length is not None and len(ids) > max_length:
        n_image = sum(is_image)
        if n_image > max_length:
            raise TokenizeError(
                f"{num_images} image(s) x {num_image_tokens} tokens = {n_image} > max_length "
                f"{max_length}: raise llm.max_length or use fewer images / projector.num_queries"
            )
        budget, kept_text = max_length - n_image, 0
        keep = []
        for j, img in enumerate(is_image):  # all image tokens, then text from the start
            if img or kept_text < budget:
                keep.append(j)
                kept_text += not img
        ids = [ids[j] for j in keep]
        labels = [labels[j] for j in keep]
        truncated = True
        warnings.warn(
            f"conversation of task '{conv.get('task')}' truncated to {max_length} tokens "
            f"(text cut, images kept)",
            stacklevel=2,
        )
    return {"input_ids": ids, "labels": labels, "num_images": num_images, "truncated": truncated}


def encode_prompt(
    turns: Sequence[dict],
    tokenizer,
    num_image_tokens: int,
    num_images: int | None = None,
    system_text: str = SYSTEM_TEXT,
) -> list[int]:
    """Ids of a generation prompt: earlier turns complete, the last user turn open (``[/INST]``).

    Args:
        turns: ``[{"user": ..., "assistant": ...}, ..., {"user": ...}]``; the last turn's
            assistant is absent or None.
        tokenizer, num_image_tokens, system_text: as in ``encode_conversation``.
        num_images: expected ``<image>`` count (checked when given).
    """
    turns = [dict(t) for t in turns]
    if not turns:
        raise TokenizeError("a prompt needs at least one user turn")
    turns[-1]["assistant"] = None
    image_id = _image_token_id(tokenizer)
    pieces = _pieces(turns, tokenizer, system_text)
    if num_images is None:
        num_images = sum(t == image_id for piece, _ in pieces for t in piece)
    ids, _, _ = _expand(pieces, image_id, num_image_tokens, num_images)
    return ids


def collate(batch: Sequence[dict], pad_id: int, padding_side: str = "right") -> dict:
    """Pad encoded conversations into tensors.

    Args:
        batch: items of ``encode_conversation`` (optionally with ``image_indices``, ``images``
            (uint8 arrays), ``task``, ``meta`` as ``ConversationDataset`` adds them).
        pad_id: the tokenizer's pad id (for input_ids; labels pad with ``IGNORE_INDEX``).
        padding_side: ``right`` for training, ``left`` for batched generation.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` (LongTensor ``(B, L)``), ``truncated`` (bool
        tensor), ``image_indices`` (list per item); plus ``images`` (all images of the batch in
        placeholder order, a flat list of uint8 arrays), ``tasks`` and ``meta`` when present.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not batch:
        raise ValueError("collate got an empty batch")
    length = max(len(item["input_ids"]) for item in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for i, item in enumerate(batch):
        n = len(item["input_ids"])
        sl = slice(length - n, length) if padding_side == "left" else slice(0, n)
        ids[i, sl] = torch.as_tensor(item["input_ids"], dtype=torch.long)
        labels[i, sl] = torch.as_tensor(item.get("labels", [IGNORE_INDEX] * n), dtype=torch.long)
        mask[i, sl] = 1
    out = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "truncated": torch.tensor([bool(item.get("truncated", False)) for item in batch]),
        "image_indices": [list(item.get("image_indices", [])) for item in batch],
    }
    if all("images" in item for item in batch):
        out["images"] = [im for item in batch for im in item["images"]]
    for key, name in (("task", "tasks"), ("meta", "meta")):
        if all(key in item for item in batch):
            out[name] = [item[key] for item in batch]
    return out
