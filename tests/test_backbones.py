"""Backbones of the small presets (cxrlib.backbones): corpus, packing, encoder objective, stages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cxrlib import backbones as B
from cxrlib import engine as E
from cxrlib import phases as P
from cxrlib import train as T
from cxrlib.config import ConfigError, EncoderPretrainStage, load_preset, with_defaults
from cxrlib.constants import CHEXPERT_LABELS, COT_FINDINGS
from cxrlib.model import build_encoder
from cxrlib.tokenizer import train_bpe_tokenizer

REPORTS = [
    "The heart is normal in size. The lungs are clear.",
    "Mild cardiomegaly. Small left pleural effusion.",
    "No pneumothorax. Degenerative changes of the spine.",
    "Right lower lobe opacity concerning for pneumonia.",
]


def _study(i, split="train", source="iu", positive=()):
    labels = dict.fromkeys(CHEXPERT_LABELS)
    labels.update({name: 1 for name in positive})
    return {
        "study_id": f"S{i}", "split": split, "source": source,
        "findings_text": REPORTS[i % len(REPORTS)], "impression": f"Impression {i}.",
        "labels": labels, "images": [{"index": i, "view": "PA"}],
    }  # fmt: skip


def test_report_corpus_takes_one_split_and_source():
    studies = [_study(0), _study(1, "val"), _study(2, source="longitudinal"), _study(3)]
    texts = B.report_corpus(studies)
    assert texts == [REPORTS[0], "Impression 0.", REPORTS[3], "Impression 3."]
    assert all("Impression 1." not in t for t in B.report_corpus(studies, "train", None))


def test_prompt_strings_make_instructions_short():
    from cxrlib.constants import SYSTEM_TEXT

    plain = train_bpe_tokenizer(REPORTS * 50, 800)
    with_prompts = train_bpe_tokenizer(REPORTS * 50 + B.prompt_strings() * 20, 800)
    n = lambda tok: len(tok(SYSTEM_TEXT, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert n(with_prompts) < 0.5 * n(plain)


def test_packed_text_rows():
    tok = train_bpe_tokenizer(REPORTS * 20, 300)
    ds = B.PackedText(REPORTS, tok, seq_len=8)
    flat = ds.rows.flatten().tolist()
    assert ds.rows.shape[1] == 8 and len(ds) == len(flat) // 8
    assert flat[0] == tok.bos_token_id and tok.eos_token_id in flat
    batch = B.collate_rows([ds[0], ds[1]])
    assert torch.equal(batch["input_ids"], batch["labels"])
    with pytest.raises(ValueError, match="do not fill one row"):
        B.PackedText(["Hi."], tok, seq_len=512)


def test_label_vector_counts_positives_only():
    labels = dict.fromkeys(CHEXPERT_LABELS)
    labels.update({"Cardiomegaly": 1, "Edema": -1, "Pleural Effusion": 0})
    vec = B.label_vector(labels)
    assert len(vec) == 13 and vec[COT_FINDINGS.index("cardiomegaly")] == 1.0 and sum(vec) == 1.0


def _pretrainer(seed=0, **overrides):
    """A smoke-size pretrainer with the preset's settings (``overrides`` replace some)."""
    cfg = load_preset("smoke")
    torch.manual_seed(seed)
    section = with_defaults(cfg["train"]["encoder_pretrain"], EncoderPretrainStage)
    knobs = {k: section[k] for k in ("mask_ratio", "label_weight", "target_norm")} | overrides
    return B.MaskedPatchPretrainer(build_encoder(cfg, pretrained=False), **knobs), cfg


def test_patch_targets_are_normalised_patches():
    model, cfg = _pretrainer()
    pixels = torch.randn(2, 3, cfg["encoder"]["image_size"], cfg["encoder"]["image_size"])
    targets = model.patch_targets(pixels)
    grid = cfg["encoder"]["image_size"] // cfg["encoder"]["patch_size"]
    assert targets.shape == (2, grid * grid, cfg["encoder"]["patch_size"] ** 2)
    torch.testing.assert_close(targets.mean(-1), torch.zeros(2, grid * grid), atol=1e-4, rtol=0)
    p = cfg["encoder"]["patch_size"]  # patch 1 of row 0 is pixels [0:p, p:2p] of channel 0
    raw = pixels[0, 0, :p, p : 2 * p].flatten()
    torch.testing.assert_close(targets[0, 1], (raw - raw.mean()) / raw.std(), atol=1e-3, rtol=0)


def test_image_targets_keep_patch_brightness_and_bad_choices_fail():
    model, cfg = _pretrainer(target_norm="image")
    size, p = cfg["encoder"]["image_size"], cfg["encoder"]["patch_size"]
    pixels = torch.randn(1, 3, size, size) + 2.0
    torch.testing.assert_close(
        model.patch_targets(pixels)[0, 1], pixels[0, 0, :p, p : 2 * p].flatten()
    )
    with pytest.raises(ValueError, match="target_norm"):
        _pretrainer(target_norm="pixel")


