"""Inference: chain-of-thought reports, grounding and VQA, through one backend interface.

A request is a ``Chat``: the user turns (with ``<image>`` placeholders) and the images. A
``Backend`` answers every turn of a batch of chats, each turn conditioned on the model's own
earlier answers. Two backends exist:

- ``LocalBackend``: a checkpoint trained here (``cxrlib.model.load_trained``). The chain-of-thought
  second turn continues from the first turn's KV cache, so the images and turn 1 are not
  encoded again.
- ``OfficialBackend``: the released ``Deepnoid/M4CXR-TNNLS`` through ``transformers`` remote code,
  for users who have it in their local Hugging Face cache.

    >>> backend = LocalBackend.from_checkpoint(out / "phase2")
    >>> records = generate_reports(backend, test_studies, images, mode="single", cot=True)
    >>> records[0]["findings"], records[0]["report"]

Prompts come from ``cxrlib.data.conversations`` (the card's exact strings), so training and
inference cannot drift apart. The answers are read by ``cxrlib.answers`` (``parse_findings``,
``parse_grounding``, ...), which never raises on malformed model output. Used by notebooks 05-07.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoProcessor, GenerationConfig

from cxrlib.answers import parse_findings
from cxrlib.config import load_config
from cxrlib.constants import FRONTAL_VIEWS, IMAGE_TOKEN, SYSTEM_TEXT
from cxrlib.data.conversations import (
    report_user_turns,
)
from cxrlib.data.tokenize import encode_prompt, user_text
from cxrlib.model import M4CXR, ImageProcessor, check_image, check_image_content, load_trained
from cxrlib.model.m4cxr import SequenceTooLongError
from cxrlib.tokenizer import MissingWeightsError, missing_weights_message
from cxrlib.utils import default_dtype, resolve_device

OFFICIAL_ID = "Deepnoid/M4CXR-TNNLS"
MAX_IMAGES_PER_STUDY = 5  # the card: up to 5 images of one study


# ---------------------------------------------------------------------------------------------
# Requests and backends
# ---------------------------------------------------------------------------------------------
@dataclass
class Chat:
    """One conversation to answer.

    Attributes:
        turns: user strings in order; ``<image>`` placeholders only in the first.
        images: grayscale uint8 ``(H, W)`` arrays, one per placeholder, in order.
        meta: anything to carry along (study id, task, reference answers, ...).
        check_content: refuse images that cannot be radiographs (constant, almost uniform,
            noise) and warn on clipped or flat ones (``cxrlib.model.check_image_content``);
            False only to probe a model with such inputs on purpose.
    """

    turns: list[str]
    images: list[np.ndarray]
    meta: dict = field(default_factory=dict)
    check_content: bool = True

    def __post_init__(self):
        if not self.turns:
            raise ValueError("a Chat needs at least one user turn")
        n_placeholders = sum(t.count(IMAGE_TOKEN) for t in self.turns)
        if n_placeholders != len(self.images):
            raise ValueError(
                f"the chat has {n_placeholders} {IMAGE_TOKEN} placeholder(s) but "
                f"{len(self.images)} image(s); give one image per placeholder, in order"
            )
        if any(IMAGE_TOKEN in t for t in self.turns[1:]):
            raise ValueError(f"only the first turn may contain {IMAGE_TOKEN}")
        for i, image in enumerate(self.images):
            check = check_image_content if self.check_content else check_image
            check(image, f"image {i} of the chat")


@runtime_checkable
class Backend(Protocol):
    """Anything that answers chats turn by turn (greedy)."""

    name: str

    def answer(self, chats: Sequence[Chat], max_new_tokens: int) -> list[list[str]]:
        """Return, for each chat, the assistant's answer to every user turn."""
        ...


