"""The training stages of M4CXR, one function each, all built on ``cxrlib.engine.train``.

* ``tokenizer_stage``, ``lm_pretrain_stage``, ``encoder_pretrain_stage`` (notebook 02): the small
  presets make their own tokenizer, small Mistral and small DINOv2 (``cxrlib.backbones``);
  ``paper`` only checks that Mistral-7B and Rad-DINO are in the local Hugging Face cache.
* ``phase1_stage`` (notebook 03): the C-Abstractor alone learns image -> Findings; the encoder
  is frozen, so its features are computed once (``cxrlib.data.features``).
* ``phase2_stage`` (notebook 04): LoRA + projector + encoder on the multi-task mixture.

Every stage has the signature ``(cfg, out_dir, resume, max_steps, device) -> summary`` and writes
into ``stage_dir(stage, out_dir)``; ``cxrlib.train.run_stage`` picks one by name.
"""

from __future__ import annotations

import functools
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import snapshot_download
from tokenizers import pre_tokenizers
from torch import nn
from torch.utils.data import ConcatDataset

from cxrlib import engine
from cxrlib.backbones import (
    EncoderImages,
    ImageBatchCollate,
    MaskedPatchPretrainer,
    PackedText,
    box_corpus,
    collate_rows,
    encoder_loss,
    evaluate_encoder,
    lm_loss,
    prompt_strings,
    read_images,
    read_studies,
    report_corpus,
)
from cxrlib.config import (
    EncoderPretrainStage,
    LMPretrainStage,
    Phase1Stage,
    Phase2Stage,
    with_defaults,
)
from cxrlib.constants import COT_FINDINGS, FRONTAL_VIEWS, MIXTURE_TASKS, NOTEBOOKS
from cxrlib.data.batches import ConversationCollate, Phase1Pairs
from cxrlib.data.datasets import ConversationDataset, load_datasets
from cxrlib.data.features import cached_features, encoder_features
from cxrlib.data.text_instructions import (
    InstructionRows,
    describe_image,
    findings_report_rows,
    image_checklist,
    image_records,
    with_text_instructions,
)
from cxrlib.model import (
    ImageProcessor,
    build_encoder,
    build_llm,
    build_model,
    count_parameters,
    load_trained_weights,
    save_trained,
    set_trainable,
    upcast_trainable,
)
from cxrlib.tokenizer import (
    MissingWeightsError,
    load_tokenizer,
    missing_weights_message,
    train_bpe_tokenizer,
)
from cxrlib.utils import require_artifact, seed_everything

PROMPT_REPEATS = 20  # weight of the fixed prompt strings in the tokenizer corpus
VAL_PER_TASK = 32  # validation conversations per task in phase 2 (default of val_per_task)
NOTEBOOK_OF_STAGE = {  # the notebook that runs each stage (named in missing-artifact messages)
    "tokenizer": NOTEBOOKS["backbones"],
    "lm_pretrain": NOTEBOOKS["backbones"],
    "encoder_pretrain": NOTEBOOKS["backbones"],
    "phase1": NOTEBOOKS["phase1"],
    "phase2": NOTEBOOKS["phase2"],
}


def stage_dir(stage: str, out_dir: str | Path) -> Path:
    """Where a stage writes: ``tokenizer/``, ``backbones/llm``, ``backbones/encoder``, ``phase1``..."""
    out_dir = Path(out_dir)
    return {
        "tokenizer": out_dir / "tokenizer",
        "lm_pretrain": out_dir / "backbones" / "llm",
        "encoder_pretrain": out_dir / "backbones" / "encoder",
        "phase1": out_dir / "phase1",
        "phase2": out_dir / "phase2",
    }[stage]


# What each stage is built from (beyond its own settings), and the file that stands for each.
STAGE_INPUTS = {
    "tokenizer": ("data",),
    "lm_pretrain": ("data", "tokenizer"),
    "encoder_pretrain": ("data",),
    "phase1": ("data", "tokenizer", "lm_pretrain", "encoder_pretrain"),
    "phase2": ("data", "tokenizer", "lm_pretrain", "encoder_pretrain", "phase1"),
}
ARTIFACT_FILES = {
    "data": ("data/studies.jsonl", "data/images.npy"),
    "tokenizer": ("tokenizer/tokenizer.json",),
    "lm_pretrain": ("backbones/llm/model.safetensors",),
    "encoder_pretrain": ("backbones/encoder/model.safetensors",),
    "phase1": ("phase1/trained.safetensors",),
}


