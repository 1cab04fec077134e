"""What the small presets train their backbones with: corpora, datasets, objectives, probes.

``paper`` starts from Mistral-7B-Instruct-v0.2 and Rad-DINO. No such weights exist at ``tiny`` or
``smoke`` size, so notebook 02 makes stand-ins from this project's own data, training split only.
The stages themselves are in ``cxrlib.phases``; this module holds their ingredients:

* tokenizer: the IU findings and impressions (``report_corpus``) plus the card's fixed prompt
  and answer strings (``prompt_strings``), so that an instruction does not fall apart into single
  bytes (which would make every phase-2 sequence much longer);
* small Mistral: packed report text (``PackedText``; what Mistral-7B brings to M4CXR is fluent
  language, ours learns radiology sentences), optionally with lines of random boxes because report
  text has almost no digits (``box_corpus``, ``train.lm_pretrain.box_texts``); ``sample_text``
  shows what it learnt;
* small DINOv2: PhantomCXR images with masked-patch prediction (the masked-token half of DINOv2's
  objective, with a pixel target as in SimMIM because there is no teacher) plus a light
  multi-label head on the 13 findings (``MaskedPatchPretrainer``, ``evaluate_encoder``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import Dataset

from cxrlib.answers import parse_findings
from cxrlib.constants import (
    COT_FINDINGS,
    IGNORE_INDEX,
    LABEL_OF,
    NOTEBOOKS,
    ORGANS,
    POSITIVE,
    REPORT_SOURCES,
    SYSTEM_TEXT,
)
from cxrlib.data import conversations as C
from cxrlib.data.boxes import format_boxes
from cxrlib.data.datasets import load_datasets
from cxrlib.data.text_instructions import to_text_conversation
from cxrlib.data.tokenize import cut_into_rows, encode_conversation, encode_prompt
from cxrlib.engine import causal_lm_loss
from cxrlib.evaluate import agreement_counts
from cxrlib.utils import require_artifact

# --- data -------------------------------------------------------------------------------------


def read_studies(out_dir: str | Path) -> list[dict]:
    """The study records notebook 01 saved in ``<out>/data/studies.jsonl``."""
    path = require_artifact(Path(out_dir) / "data" / "studies.jsonl", made_by=NOTEBOOKS["data"])
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_images(out_dir: str | Path):
    """All images of the dataset, indexable ``(N, H, W)`` uint8: ``images.npy`` memory-mapped
    (the synthetic data), or the lazy file store of a real dataset (``image_files.json``)."""
    data = Path(out_dir) / "data"
    if not (data / "images.npy").exists() and (data / "image_files.json").exists():
        return load_datasets(data).images
    path = require_artifact(data / "images.npy", made_by=NOTEBOOKS["data"])
    return np.load(path, mmap_mode="r")


def report_corpus(
    studies: Sequence[dict],
    split: str = "train",
    sources: Sequence[str] | None = REPORT_SOURCES,
    sections: Sequence[str] = ("findings_text", "impression"),
) -> list[str]:
    """Findings and impressions (``sections``) of one split's studies (one string each, empty
    ones skipped), from the sources with written reports (IU X-ray, MIMIC-CXR; not the synthetic
    longitudinal follow-ups); ``sources=None`` takes every study."""
    texts = []
    for s in studies:
        if s["split"] == split and (sources is None or s["source"] in sources):
            texts += [t.strip() for t in (s.get(k) for k in sections) if t]
    return [t for t in texts if t]


def prompt_strings() -> list[str]:
    """The card's fixed instruction strings (placeholders filled with every value they take)."""
    out = [SYSTEM_TEXT, C.NOT_FOUND, C.NOT_PRESENT, C.MULTI_STUDY_NOTE, C.ABNORMALITY_Q]
    for target in ("radiology image", "radiology images", "current follow-up radiology images"):
        out += [
            C.COT_QUESTION.format(target=target, findings=C.FINDINGS_LIST),
            C.COT_TURN2.format(target=target),
            C.DIRECT_QUESTION.format(target=target),
        ]
    for finding in COT_FINDINGS:
        out += [
            C.SINGLE_DISEASE_Q.format(finding=finding),
            C.FINDING_GROUNDING_Q.format(finding=finding),
        ]
    out += [C.MULTI_FINDING_Q.format(findings=C.FINDINGS_LIST)]
    out += [C.ORGAN_GROUNDING_Q.format(organ=organ) for organ in ORGANS]
    for template in (C.GROUNDED_FINDING_Q, C.GROUNDED_ORGAN_Q, C.GROUNDED_PHRASE_Q):
        out.append(template.format(bbox="").strip())
    out += [C.PHRASE_GROUNDING_Q.format(phrase=""), C.VQA_Q.format(question="")]
    out += [C.DIFF_VQA_Q.format(question="")]
    out += [q.format(finding="finding") for q in C.VQA_QUESTIONS.values()]
    out += [q.format(finding="finding") for q in C.DIFF_VQA_QUESTIONS.values()]
    # Short answers, so that their words are single tokens too.
    out += ["Yes.", "No.", "Uncertain.", C.NO_CHANGE, C.NO_ABNORMALITY, *C.VIEW_ANSWERS.values()]
    out += [*C.CHANGE_WORDS.values(), *ORGANS, *COT_FINDINGS]
    return out