class LocalBackend:
    """A model trained with ``cxrlib`` (any preset), batched, with KV-cache reuse across turns.

    Args:
        model: an ``M4CXR`` (e.g. from ``load_trained``); its ``tokenizer`` attribute is used.
        cfg: the resolved preset (image preprocessing, default ``max_new_tokens``).
        batch_size: chats per forward pass.
        reuse_cache: continue later turns from the cache (True, the normal path) or re-encode
            images and earlier turns (False: slower, same output; for benchmarks and tests).
    """

    name = "local"

    def __init__(self, model: M4CXR, cfg: dict, batch_size: int = 8, reuse_cache: bool = True):
        if model.tokenizer is None:
            raise ValueError("the model has no tokenizer attached: build it with build_model")
        self.model, self.cfg, self.tokenizer = model, cfg, model.tokenizer
        self.processor = ImageProcessor(cfg)
        self.batch_size = batch_size
        self.reuse_cache = reuse_cache
        self.device = next(model.parameters()).device

    @classmethod
    def from_checkpoint(
        cls,
        directory: str | Path,
        device: str = "auto",
        batch_size: int | None = None,
        allow_incomplete: bool = False,
        **kw,
    ) -> LocalBackend:
        """Load ``directory`` (written by ``save_trained``) onto ``device`` (auto = cuda if any).

        An early-stopped stage (``--max-steps``) is refused unless ``allow_incomplete``.
        """
        model = load_trained(
            directory, device=resolve_device(device), allow_incomplete=allow_incomplete
        )
        cfg = load_config(directory)
        return cls(model, cfg, batch_size or cfg["inference"]["batch_size"], **kw)

    # -- helpers -------------------------------------------------------------------------------
    def _turn_ids(self, text: str) -> list[int]:
        """A later user turn exactly as training tokenizes it (``[INST] {user} [/INST]``)."""
        return list(
            self.tokenizer(user_text(text, first=False), add_special_tokens=False)["input_ids"]
        )

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        pad = self.model.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return ids.to(self.device), mask.to(self.device)

    def prompt_ids(self, chat: Chat) -> list[int]:
        """Turn-1 prompt ids (system text, images expanded), checked against ``llm.max_length``."""
        ids = encode_prompt(
            [{"user": chat.turns[0]}], self.tokenizer, self.model.num_image_tokens, len(chat.images)
        )
        if len(ids) > self.model.max_length:
            raise SequenceTooLongError(
                f"the prompt of chat {chat.meta or ''} has {len(ids)} tokens, more than "
                f"llm.max_length = {self.model.max_length}"
            )
        return ids

    # -- the interface -------------------------------------------------------------------------
    @torch.no_grad()
    def answer(self, chats: Sequence[Chat], max_new_tokens: int | None = None) -> list[list[str]]:
        """Answer every turn of every chat (batched; chats are grouped by number of turns)."""
        max_new_tokens = max_new_tokens or self.cfg["inference"]["max_new_tokens"]
        prompts = [self.prompt_ids(c) for c in chats]  # all length checks before any compute
        answers: list[list[str]] = [[] for _ in chats]
        by_turns: dict[int, list[int]] = {}
        for i, c in enumerate(chats):
            by_turns.setdefault(len(c.turns), []).append(i)
        for group in by_turns.values():
            for start in range(0, len(group), self.batch_size):
                idx = group[start : start + self.batch_size]
                out = self._answer_batch(
                    [chats[i] for i in idx], [prompts[i] for i in idx], max_new_tokens
                )
                for i, a in zip(idx, out):
                    answers[i] = a
        return answers

    def _answer_batch(
        self, chats: list[Chat], prompts: list[list[int]], max_new_tokens: int
    ) -> list[list[str]]:
        images = [im for c in chats for im in c.images]
        pixel_values = self.processor(images).to(self.device) if images else None
        ids, mask = self._left_pad(prompts)
        result = self.model.generate(ids, mask, pixel_values, max_new_tokens=max_new_tokens)
        history = [list(p) for p in prompts]  # full token history, for the re-encoding path
        answers = [[self._decode(t)] for t in result.token_lists()]
        for turn in range(1, len(chats[0].turns)):
            new = [self._turn_ids(c.turns[turn]) for c in chats]
            if self.reuse_cache:
                ids, mask = self._left_pad(new)
                result = self.model.generate(ids, mask, max_new_tokens=max_new_tokens, past=result)
            else:  # everything again: images, turn 1, the answer, the new turn
                for h, gen, n in zip(history, result.token_lists(), new):
                    h += gen + [self.model.eos_token_id] + n
                ids, mask = self._left_pad(history)
                result = self.model.generate(ids, mask, pixel_values, max_new_tokens=max_new_tokens)
            for a, t in zip(answers, result.token_lists()):
                a.append(self._decode(t))
        return answers

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