def stage_identity(cfg: dict, stage: str, out_dir: str | Path) -> dict:
    """What a stage's result is made of: its settings and the content of every upstream artifact.

    Stored with each checkpoint (``cxrlib.engine.train``), so retraining phase 1, the tokenizer,
    a backbone or the data makes every later stage train afresh instead of resuming stale weights.
    Artifacts a preset loads from the hub (``paper``) are ``"absent"``; their ids are in the config.
    """
    out_dir = Path(out_dir)
    inputs = {
        name: "+".join(engine.file_hash(out_dir / f) for f in ARTIFACT_FILES[name])
        for name in STAGE_INPUTS[stage]
    }
    return {"config": engine.config_hash(cfg, stage), "inputs": inputs}


def _train_stage(cfg: dict, stage: str, out_dir: Path, model, dataset, collate, loss, hp, **kw):
    """``engine.train`` with what every stage passes: seed, checkpointing, logging, identity."""
    lower = hp.lr / 2
    hint = (
        f"`python -m cxrlib.train --stage {stage} --preset {cfg.get('name', 'tiny')} "
        f'--set train.{stage}.lr={lower:.3g}` (in a notebook: OVERRIDES="train.{stage}.lr={lower:.3g}")'
    )
    return engine.train(
        model, dataset, collate, loss, hp, stage_dir(stage, out_dir),
        seed=cfg["seed"], checkpoint_every=cfg["train"]["checkpoint_every"],
        log_every=cfg["train"]["log_every"], desc=stage,
        identity=stage_identity(cfg, stage, out_dir), rerun_hint=hint, **kw,
    )  # fmt: skip


def _stage_setup(cfg: dict, stage: str, device, num_processes: int | None = None):
    """The stage's hyper-parameters and an Accelerator with the matching accumulation."""
    hp = engine.HParams.from_section(cfg["train"][stage], stage)
    world = num_processes or engine.process_count(device)
    return hp, engine.build_accelerator(device, hp.accumulation(world))


def _backbones_dir(cfg: dict, out_dir: Path) -> Path | None:
    """``<out>/backbones`` for presets that pre-train their own; None when both come from the hub."""
    if cfg["encoder"]["hf_id"] and cfg["llm"]["hf_id"]:
        return None
    return out_dir / "backbones"


# --- backbones of the small presets (notebook 02) ---------------------------------------------


def check_cached(hf_id: str) -> Path:
    """The local snapshot folder of ``hf_id``; ``MissingWeightsError`` (with the fix) if absent."""
    try:
        return Path(snapshot_download(hf_id, local_files_only=True))
    except Exception as err:  # LocalEntryNotFoundError, or no cache at all
        raise MissingWeightsError(missing_weights_message(hf_id)) from err


def _pretrained_summary(cfg: dict, part: str, stage: str) -> dict:
    hf_id = cfg[part]["hf_id"]
    path = check_cached(hf_id)
    return {"stage": stage, "pretrained": hf_id, "path": str(path), "trained": False}


def tokenizer_stage(cfg: dict, out_dir: Path, resume=True, max_steps=None, device="auto") -> dict:
    """Train (``tiny``/``smoke``) or check (``paper``) the tokenizer; saves ``<out>/tokenizer``."""
    target = stage_dir("tokenizer", out_dir)
    if cfg["llm"]["hf_id"]:
        tok = load_tokenizer(cfg)  # MissingWeightsError with the download command if absent
        tok.save_pretrained(str(target))
        engine.save_run_info(cfg, target)
        return {"stage": "tokenizer", "pretrained": cfg["llm"]["hf_id"], "vocab_size": len(tok)}
    t0 = time.perf_counter()
    texts = report_corpus(read_studies(out_dir))
    # Every text is learnt, and later encoded, with a leading space, as SentencePiece does for
    # Mistral: the data layer encodes each answer on its own, and without the space an answer's
    # first word ("support devices.") would fall apart into rare pieces ("s", "u", "pport")
    # instead of the word token the LLM knows from mid-sentence (" support").
    corpus = [" " + t for t in texts + prompt_strings() * PROMPT_REPEATS]
    tok = train_bpe_tokenizer(
        corpus, cfg["llm"]["vocab_size"], cfg["train"]["tokenizer"].get("min_frequency", 2)
    )
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    if len(tok) != cfg["llm"]["vocab_size"]:
        # Too little text for the requested vocabulary: the LLM's embedding table must match.
        raise ValueError(
            f"the report corpus gives only {len(tok)} BPE tokens, fewer than llm.vocab_size "
            f"{cfg['llm']['vocab_size']}: lower llm.vocab_size or use more studies"
        )
    tok.save_pretrained(str(target))
    engine.save_run_info(cfg, target)
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    summary = {
        "stage": "tokenizer",
        "vocab_size": len(tok),
        "texts": len(texts),
        "tokens": int(sum(lengths)),
        "tokens_per_text": float(np.mean(lengths)),
        "seconds": time.perf_counter() - t0,
    }
    return engine.write_summary(target, summary)