def box_corpus(n: int, seed: int) -> list[str]:
    """``n`` lines of 1-3 random boxes in the card's text format, e.g. ``"[12,3,42,80]."``.

    Mistral-7B learnt to write numbers from web text; IU report text has almost none (about 300
    digits and one "[" in the 640k characters of the training split), so without these lines the
    small LM's digit embeddings and output rows stay near their random start and phase 2, which
    trains only LoRA on q/v in the LLM, cannot teach it to write a box. The boxes are random:
    they teach the number syntax, nothing about any image.
    """
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        boxes = []
        for _ in range(rng.integers(1, 4)):
            x1, y1 = rng.integers(0, 90, size=2)
            x2, y2 = x1 + rng.integers(5, 101 - x1), y1 + rng.integers(5, 101 - y1)
            boxes.append([int(x1), int(y1), int(x2), int(y2)])
        lines.append(format_boxes(boxes) + ".")
    return lines


# --- language model -------------------------------------------------------------------------


class PackedText(Dataset):
    """Report texts as ``<s> text </s>`` concatenated and cut into rows of ``seq_len`` tokens.

    Packing wastes no compute on padding; a row may start mid-report, which is harmless for a
    causal LM (it learns to continue from whatever context it has).
    """

    def __init__(self, texts: Sequence[str], tokenizer, seq_len: int):
        ids: list[int] = []
        for row in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
            ids += [tokenizer.bos_token_id, *row, tokenizer.eos_token_id]
        self.rows = cut_into_rows(ids, seq_len, "text")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows[i]


def collate_rows(rows: list[torch.Tensor], pad_id: int | None = None) -> dict:
    """Stack packed rows; positions holding ``pad_id`` (rows of whole conversations,
    ``cxrlib.data.text_instructions``) get no loss."""
    ids = torch.stack(rows)
    labels = ids if pad_id is None else ids.masked_fill(ids == pad_id, IGNORE_INDEX)
    return {"input_ids": ids, "labels": labels}