class OfficialBackend:
    """The released M4CXR (``Deepnoid/M4CXR-TNNLS``) from the local Hugging Face cache.

    Loads it the way the release documents inference: ``AutoProcessor`` and
    ``AutoModelForCausalLM`` with ``trust_remote_code=True`` (the checkpoint ships its own model
    and processor code), its ``GenerationConfig`` switched to greedy decoding, prompts rendered by
    the processor's chat template, and images handed to the processor as RGB PIL images (its own
    resizing and normalisation). Always ``local_files_only=True``: nothing is ever downloaded.

    The card prepends the system text to the first user turn; this class adds it unless the
    processor's chat template already does. Every turn is generated from the whole history
    (earlier answers included), one chat at a time: the remote code offers no KV-cache reuse
    across turns. ``tests/test_official_backend.py`` runs the class against a small fake
    remote-code checkpoint with the same loading surface; the real checkpoint has not been run
    by this project (it is not on its machines).

    Args:
        hf_id: the hub id or a local directory (default ``Deepnoid/M4CXR-TNNLS``).
        device: ``auto`` (cuda if present), ``cpu`` or ``cuda``.
        dtype: weights' dtype; default bf16 on GPU (as the release documents), fp32 on CPU.

    Raises:
        MissingWeightsError: the checkpoint is not in the local cache (message says how to get it).
    """

    name = "official"

    def __init__(
        self, hf_id: str = OFFICIAL_ID, device: str = "auto", dtype: torch.dtype | None = None
    ):
        self.device = resolve_device(device)
        self.dtype = dtype or default_dtype(self.device)
        kw = {"trust_remote_code": True, "local_files_only": True}
        try:
            self.processor = AutoProcessor.from_pretrained(hf_id, **kw)
            self.model = AutoModelForCausalLM.from_pretrained(
                hf_id, dtype=self.dtype, device_map=str(self.device), **kw
            )
        except OSError as err:
            raise MissingWeightsError(missing_weights_message(hf_id)) from err
        self.model.eval()
        self.generation_config = _greedy_generation_config(hf_id, self.model)
        probe = self.processor.apply_chat_template(
            [{"role": "user", "content": "?"}], tokenize=False
        )
        self.template_adds_system_text = SYSTEM_TEXT in probe

    @torch.no_grad()
    def answer(self, chats: Sequence[Chat], max_new_tokens: int = 500) -> list[list[str]]:
        """Answer every turn of every chat, greedy, at most ``max_new_tokens`` per answer."""
        out = []
        for chat in chats:
            images = [Image.fromarray(im).convert("RGB") for im in chat.images]
            messages, answers = [], []
            for k, user in enumerate(chat.turns):
                first = k == 0 and not self.template_adds_system_text
                messages.append(
                    {"role": "user", "content": f"{SYSTEM_TEXT} {user}" if first else user}
                )
                prompt = self.processor.apply_chat_template(messages, tokenize=False)
                reply = self._generate(prompt, images, max_new_tokens)
                messages.append({"role": "assistant", "content": reply})
                answers.append(reply)
            out.append(answers)
        return out

    def _generate(self, prompt: str, images: list, max_new_tokens: int) -> str:
        """One prompt (with all the chat's images) through the processor and ``generate``."""
        inputs = self.processor(
            text=[prompt], images=[images] if images else None, return_tensors="pt"
        )
        inputs = {
            k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype)
            if torch.is_tensor(v)
            else v
            for k, v in inputs.items()
        }
        config = copy.deepcopy(self.generation_config)
        config.max_new_tokens = max_new_tokens
        output = self.model.generate(**inputs, generation_config=config)[0]
        prompt_ids = inputs["input_ids"][0]
        n = prompt_ids.shape[0]
        # decoder-only generate returns prompt + new tokens; some remote models only the new ones
        if output.shape[0] >= n and torch.equal(output[:n].to(prompt_ids.device), prompt_ids):
            output = output[n:]
        return self.processor.batch_decode(output[None], skip_special_tokens=True)[0].strip()