def stage_tokenizer(cfg: dict, out_dir: str | Path):
    """The tokenizer a later stage uses: Mistral's (``paper``) or notebook 02's BPE."""
    if cfg["llm"]["hf_id"]:
        return load_tokenizer(cfg)
    path = stage_dir("tokenizer", out_dir)
    require_artifact(path / "tokenizer.json", made_by=NOTEBOOKS["backbones"])
    return load_tokenizer(cfg, path)


def lm_pretrain_stage(cfg, out_dir: Path, resume=True, max_steps=None, device="auto") -> dict:
    """Pre-train the small Mistral on report text; saves ``<out>/backbones/llm``."""
    if cfg["llm"]["hf_id"]:
        return _pretrained_summary(cfg, "llm", "lm_pretrain")
    target = stage_dir("lm_pretrain", out_dir)
    section = with_defaults(cfg["train"]["lm_pretrain"], LMPretrainStage)
    hp = engine.HParams.from_section(section, "lm_pretrain")
    tokenizer = stage_tokenizer(cfg, out_dir)
    studies = read_studies(out_dir)
    box_texts = box_corpus(section["box_texts"], cfg["seed"])
    if section["report_corpus"] == "findings_then_report":
        # each Findings section after its own turn-1 answer (the skill turn 2 needs); the
        # impressions stay plain text
        impressions = report_corpus(studies, "train", sections=("impression",))
        train_set = ConcatDataset([
            InstructionRows(findings_report_rows(studies, tokenizer, section["seq_len"],
                                                 section["abnormal_repeats"],
                                                 section["rare_finding_power"])),
            PackedText(impressions + box_texts, tokenizer, section["seq_len"]),
        ])  # fmt: skip
    else:
        train_set = PackedText(report_corpus(studies, "train") + box_texts, tokenizer,
                               section["seq_len"])  # fmt: skip
    # + text-only instruction conversations (train.lm_pretrain.text_instructions): the skills
    # Mistral-7B-Instruct brings (boxes, yes/no, question formats), from text alone
    train_set = with_text_instructions(train_set, studies, tokenizer, section, cfg["seed"])
    val_set = PackedText(report_corpus(studies, "val"), tokenizer, section["seq_len"])  # reports
    collate = functools.partial(collate_rows, pad_id=tokenizer.pad_token_id)
    seed_everything(cfg["seed"])
    model = build_llm(cfg, tokenizer, pretrained=False)
    engine.save_run_info(cfg, target)
    result = _train_stage(
        cfg,
        "lm_pretrain",
        out_dir,
        model,
        train_set,
        collate,
        lm_loss,
        hp,
        count_fn=engine.count_target_tokens,
        device=device,
        resume=resume,
        max_steps=max_steps,
    )
    model = result.model
    model.save_pretrained(str(target))  # also after max_steps: later stages can be tried out
    val = engine.evaluate_loss(
        model, val_set, collate_rows, lm_loss, hp.micro_batch, device=_model_device(model)
    )
    summary = {
        "stage": "lm_pretrain",
        **result.to_dict(),
        "train_rows": len(train_set),
        "val_loss": val["all"],
        "val_perplexity": float(np.exp(val["all"])),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return engine.write_summary(target, summary)


def encoder_pretrain_stage(cfg, out_dir: Path, resume=True, max_steps=None, device="auto") -> dict:
    """Pre-train the small DINOv2 on PhantomCXR images; saves ``<out>/backbones/encoder``."""
    if cfg["encoder"]["hf_id"]:
        return _pretrained_summary(cfg, "encoder", "encoder_pretrain")
    target = stage_dir("encoder_pretrain", out_dir)
    hp = engine.HParams.from_section(cfg["train"]["encoder_pretrain"], "encoder_pretrain")
    studies, images = read_studies(out_dir), read_images(out_dir)
    processor = ImageProcessor(cfg)
    train_set = EncoderImages(studies, images, processor, "train")
    val_set = EncoderImages(studies, images, processor, "val")
    collate = ImageBatchCollate(processor)
    seed_everything(cfg["seed"])
    section = with_defaults(cfg["train"]["encoder_pretrain"], EncoderPretrainStage)
    model = MaskedPatchPretrainer(
        build_encoder(cfg, pretrained=False),
        mask_ratio=section["mask_ratio"],
        label_weight=section["label_weight"],
        target_norm=section["target_norm"],
    )
    engine.save_run_info(cfg, target)
    result = _train_stage(
        cfg,
        "encoder_pretrain",
        out_dir,
        model,
        train_set,
        collate,
        encoder_loss,
        hp,
        device=device,
        resume=resume,
        max_steps=max_steps,
    )
    model = result.model
    model.encoder.save_pretrained(str(target))
    probe = evaluate_encoder(model, val_set, collate, hp.micro_batch)
    summary = {
        "stage": "encoder_pretrain",
        **result.to_dict(),
        "train_images": len(train_set),
        **{f"val_{k}": v for k, v in probe.items()},
        "parameters": sum(p.numel() for p in model.encoder.parameters()),
    }
    return engine.write_summary(target, summary)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# --- the two M4CXR phases (notebooks 03 and 04) ----------------------------------------------


def multimodal_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss on assistant tokens of M4CXR batches (pixels or cached features)."""
    out = model(
        batch["input_ids"],
        batch["attention_mask"],
        pixel_values=batch.get("pixel_values"),
        features=batch.get("features"),
    )
    return engine.causal_lm_loss(out.logits, batch["labels"])


@torch.no_grad()
def match_image_token_scale(model, features: torch.Tensor) -> float:
    """Bring the projector's output to the LLM's word-embedding length (small presets only; see
    ``CAbstractor.match_output_norm`` for why). Returns the factor applied."""
    target = model.llm.get_input_embeddings().weight.float().norm(dim=-1).mean()
    return model.projector.match_output_norm(features, target)


def _word_vector(model, word: str) -> torch.Tensor:
    """The mean input embedding of ``word``'s tokens (as it is written after a space)."""
    embeddings = model.llm.get_input_embeddings().weight.detach()
    ids = model.tokenizer(f" {word}", add_special_tokens=False)["input_ids"]
    return embeddings[torch.tensor(ids, device=embeddings.device)].float().mean(0)


def word_alignment_targets(model, records: list[tuple[dict, dict]], kind: str) -> torch.Tensor:
    """What each image's tokens are regressed onto: ``(images, image tokens, LLM width)``.

    ``kind``: ``description``: token ``k`` is the input embedding of the ``k``-th token of the
    image's ``describe_image`` text (the words the small LLM learnt to read in its text
    instructions), padded with the last token. ``checklist``: the first tokens are the
    ``image_checklist`` slots (the view, then one per CoT finding: its name's mean embedding,
    ``possible`` or ``no``), the rest the description's first tokens.

    Why a checklist (``tiny``, docs/recipe-log.md E12): in a description the ``k``-th token is a
    different word from image to image (it depends on the findings before it), so squared error
    regresses most tokens to an average word; after phase 1 the image tokens, decoded to their
    nearest words, named cardiomegaly and lung opacity and no other finding, even on training
    images. A slot that always means the same finding only has to say yes or no.
    """
    embeddings = model.llm.get_input_embeddings().weight.detach()
    m = model.num_image_tokens
    if kind not in ("description", "checklist"):
        raise ValueError(f"align_target must be 'description' or 'checklist', got {kind!r}")
    slots = 1 + len(COT_FINDINGS)
    if kind == "checklist" and m < slots:
        raise ValueError(
            f"align_target 'checklist' needs at least {slots} image tokens (the view and "
            f"{len(COT_FINDINGS)} findings), the projector makes {m}: raise "
            "projector.num_queries or set train.phase1.align_target: description"
        )
    word_vector = {}
    rows = []
    for record, image in records:
        text = f"({describe_image(record, image)})"
        ids = list(model.tokenizer(text, add_special_tokens=False)["input_ids"])
        description = embeddings[torch.tensor((ids + ids[-1:] * m)[:m], device=embeddings.device)]
        if kind == "description":
            rows.append(description.float())
            continue
        words = image_checklist(record, image)
        for w in words:
            if w not in word_vector:
                word_vector[w] = _word_vector(model, w)
        checklist = torch.stack([word_vector[w] for w in words])
        rows.append(torch.cat([checklist, description[: m - slots].float()]))
    return torch.stack(rows)


@torch.no_grad()
def read_checklist(model, image_tokens: torch.Tensor) -> list[list[str]]:
    """The CoT findings each image's checklist slots name: slot ``1 + k`` says finding ``k`` when
    it lies nearer that finding's word than ``no`` and ``possible`` (``image_tokens``: ``(images,
    image tokens, width)``, the projector's output after a ``checklist`` alignment)."""
    said = [[] for _ in range(len(image_tokens))]
    others = torch.stack([_word_vector(model, "no"), _word_vector(model, "possible")])
    for k, finding in enumerate(COT_FINDINGS):
        slot = image_tokens[:, 1 + k].float()
        named = (slot - _word_vector(model, finding)).norm(dim=-1)
        rest = torch.cdist(slot, others.to(slot.device)).min(-1).values
        for i in torch.nonzero(named < rest).flatten().tolist():
            said[i].append(finding)
    return said


def align_projector_to_words(
    model,
    features: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> dict:
    """Teach the projector to write each image's facts in the LLM's word-embedding space.

    Each image token is regressed (squared error) onto its target in ``targets`` (``(images,
    image tokens, LLM width)``, from ``word_alignment_targets``). Only the projector trains and
    the LLM is not run, so a step costs one projector forward.

    Why (``tiny`` only, issue 14): trained on report pairs alone, the projector's tokens get
    almost no attention from the small LLM beyond its first layer (their input gradient was 55x
    smaller than a text token's; ``benchmarks/image_attention.py``) and the report's loss is the
    same with shuffled images; after this alignment the
    LLM reads the image tokens as it reads those words. The paper's phase 1 does not need it:
    10,000 steps on millions of pairs align Rad-DINO with a 7B model.

    Returns:
        ``{"steps", "first_loss", "final_loss", "constant_loss"}``; ``constant_loss`` is what the
        best image-blind output (the mean target) would score.
    """
    device = model.llm.get_input_embeddings().weight.device
    targets = targets.to(device).float()
    params = [p for p in model.projector.parameters()]
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.projector.train()
    losses = []
    for _ in range(steps):
        pick = torch.randint(len(targets), (batch_size,), generator=generator)
        out = model.projector(features[pick].to(device, params[0].dtype)).float()
        loss = (out - targets[pick.to(device)]).pow(2).sum(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.projector.eval()
    for p, w in zip(params, was):
        p.requires_grad_(w)
    constant = (targets - targets.mean(0)).pow(2).sum(-1).mean().item()
    return {"steps": steps, "first_loss": losses[0], "final_loss": float(np.mean(losses[-20:])),
            "constant_loss": constant}  # fmt: skip


def _phase_setup(cfg: dict, phase: str, out_dir: Path, device, default_trainable: list[str]):
    """What phases 1 and 2 both start from: the trainable parts, hyper-parameters, Accelerator,
    tokenizer, datasets, backbones folder and the freshly built (seeded) model."""
    trainable = list(cfg["train"][phase].get("trainable", default_trainable))
    hp, accelerator = _stage_setup(cfg, phase, device)
    tokenizer = stage_tokenizer(cfg, out_dir)
    data = load_datasets(out_dir / "data")
    seed_everything(cfg["seed"])
    backbones = _backbones_dir(cfg, out_dir)
    model = build_model(
        cfg, tokenizer, device=accelerator.device, backbones_dir=backbones, lora="lora" in trainable
    )
    return trainable, hp, accelerator, tokenizer, data, backbones, model


def phase1_stage(cfg, out_dir: Path, resume=True, max_steps=None, device="auto") -> dict:
    """Phase 1: train the C-Abstractor alone on report-only pairs; saves ``<out>/phase1``."""
    t_start = time.perf_counter()
    timings = {}
    target = stage_dir("phase1", out_dir)
    trainable, hp, accelerator, tokenizer, data, backbones, model = _phase_setup(
        cfg, "phase1", out_dir, device, default_trainable=["projector"]
    )
    set_trainable(model, trainable)
    upcast_trainable(model)
    train_pairs = Phase1Pairs(data.studies, tokenizer, cfg, "train")
    val_pairs = Phase1Pairs(data.studies, tokenizer, cfg, "val", allow_empty=True)
    if "encoder" in trainable:  # features change while training: no cache
        train_pairs.images = val_pairs.images = data.images
    else:
        timings["setup"] = time.perf_counter() - t_start
        indices = train_pairs.image_indices + val_pairs.image_indices
        features = cached_features(
            model, data.images, indices, cfg, target / "encoder_features.pt", accelerator
        )
        train_pairs.features = features[: len(train_pairs)]
        val_pairs.features = features[len(train_pairs) :]
        timings["feature_cache"] = time.perf_counter() - t_start - timings["setup"]
    scale = None
    if not cfg["llm"]["hf_id"]:  # an LLM trained here; `paper` keeps the official initialisation
        probe = train_pairs.features[:64] if train_pairs.features is not None else None
        if probe is None:
            probe = encoder_features(model, data.images, train_pairs.image_indices[:64], cfg)
        scale = match_image_token_scale(model, probe)
    alignment = None
    section = with_defaults(cfg["train"]["phase1"], Phase1Stage)
    if section["align_steps"]:
        t0 = time.perf_counter()
        records = [r for s in data.split("train") for r in image_records(s).values()]
        features = cached_features(model, data.images, [im["index"] for _, im in records], cfg,
                                   target / "alignment_features.pt", accelerator)  # fmt: skip
        targets = word_alignment_targets(model, records, section["align_target"])
        alignment = align_projector_to_words(model, features, targets, section["align_steps"],
                                             section["align_lr"], section["align_batch"],
                                             cfg["seed"])  # fmt: skip
        timings["alignment"] = time.perf_counter() - t0
    collate = ConversationCollate(tokenizer.pad_token_id, cfg)
    engine.save_run_info(cfg, target)

    def val_loss() -> float | None:
        if not len(val_pairs):
            return None
        loss = engine.evaluate_loss(
            model,
            val_pairs,
            collate,
            multimodal_loss,
            cfg["inference"]["batch_size"],
            device=accelerator.device,
        )
        return loss["all"]

    t0 = time.perf_counter()
    before = val_loss()
    timings["validation"] = time.perf_counter() - t0
    result = _train_stage(
        cfg,
        "phase1",
        out_dir,
        model,
        train_pairs,
        collate,
        multimodal_loss,
        hp,
        count_fn=engine.count_target_tokens,
        accelerator=accelerator,
        resume=resume,
        max_steps=max_steps,
    )
    t0 = time.perf_counter()
    after = val_loss()
    shuffled = None
    if val_pairs.features is not None and len(val_pairs) > 1:
        # The same validation pairs with every image swapped for another one: if the loss does not
        # rise, the projector has not (yet) learnt anything image-specific.
        real = val_pairs.features
        order = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))
        val_pairs.features = real[order]
        shuffled = val_loss()
        val_pairs.features = real
    timings["validation"] += time.perf_counter() - t0
    if accelerator.is_main_process:
        save_trained(model, target, cfg, parts=trainable, backbones_dir=backbones)
    summary = {
        "stage": "phase1",
        **result.to_dict(),
        "pairs": len(train_pairs),
        "val_pairs": len(val_pairs),
        "val_loss_before": before,
        "val_loss": after,
        "val_loss_shuffled_images": shuffled,
        "features_cached": "encoder" not in trainable,
        "image_token_scale": scale,
        "word_alignment": alignment,
        "trainable_parameters": count_parameters(model, trainable_only=True),
        "total_parameters": count_parameters(model),
        "timings": timings,
        "stage_seconds": time.perf_counter() - t_start,
    }
    return engine.write_summary(target, summary)


def validation_sets(data, tokenizer, cfg: dict, per_task: int = VAL_PER_TASK) -> dict:
    """One ``ConversationDataset`` per task of the val split (tasks the split cannot make are left out)."""
    sets = {}
    for task in MIXTURE_TASKS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no data for task": we skip it below
            try:
                ds = ConversationDataset(
                    data.studies,
                    data.images,
                    tokenizer,
                    cfg,
                    tasks=[task],
                    split="val",
                    seed=cfg["seed"] + 1,
                    length=per_task,
                )
            except ValueError:
                continue
        sets[task] = ds
    return sets


def validation_loss(model, sets: dict, collate, batch_size: int, device) -> dict[str, float]:
    """Mean assistant-token loss per task and over all tasks (``"all"``)."""
    names = list(sets)
    joined = ConcatDataset([sets[n] for n in names])
    offsets = np.cumsum([0] + [len(sets[n]) for n in names])

    def group_of(i: int) -> str:
        return names[int(np.searchsorted(offsets, i, side="right") - 1)]

    return engine.evaluate_loss(
        model, joined, collate, multimodal_loss, batch_size, group_of, device
    )


def phase2_stage(cfg, out_dir: Path, resume=True, max_steps=None, device="auto") -> dict:
    """Phase 2: LoRA + the preset's trainable parts on the task mixture; saves ``<out>/phase2``."""
    t_start = time.perf_counter()
    target = stage_dir("phase2", out_dir)
    phase1 = stage_dir("phase1", out_dir)
    require_artifact(phase1 / "trained.safetensors", made_by=NOTEBOOKS["phase1"])
    trainable, hp, accelerator, tokenizer, data, backbones, model = _phase_setup(
        cfg, "phase2", out_dir, device, default_trainable=["lora", "projector", "encoder"]
    )
    loaded = load_trained_weights(model, phase1)  # phase 1's projector
    scale = None
    if not cfg["llm"]["hf_id"]:
        # Phase 1 on report text alone grows a large image-independent part in the projector's
        # output; bring the tokens back to the embeddings' length (see CAbstractor.match_output_norm).
        frontal = [im["index"] for s in data.split("train") for im in s["images"]
                   if im["view"] in FRONTAL_VIEWS][:64]  # fmt: skip
        scale = match_image_token_scale(model, encoder_features(model, data.images, frontal, cfg))
    set_trainable(model, trainable)
    upcast_trainable(model)
    phase2 = with_defaults(cfg["train"]["phase2"], Phase2Stage)
    train_set = ConversationDataset(
        data.studies, data.images, tokenizer, cfg, split="train", seed=cfg["seed"],
        abnormal_repeats=phase2["abnormal_repeats"], boxed_repeats=phase2["boxed_repeats"],
        rare_finding_power=phase2["rare_finding_power"],
    )  # fmt: skip
    collate = ConversationCollate(tokenizer.pad_token_id, cfg)
    val_sets = validation_sets(
        data, tokenizer, cfg, cfg["train"]["phase2"].get("val_per_task", VAL_PER_TASK)
    )
    eval_batch = cfg["inference"]["batch_size"]
    engine.save_run_info(cfg, target)
    t0 = time.perf_counter()
    val_before = validation_loss(model, val_sets, collate, eval_batch, accelerator.device)
    val_seconds = time.perf_counter() - t0
    result = _train_stage(
        cfg,
        "phase2",
        out_dir,
        model,
        train_set,
        collate,
        multimodal_loss,
        hp,
        count_fn=engine.count_target_tokens,
        accelerator=accelerator,
        resume=resume,
        max_steps=max_steps,
    )
    model = result.model
    t0 = time.perf_counter()
    val_after = validation_loss(model, val_sets, collate, eval_batch, accelerator.device)
    val_seconds += time.perf_counter() - t0
    if accelerator.is_main_process:
        save_trained(model, target, cfg, parts=trainable, backbones_dir=backbones)
    summary = {
        "stage": "phase2",
        **result.to_dict(),
        "started_from": {"phase1": str(phase1), "parts": loaded},
        "image_token_scale": scale,
        "train_conversations": len(train_set),
        "task_weights": train_set.weights,
        "val_loss_before": val_before,
        "val_loss": val_after,
        "trainable_parameters": count_parameters(model, trainable_only=True),
        "total_parameters": count_parameters(model),
        "timings": {"validation": val_seconds},
        "stage_seconds": time.perf_counter() - t_start,
    }
    return engine.write_summary(target, summary)


# --- does the phase-2 model use the image? ------------------------------------------------------