def lm_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss of a causal LM on a packed batch (see ``cxrlib.engine.causal_lm_loss``)."""
    return causal_lm_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])


@torch.no_grad()
def sample_text(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 40,
    temperature: float = 0.0,
    top_k: int = 20,
    seed: int = 0,
) -> list[str]:
    """Continue each prompt with the LM (greedy when ``temperature`` is 0, else top-k sampling).

    Args:
        model: a causal LM (``MistralForCausalLM``).
        prompts: text beginnings, e.g. ``"The heart"``; ``<s>`` is prepended.
        seed: seeds the sampling without touching the caller's random state.

    Returns:
        The prompts with their continuations, up to the first ``</s>``.
    """
    device = model_device(model)
    sampling = temperature > 0
    options = dict(temperature=temperature, top_k=top_k) if sampling else {}
    was_training = model.training
    model.eval()
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for prompt in prompts:
            ids = [
                tokenizer.bos_token_id,
                *tokenizer(prompt, add_special_tokens=False)["input_ids"],
            ]
            generated = model.generate(
                torch.tensor([ids], device=device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                max_new_tokens=max_new_tokens,
                do_sample=sampling,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **options,
            )[0].tolist()
            text = generated[1:]
            if tokenizer.eos_token_id in text:
                text = text[: text.index(tokenizer.eos_token_id)]
            out.append(tokenizer.decode(text, skip_special_tokens=True).strip())
    model.train(was_training)
    return out


def turn2_dependence(lm: nn.Module, tokenizer, studies: Sequence[dict], n: int = 120,
                     image_words: str = "none", max_new_tokens: int = 100) -> dict:  # fmt: skip
    """Does the LM's CoT turn 2 follow turn 1? Measured from text alone on the first ``n``
    validation IU / MIMIC-CXR studies: the CoT single conversation in words (the image as
    ``"(image)"`` by default, so turn 1 is the only source of findings), turn 1 = the study's
    true findings.

    Returns ``nll_gain`` (mean nats that the true turn 1 saves on the report against turn 1 =
    "Not found.", over studies with a finding), and on greedy reports ``distinct_reports``,
    ``turn1_named`` / ``turn1_in_report`` (turn-1 findings the labeler finds positive in the
    report) and ``report_positive`` / ``report_in_turn1``.
    """
    device = model_device(lm)

    def report_nll(conv: dict) -> float:
        enc = encode_conversation(conv, tokenizer, 1)
        labels = list(enc["labels"])
        end = labels.index(tokenizer.eos_token_id)  # the </s> closing turn 1: no loss up to it
        labels[: end + 1] = [IGNORE_INDEX] * (end + 1)
        logits = lm(torch.tensor([enc["input_ids"]], device=device)).logits
        return causal_lm_loss(logits, torch.tensor([labels], device=device))[0].item()

    was_training = lm.training
    lm.eval()
    rng = np.random.default_rng(0)
    held_out = [s for s in studies if s["split"] == "val" and s["source"] in REPORT_SOURCES]
    gains, reports, turn1_findings = [], [], []
    with torch.no_grad():
        for study in held_out[:n]:
            conv = C.build_conversation("cot_single", study, rng)
            if conv is None:
                continue
            conv = to_text_conversation(conv, study, image_words)
            turn1 = conv["turns"][0]["assistant"]
            if turn1 != C.NOT_FOUND:
                blind = {**conv, "turns": [{**conv["turns"][0], "assistant": C.NOT_FOUND},
                                           conv["turns"][1]]}  # fmt: skip
                gains.append(report_nll(blind) - report_nll(conv))
            ids = encode_prompt(
                [conv["turns"][0], {"user": conv["turns"][1]["user"]}], tokenizer, 1, 0
            )
            out = lm.generate(torch.tensor([ids], device=device),
                              attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                              max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()  # fmt: skip
            if tokenizer.eos_token_id in out:
                out = out[: out.index(tokenizer.eos_token_id)]
            reports.append(tokenizer.decode(out, skip_special_tokens=True).strip())
            turn1_findings.append(parse_findings(turn1))
    lm.train(was_training)
    counts = agreement_counts(turn1_findings, reports)
    return {"studies": len(reports), "studies_with_finding": len(gains),
            "nll_gain": float(np.mean(gains)) if gains else None,
            "distinct_reports": len(set(reports)), **counts, "example_reports": reports[:3]}  # fmt: skip


# --- vision encoder ---------------------------------------------------------------------------


def label_vector(labels: dict) -> list[float]:
    """The 13 CoT findings of a study as 0/1 (positive only, as the CoT answer counts them)."""
    return [float(labels.get(LABEL_OF[name]) == POSITIVE) for name in COT_FINDINGS]


class EncoderImages(Dataset):
    """Every image of one split's studies with the study's 13 finding labels."""

    def __init__(self, studies: Sequence[dict], images: np.ndarray, processor, split: str):
        self.items = [
            (im["index"], label_vector(s["labels"]))
            for s in studies
            if s["split"] == split
            for im in s["images"]
        ]
        if not self.items:
            raise ValueError(f"no images in split '{split}': rebuild the data (notebook 01)")
        self.images, self.processor = images, processor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[np.ndarray, list[float]]:
        index, labels = self.items[i]
        return np.asarray(self.images[index]), labels


class MaskedPatchPretrainer(nn.Module):
    """DINOv2 encoder + two small heads for pre-training; only the encoder is kept afterwards.

    Objective per image: hide ``mask_ratio`` of the patches behind DINOv2's mask token and regress
    their pixels (normalised per ``target_norm``) from the last block's output (SimMIM / MAE), plus
    ``label_weight`` x a multi-label BCE of the 13 findings from the mean patch feature.
    Features are read before the final LayerNorm, where the C-Abstractor reads them.
    The three settings come from ``train.encoder_pretrain`` (their defaults live in
    ``cxrlib.config.EncoderPretrainStage``).
    """

    def __init__(
        self, encoder: nn.Module, *, mask_ratio: float, label_weight: float, target_norm: str
    ):
        super().__init__()
        if target_norm not in ("patch", "image"):
            raise ValueError(f"target_norm must be 'patch' or 'image', not {target_norm!r}")
        self.encoder = encoder
        width, patch = encoder.config.hidden_size, encoder.config.patch_size
        self.patch = patch
        self.pixel_head = nn.Linear(width, patch * patch)
        self.label_head = nn.Linear(width, len(COT_FINDINGS))
        self.mask_ratio, self.label_weight, self.target_norm = mask_ratio, label_weight, target_norm

    def patch_targets(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, P, patch^2) grey patches (channel 0), per patch standardised if ``target_norm``
        is "patch", else as the processor normalised the image."""
        p = self.patch
        x = pixel_values[:, 0].unfold(1, p, p).unfold(2, p, p)  # (B, gh, gw, p, p)
        x = x.reshape(x.shape[0], -1, p * p).float()
        if self.target_norm == "image":
            return x
        return (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6).sqrt()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> dict:
        batch = pixel_values.shape[0]
        targets = self.patch_targets(pixel_values)
        num_patches = targets.shape[1]
        # Random masks from the global RNG: restored by a resume, so resumed runs stay exact.
        scores = torch.rand(batch, num_patches, device=pixel_values.device)
        k = max(1, int(round(self.mask_ratio * num_patches)))
        mask = torch.zeros_like(scores, dtype=torch.bool)
        mask.scatter_(1, scores.topk(k, dim=1).indices, True)
        out = self.encoder(
            pixel_values=pixel_values, bool_masked_pos=mask, output_hidden_states=True
        )
        patches = out.hidden_states[-1][:, 1:]
        err = (self.pixel_head(patches).float() - targets).pow(2).mean(-1)  # (B, P)
        mim = (err * mask).sum(1) / mask.sum(1)  # per image, masked patches only
        logits = self.label_head(patches.mean(1)).float()
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1)
        return {
            "mim": mim,
            "bce": bce,
            "logits": logits,
            "per_image": mim + self.label_weight * bce,
        }