def test_encoder_pretrain_knobs_validate_and_reach_the_pretrainer(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="target_norm"):
        load_preset("smoke", {"train": {"encoder_pretrain": {"target_norm": "pixel"}}})
    with pytest.raises(ConfigError, match="mask_ratio"):
        load_preset("smoke", {"train": {"encoder_pretrain": {"mask_ratio": 1.0}}})
    seen = {}

    class Stop(Exception):
        pass

    def spy(encoder, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(P, "MaskedPatchPretrainer", spy)
    monkeypatch.setattr(P, "read_studies", lambda out: [_study(0, "train"), _study(1, "val")])
    monkeypatch.setattr(P, "read_images", lambda out: np.zeros((4, 16, 16), np.uint8))
    knobs = {"mask_ratio": 0.6, "label_weight": 2.0, "target_norm": "image"}
    cfg = load_preset("smoke", {"train": {"encoder_pretrain": knobs}})
    with pytest.raises(Stop):
        P.encoder_pretrain_stage(cfg, tmp_path)
    assert seen == knobs
    # a preset that omits them gets the schema's defaults (presets keep only what they spell out)
    cfg = load_preset("smoke")
    assert "target_norm" not in cfg["train"]["encoder_pretrain"]
    with pytest.raises(Stop):
        P.encoder_pretrain_stage(cfg, tmp_path)
    assert seen == {"mask_ratio": 0.4, "label_weight": 0.5, "target_norm": "patch"}


def test_encoder_objective_learns_a_fixed_batch(tmp_path):
    model, cfg = _pretrainer()
    size = cfg["encoder"]["image_size"]
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(8, 1, size, size, generator=g).expand(-1, 3, -1, -1).contiguous()
    labels = (torch.rand(8, 13, generator=g) < 0.3).float()
    data = [(pixels[i], labels[i]) for i in range(8)]

    def collate(items):
        return {"pixel_values": torch.stack([x for x, _ in items]),
                "labels": torch.stack([y for _, y in items])}  # fmt: skip

    hp = E.HParams(steps=30, global_batch=8, micro_batch=8, lr=3e-3, warmup_steps=2)
    res = E.train(model, data, collate, B.encoder_loss, hp, tmp_path, device="cpu")
    log = E.read_metrics(tmp_path)
    assert np.mean([r["loss"] for r in log[-3:]]) < 0.8 * np.mean([r["loss"] for r in log[:3]])
    out = res.model(pixels, labels)
    assert out["mim"].shape == (8,) and out["logits"].shape == (8, 13)


def test_tokenizer_stage_trains_on_the_training_split(tmp_path):
    (tmp_path / "data").mkdir()
    studies = [_study(i, "val" if i % 5 == 0 else "train") for i in range(40)]
    (tmp_path / "data" / "studies.jsonl").write_text("".join(json.dumps(s) + "\n" for s in studies))
    cfg = load_preset("smoke", {"llm": {"vocab_size": 300}})
    summary = T.run_stage("tokenizer", cfg, tmp_path)
    assert summary["vocab_size"] == 300 and summary["texts"] == 2 * 32
    tok = P.stage_tokenizer(cfg, tmp_path)
    assert tok.convert_tokens_to_ids("<image>") != tok.unk_token_id
    # an answer encoded on its own starts with the word token the LLM knows from mid-sentence
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert enc("pleural effusion.") == enc(" pleural effusion.")
    assert (tmp_path / "tokenizer" / "versions.json").exists()
    too_big = load_preset("smoke", {"llm": {"vocab_size": 100000}})
    with pytest.raises(ValueError, match="lower llm.vocab_size"):
        T.run_stage("tokenizer", too_big, tmp_path)


def test_missing_data_names_notebook_01(tmp_path):
    from cxrlib.utils import MissingArtifactError

    with pytest.raises(MissingArtifactError, match="01-data-prep"):
        T.run_stage("tokenizer", load_preset("smoke"), tmp_path)
    with pytest.raises(MissingArtifactError, match="02-backbones"):
        P.stage_tokenizer(load_preset("smoke"), tmp_path)


def test_sample_text_continues_the_prompt():
    from transformers import MistralConfig, MistralForCausalLM

    tok = train_bpe_tokenizer(REPORTS * 20, 300)
    torch.manual_seed(0)
    lm = MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=2,
                                          num_key_value_heads=1))  # fmt: skip
    greedy = B.sample_text(lm, tok, ["The heart"], max_new_tokens=5)
    sampled = B.sample_text(lm, tok, ["The heart"], max_new_tokens=5, temperature=1.0, seed=1)
    assert greedy[0].startswith("The heart") and sampled[0].startswith("The heart")
    assert greedy == B.sample_text(lm, tok, ["The heart"], max_new_tokens=5)


def test_box_corpus_is_valid_seeded_box_text():
    from cxrlib.data.boxes import parse_boxes

    lines = B.box_corpus(200, seed=3)
    assert lines == B.box_corpus(200, seed=3) and lines != B.box_corpus(200, seed=4)
    for line in lines:
        boxes = parse_boxes(line)  # the parser the evaluation uses accepts every line
        assert 1 <= len(boxes) <= 3
        assert all(0 <= x1 < x2 <= 100 and 0 <= y1 < y2 <= 100 for x1, y1, x2, y2 in boxes)
    assert B.box_corpus(0, seed=0) == []