def _greedy_generation_config(hf_id: str, model) -> GenerationConfig:
    """The release's ``generation_config.json`` (or the model's own) with sampling turned off:
    the paper's evaluation decodes greedily."""
    try:
        config = GenerationConfig.from_pretrained(hf_id, local_files_only=True)
    except OSError:  # a checkpoint without generation_config.json
        config = copy.deepcopy(model.generation_config)
    # sampling-only settings would only make transformers warn once sampling is off
    config.update(do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None)
    return config


def run_chats(
    backend: Backend,
    chats: Sequence[Chat],
    max_new_tokens: int | None = None,
    chunk_size: int = 64,
    progress: bool = True,
    desc: str = "generating",
) -> list[list[str]]:
    """Answer many chats with a progress bar (the backend batches inside each chunk).

    Returns:
        For each chat, the answers to its turns.
    """
    out: list[list[str]] = []
    bar = tqdm(total=len(chats), desc=desc, disable=not progress)
    for start in range(0, len(chats), chunk_size):
        chunk = chats[start : start + chunk_size]
        if max_new_tokens is None:
            out += backend.answer(chunk)
        else:
            out += backend.answer(chunk, max_new_tokens)
        bar.update(len(chunk))
    bar.close()
    return out


# ---------------------------------------------------------------------------------------------
# Prompts (from cxrlib.data.conversations: one copy of every string)
# ---------------------------------------------------------------------------------------------
def report_chat(
    images: Sequence[np.ndarray],
    cot: bool = True,
    prior_images: Sequence[np.ndarray] = (),
    prior_report: str | None = None,
    meta: dict | None = None,
) -> Chat:
    """Report generation: one image, several images of one study, or prior + follow-up studies.

    Args:
        images: the (current) study's images, at most 5.
        cot: chain of thought (turn 1 asks for the 13 findings, turn 2 for the report) or the
            direct single-turn prompt.
        prior_images, prior_report: the prior study (multi-study mode) when given.
    """
    images = list(images)
    if prior_images or prior_report:
        mode = "multi_study"
    else:
        mode = "single" if len(images) == 1 else "multi_image"
    turns = report_user_turns(mode, len(images), prior_report, len(prior_images), cot=cot)
    return Chat(turns, list(prior_images) + images, dict(meta or {}, mode=mode, cot=cot))


def conversation_chat(conv: dict, images: np.ndarray) -> Chat:
    """A Chat from a conversation of ``cxrlib.data.conversations`` (its answers go to ``meta``).

    Args:
        conv: a conversation dict (``task``, ``images``, ``turns``, ``meta``).
        images: the dataset's ``images.npy`` array (N, H, W).
    """
    meta = dict(conv.get("meta", {}))
    meta.update(task=conv["task"], references=[t.get("assistant") for t in conv["turns"]])
    return Chat([t["user"] for t in conv["turns"]], [images[i] for i in conv["images"]], meta)