def encoder_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    per_image = model(batch["pixel_values"], batch["labels"])["per_image"]
    return per_image.sum(), torch.tensor(per_image.shape[0])


class ImageBatchCollate:
    """Preprocess a list of (image, labels) with the preset's ``ImageProcessor``."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, items):
        pixels = self.processor([im for im, _ in items])
        return {"pixel_values": pixels, "labels": torch.tensor([lab for _, lab in items])}


@torch.no_grad()
def evaluate_encoder(model: MaskedPatchPretrainer, dataset, collate, batch_size: int) -> dict:
    """Validation masked-patch loss, label BCE and macro AUROC of the finding head."""
    device = model_device(model)
    model.eval()
    mim, bce, scores, labels = [], [], [], []
    state = torch.get_rng_state()
    torch.manual_seed(0)  # the same masks for every evaluation
    for k in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(k, min(k + batch_size, len(dataset)))])
        out = model(batch["pixel_values"].to(device), batch["labels"].to(device))
        mim.append(out["mim"].cpu())
        bce.append(out["bce"].cpu())
        scores.append(out["logits"].cpu())
        labels.append(batch["labels"])
    torch.set_rng_state(state)
    y, s = torch.cat(labels).numpy(), torch.cat(scores).numpy()
    present = [j for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
    auc = float(np.mean([roc_auc_score(y[:, j], s[:, j]) for j in present])) if present else None
    return {
        "masked_patch_loss": float(torch.cat(mim).mean()),
        "label_bce": float(torch.cat(bce).mean()),
        "label_macro_auroc": auc,
    }


# --- helpers ------------------------------------------------------------------------------------


def model_device(model: nn.Module) -> torch.device:
    """The device of a module's first parameter."""
    return next(model.parameters()).device