def run_conversations(
    backend: Backend,
    conversations: Sequence[dict],
    images: np.ndarray,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Answer conversations (grounding, VQA, classification, ...) and keep their references.

    Returns:
        One record per conversation: ``task``, ``meta``, ``prompts``, ``references`` (the
        conversation's own answers) and ``predictions`` (the model's, turn by turn).
    """
    chats = [conversation_chat(c, images) for c in conversations]
    answers = run_chats(backend, chats, max_new_tokens, progress=progress, desc="conversations")
    return [
        {
            "task": c["task"],
            "meta": c.get("meta", {}),
            "prompts": [t["user"] for t in c["turns"]],
            "references": [t.get("assistant") for t in c["turns"]],
            "predictions": a,
        }
        for c, a in zip(conversations, answers)
    ]


# ---------------------------------------------------------------------------------------------
# Report generation over studies
# ---------------------------------------------------------------------------------------------
REPORT_MODES = ("single", "multi_image", "multi_study")


def report_requests(
    study: dict, images: np.ndarray, mode: str = "single", cot: bool = True
) -> list[Chat]:
    """The report chats of one study record (``studies.jsonl``) in a given input mode.

    ``single``: one chat per image; ``multi_image``: one chat with the study's images (up to 5);
    ``multi_study``: prior images + prior report, then the study's images; a study without a
    prior falls back to ``multi_image`` (``meta["fallback"] = True``), as the card's protocol.
    A multi-image request of a one-image study is a single-image request.
    """
    if mode not in REPORT_MODES:
        raise ValueError(f"unknown report mode '{mode}': choose from {', '.join(REPORT_MODES)}")
    recs = study.get("images", [])
    if not recs:
        return []
    base = {"study_id": study["study_id"], "reference": study.get("findings_text", "")}
    if mode == "single":
        return [
            report_chat(
                [images[r["index"]]],
                cot,
                meta=dict(base, image_indices=[r["index"]], views=[r["view"]], fallback=False),
            )
            for r in recs
        ]
    current = recs[:MAX_IMAGES_PER_STUDY]
    meta = dict(
        base,
        image_indices=[r["index"] for r in current],
        views=[r["view"] for r in current],
        fallback=False,
    )
    prior = study.get("prior")
    if mode == "multi_study" and prior and prior.get("images") and prior.get("findings_text"):
        prior_recs = prior["images"][:MAX_IMAGES_PER_STUDY]
        meta["prior_image_indices"] = [r["index"] for r in prior_recs]
        return [
            report_chat(
                [images[r["index"]] for r in current],
                cot,
                prior_images=[images[r["index"]] for r in prior_recs],
                prior_report=prior["findings_text"].strip(),
                meta=meta,
            )
        ]
    meta["fallback"] = mode == "multi_study"
    return [report_chat([images[r["index"]] for r in current], cot, meta=meta)]


def generate_reports(
    backend: Backend,
    studies: Sequence[dict],
    images: np.ndarray,
    mode: str = "single",
    cot: bool = True,
    frontal_only: bool = False,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Generate Findings sections for studies, CoT or direct, in one of the three input modes.

    Args:
        backend: a ``Backend`` (``LocalBackend`` / ``OfficialBackend``).
        studies: study records (``studies.jsonl``), e.g. the test split.
        images: the ``images.npy`` array.
        mode: ``single``, ``multi_image`` or ``multi_study`` (see ``report_requests``).
        cot: two-turn chain of thought (True) or the direct prompt.
        frontal_only: ``single`` mode only: skip lateral images.
        max_new_tokens: default the preset's ``inference.max_new_tokens``.

    Returns:
        One record per request: ``study_id``, ``mode``, ``cot``, ``image_indices``, ``views``,
        ``fallback``, ``reference``, ``findings_text`` (turn-1 answer or None), ``findings``
        (parsed list or None if malformed), ``report`` (the final answer).
    """
    without = [s["study_id"] for s in studies if not s.get("images")]
    if without:  # report_requests makes no chat for them: say so, never shrink the set silently
        warnings.warn(f"{len(without)} of {len(studies)} studies have no images and are left out "
                      f"of {mode} report generation (e.g. {', '.join(without[:3])})", stacklevel=2)  # fmt: skip
    chats = [c for s in studies for c in report_requests(s, images, mode, cot)]
    if frontal_only and mode == "single":
        chats = [c for c in chats if c.meta["views"][0] in FRONTAL_VIEWS]
    answers = run_chats(backend, chats, max_new_tokens, progress=progress, desc=f"{mode} reports")
    records = []
    for chat, ans in zip(chats, answers):
        turn1 = ans[0] if cot else None
        records.append(
            {
                **{k: v for k, v in chat.meta.items() if k != "cot"},
                "cot": cot,
                "findings_text": turn1,
                "findings": parse_findings(turn1) if cot else None,
                "report": ans[-1],
            }
        )
    return records
