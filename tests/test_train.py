"""The training loop (cxrlib.engine) and the stages (cxrlib.phases, cxrlib.train): loss goes down,
accumulation, resume, divergence, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import copy_inputs, smoke_cfg
from torch.utils.data import Dataset
from transformers import MistralConfig, MistralForCausalLM

from cxrlib import engine as E
from cxrlib import evaluate
from cxrlib import train as T
from cxrlib.config import parse_overrides
from cxrlib.constants import IGNORE_INDEX
from cxrlib.data import batches, features


class TokenRows(Dataset):
    """Random token sequences with a learnable pattern (each row counts up modulo the vocab)."""

    def __init__(self, n=24, length=12, vocab=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        self.rows = (start + torch.arange(length)) % vocab

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def collate(rows):
    ids = torch.stack(rows)
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX  # a prompt part that does not count
    return {"input_ids": ids, "labels": labels}


def lm_loss(model, batch):
    return E.causal_lm_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])


def tiny_lm(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    cfg = MistralConfig(
        attention_dropout=dropout,
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return MistralForCausalLM(cfg)


def hp(**kw):
    base = dict(steps=6, global_batch=8, micro_batch=4, lr=3e-3, warmup_steps=1)
    return E.HParams(**{**base, **kw})


def run(tmp, model=None, **kw):
    args = dict(seed=0, count_fn=E.count_target_tokens, device="cpu", log_every=1)
    args.update(kw)
    h = args.pop("hp", hp())
    return E.train(model or tiny_lm(), TokenRows(), collate, lm_loss, h, tmp, **args)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_loss_decreases_on_a_fixed_batch(tmp_path):
    ds = TokenRows(n=8)
    res = E.train(
        tiny_lm(),
        ds,
        collate,
        lm_loss,
        hp(steps=25, micro_batch=8, lr=2e-2),
        tmp_path,
        count_fn=E.count_target_tokens,
        device="cpu",
    )
    log = E.read_metrics(tmp_path)
    assert len(log) == 25 and [r["step"] for r in log] == list(range(1, 26))
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    assert set(log[0]) == {
        "step", "loss", "lr", "grad_norm", "samples_per_s", "elapsed", "samples_per_process"
    }  # fmt: skip
    assert log[0]["samples_per_process"] == [8]
    assert res.completed and res.peak_memory_gb > 0


def test_seeded_order_depends_only_on_seed_and_position():
    a, b = E.SeededOrder(10, seed=3), E.SeededOrder(10, seed=3)
    assert a.take(7, 15) == b.take(0, 22)[7:]
    assert sorted(a.take(0, 10)) == list(range(10))  # one epoch = a permutation
    assert a.take(0, 10) != E.SeededOrder(10, seed=4).take(0, 10)


def test_micro_batches_cover_the_global_batch_across_processes():
    h = hp(global_batch=8, micro_batch=2)
    order = E.SeededOrder(24, 0)
    per_rank = [list(E.StepBatchSampler(order, h, 1, 2, num_processes=2, rank=r)) for r in (0, 1)]
    assert all(len(mb) == 2 for mbs in per_rank for mb in mbs)  # accumulation 2 per process
    seen = sorted(i for mbs in per_rank for mb in mbs for i in mb)
    assert seen == sorted(order.take(8, 8))


def test_accumulation_equals_one_big_batch(tmp_path):
    big = run(tmp_path / "a", hp=hp(steps=3, micro_batch=8)).model
    acc = run(tmp_path / "b", hp=hp(steps=3, micro_batch=2)).model
    for (n, p), q in zip(big.named_parameters(), acc.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)


def test_resume_equals_uninterrupted(tmp_path):
    # Dropout makes every step draw random numbers: resuming must restore the RNG state too.
    full = run(tmp_path / "full", model=tiny_lm(dropout=0.3), checkpoint_every=2)
    part = run(tmp_path / "part", model=tiny_lm(dropout=0.3), checkpoint_every=2, max_steps=3)
    assert part.steps == 3 and not part.completed
    resumed = run(tmp_path / "part", model=tiny_lm(dropout=0.3), checkpoint_every=2)
    assert resumed.steps == 6 and resumed.completed
    a, b = params(full.model), params(resumed.model)
    for n in a:
        assert torch.equal(a[n], b[n]), n
    la, lb = E.read_metrics(tmp_path / "full"), E.read_metrics(tmp_path / "part")
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    assert len(list((tmp_path / "part" / "checkpoints").glob("step-*"))) <= E.KEEP_CHECKPOINTS
    state = json.loads((E.latest_checkpoint(tmp_path / "part") / E.STATE_FILE).read_text())
    assert state["step"] == 6 and state["samples_seen"] == 6 * 8


def test_dropout_matters_so_the_resume_test_can_fail(tmp_path):
    a = run(tmp_path / "a", model=tiny_lm(dropout=0.3), hp=hp(steps=2))
    model = tiny_lm(dropout=0.3)  # the same initial weights (tiny_lm seeds) ...
    torch.manual_seed(123)  # ... but another random state for the dropout masks
    b = E.train(
        model, TokenRows(), collate, lm_loss, hp(steps=2), tmp_path / "b",
        seed=0, count_fn=E.count_target_tokens, device="cpu",
    )  # fmt: skip
    assert E.read_metrics(tmp_path / "a")[-1]["loss"] != E.read_metrics(tmp_path / "b")[-1]["loss"]
    assert any(not torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_another_identity_trains_afresh_and_keeps_the_old_run(tmp_path):
    run(tmp_path, max_steps=2, identity={"config": "a", "inputs": {"phase1": "x"}})
    with pytest.warns(UserWarning, match=r"inputs\.phase1 changed.*training afresh"):
        res = run(tmp_path, identity={"config": "a", "inputs": {"phase1": "y"}})
    assert res.completed and res.identity["inputs"]["phase1"] == "y"
    assert [r["step"] for r in E.read_metrics(tmp_path)] == list(range(1, 7))  # from step 1
    previous = tmp_path / E.PREVIOUS_CHECKPOINTS
    assert sorted(p.name for p in previous.glob("step-*")) == ["step-000002"]
    assert len(E.read_metrics(previous)) == 2
    with pytest.warns(UserWarning, match="config changed"):
        run(tmp_path, identity={"config": "b", "inputs": {"phase1": "y"}})


def test_divergence_advice_names_the_command_and_works(tmp_path):
    hint = "`python -m cxrlib.train --stage phase2 --set train.phase2.lr=0.0015`"
    with pytest.raises(E.TrainingDivergedError, match="lower the learning rate.*lr=0.0015") as err:
        run(tmp_path, hp=hp(lr=50.0, warmup_steps=0, grad_clip=None), explode_factor=1.5,
            checkpoint_every=1, identity={"config": "lr50"}, rerun_hint=hint)  # fmt: skip
    assert "resuming would diverge" in str(err.value)
    # Following the advice (another learning rate = another identity) trains afresh, no refusal.
    with pytest.warns(UserWarning, match="training afresh"):
        res = run(tmp_path, identity={"config": "lr3e-3"}, checkpoint_every=1)
    assert res.completed and math.isfinite(res.final_loss)


def test_only_trainable_parameters_change(tmp_path):
    model = tiny_lm()
    for n, p in model.named_parameters():
        p.requires_grad = "layers.0.mlp" in n
    before = params(model)
    after = params(run(tmp_path, model=model, hp=hp(steps=2)).model)
    for n in before:
        changed = not torch.equal(before[n], after[n])
        assert changed == ("layers.0.mlp" in n), n


def test_nan_loss_stops_naming_the_step(tmp_path):
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss, n = lm_loss(model, batch)
        return (loss * float("nan") if calls["n"] > 4 else loss), n  # step 3, micro-batch 1

    with pytest.raises(E.TrainingDivergedError, match="step 3"):
        E.train(
            tiny_lm(),
            TokenRows(),
            collate,
            poisoned,
            hp(),
            tmp_path,
            device="cpu",
            count_fn=E.count_target_tokens,
        )


def test_exploding_loss_stops(tmp_path):
    with pytest.raises(E.TrainingDivergedError, match="exploded at step"):
        run(tmp_path, hp=hp(lr=50.0, warmup_steps=0, grad_clip=None), explode_factor=1.5)


def test_hparams_from_preset_sections():
    from cxrlib.config import ConfigError, load_preset

    cfg = load_preset("tiny")
    p1 = E.HParams.from_section(cfg["train"]["phase1"], "phase1")
    assert p1.accumulation(1) == p1.global_batch // p1.micro_batch
    lm = E.HParams.from_section(cfg["train"]["lm_pretrain"], "lm_pretrain")
    assert lm.micro_batch == lm.global_batch == cfg["train"]["lm_pretrain"]["batch_size"]
    with pytest.raises(ConfigError, match="not a multiple"):
        E.HParams(steps=1, global_batch=8, micro_batch=4, lr=1.0).accumulation(3)


def test_parse_overrides():
    assert parse_overrides(["train.phase1.steps=10", "llm.hf_id=null"]) == {
        "train": {"phase1": {"steps": 10}},
        "llm": {"hf_id": None},
    }


# --- the stages on the smoke preset -------------------------------------------------------------
# One session fixture builds smoke data and backbones (2 steps each); the tests then run phase 1
# and phase 2 for 2 steps and inspect what changed.


def _checkpoint_state(stage_dir):
    from safetensors.torch import load_file

    return load_file(str(E.latest_checkpoint(stage_dir) / "model.safetensors"))


def _initial_model(cfg, out, lora=False, phase1=None):
    from cxrlib.model import build_model, load_trained_weights
    from cxrlib.phases import stage_tokenizer
    from cxrlib.utils import seed_everything

    seed_everything(cfg["seed"])  # what run_stage does before building
    model = build_model(cfg, stage_tokenizer(cfg, out), backbones_dir=out / "backbones", lora=lora)
    if phase1 is not None:
        load_trained_weights(model, phase1)
    return model


@pytest.mark.slow
def test_phase1_trains_only_the_projector(smoke_out, tmp_path):
    out = copy_inputs(smoke_out, tmp_path)
    cfg = smoke_cfg()
    summary = T.run_stage("phase1", cfg, out, device="cpu")
    assert summary["completed"] and summary["features_cached"]
    assert (out / "phase1" / "encoder_features.pt").exists()
    assert (out / "phase1" / "versions.json").exists() and (out / "phase1" / "config.json").exists()
    before = _initial_model(cfg, out).state_dict()
    after = {k.removeprefix("model."): v for k, v in _checkpoint_state(out / "phase1").items()}
    for name, value in before.items():
        if name.startswith(("encoder.", "llm.")):
            assert torch.equal(value, after[name]), f"frozen {name} changed in phase 1"
    changed = [
        n for n in before if n.startswith("projector.") and not torch.equal(before[n], after[n])
    ]
    assert changed, "phase 1 did not change the projector"


@pytest.mark.slow
def test_cached_features_give_the_model_forward(smoke_out):
    from cxrlib.data.datasets import load_datasets
    from cxrlib.phases import stage_tokenizer

    cfg = smoke_cfg()
    model = _initial_model(cfg, smoke_out)
    data = load_datasets(smoke_out / "data")
    pairs = batches.Phase1Pairs(data.studies, stage_tokenizer(cfg, smoke_out), cfg)
    pairs.images = data.images
    collate = batches.ConversationCollate(model.pad_token_id, cfg)
    with_images = collate([pairs[i] for i in range(3)])
    pairs.features = features.encoder_features(model, data.images, pairs.image_indices[:3], cfg)
    with_features = collate([pairs[i] for i in range(3)])
    with torch.no_grad():
        a = model(
            with_images["input_ids"], with_images["attention_mask"], with_images["pixel_values"]
        ).logits
        b = model(
            with_features["input_ids"],
            with_features["attention_mask"],
            features=with_features["features"],
        ).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_phase2_changes_only_the_intended_modules(smoke_out, tmp_path):
    out = copy_inputs(smoke_out, tmp_path)
    cfg = smoke_cfg()
    with pytest.raises(Exception, match="03-projector-pretraining"):
        T.run_stage("phase2", cfg, out, device="cpu")  # phase 1 missing: says which notebook
    T.run_stage("phase1", cfg, out, device="cpu")
    summary = T.run_stage("phase2", cfg, out, device="cpu")
    assert summary["completed"] and set(summary["val_loss"]) >= {"all", "cot_single"}
    before = _initial_model(cfg, out, lora=True, phase1=out / "phase1").state_dict()
    after = _checkpoint_state(out / "phase2")
    trainable = cfg["train"]["phase2"]["trainable"]
    assert set(trainable) == {"lora", "projector", "encoder"}
    frozen_encoder = ("encoder.layernorm.", "encoder.embeddings.mask_token")
    for name, value in before.items():
        expect = (
            ".lora_" in name
            or name.startswith("projector.")
            or (name.startswith("encoder.") and not name.startswith(frozen_encoder))
        )
        changed = not torch.equal(value, after[name])
        if not expect:
            assert not changed, f"{name} should be frozen in phase 2"
        elif name.startswith(("encoder.", "projector.")) or ".lora_B" in name:
            assert changed, f"{name} should have trained in phase 2"
    from cxrlib.model import load_trained

    model = load_trained(out / "phase2")  # what notebooks 05/06 read
    assert set(model.trainable_parts) == {"projector", "lora", "encoder"}


@pytest.mark.slow
def test_cli_and_notebook_give_the_same_checkpoint(smoke_out, tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    from cxrlib.notebook import setup

    cli_out = copy_inputs(smoke_out, tmp_path / "cli")
    nb_out = copy_inputs(smoke_out, tmp_path / "nb")
    args = [
        "--stage",
        "phase1",
        "--preset",
        "smoke",
        "--output-dir",
        str(cli_out),
        "--set",
        "train.phase1.steps=2",
        "--device",
        "cpu",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "cxrlib.train", *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run = setup("smoke", 0, "cpu", str(nb_out), str(tmp_path / "fig"))  # the notebook's first cell
    run.cfg["train"]["phase1"]["steps"] = 2
    T.run_stage("phase1", run.cfg, run.out, device=run.device)
    a = load_file(str(cli_out / "phase1" / "trained.safetensors"))
    b = load_file(str(nb_out / "phase1" / "trained.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_rejects_unknown_keys(capsys):
    with pytest.raises(SystemExit):
        T.main(["--stage", "phase1", "--preset", "smoke", "--set", "train.phase1.stepz=2"])
    assert "unknown config key 'train.phase1.stepz'" in capsys.readouterr().err


def test_findings_labels():
    labels = evaluate.findings_labels(["cardiomegaly", "pleural effusion"])
    assert labels["Cardiomegaly"] == labels["Pleural Effusion"] == 1 and labels["No Finding"] == 0
    assert (
        evaluate.findings_labels([])["No Finding"] == 1
        and evaluate.findings_labels(None)["No Finding"] == 1
    )
    assert sum(evaluate.findings_labels(None).values()) == 1


# --- the paper preset, as far as a CPU allows ---------------------------------------------------


def test_paper_hyper_parameters_and_accumulation():
    from cxrlib.config import load_preset

    cfg = load_preset("paper")
    p1 = E.HParams.from_section(cfg["train"]["phase1"], "phase1")
    p2 = E.HParams.from_section(cfg["train"]["phase2"], "phase2")
    # the card: 2 per GPU x 64 accumulation x 2 GPUs = 256; 1 x 32 x 2 = 64
    assert (p1.micro_batch, p1.accumulation(2), p1.lr) == (2, 64, 3e-4)
    assert (p2.micro_batch, p2.accumulation(2), p2.lr, p2.schedule) == (1, 32, 1e-4, "linear")


def test_paper_model_on_the_meta_device():
    from cxrlib.config import load_preset
    from cxrlib.model import add_lora, build_model, count_parameters, set_trainable

    cfg = load_preset("paper")
    model = build_model(cfg, None, meta=True)
    total = count_parameters(model)
    assert 7.0e9 < total < 7.6e9  # Mistral-7B + Rad-DINO + C-Abstractor
    assert set_trainable(model, cfg["train"]["phase1"]["trainable"]) < 0.02 * total
    add_lora(model, cfg)
    trainable = set_trainable(model, ["lora", "projector", "encoder"])
    assert trainable < 0.05 * total


def test_paper_stages_say_how_to_get_missing_weights(tmp_path, monkeypatch):
    from cxrlib.config import load_preset
    from cxrlib.tokenizer import MissingWeightsError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    cfg = load_preset("paper")
    for stage in ("tokenizer", "lm_pretrain", "encoder_pretrain"):
        with pytest.raises(MissingWeightsError, match="huggingface-cli download"):
            T.run_stage(stage, cfg, tmp_path, device="cpu")


@pytest.mark.slow
def test_paper_geometry_one_step_of_every_stage(tmp_path):
    """The paper preset's shapes (518 px, 37x37 patches, 361 tokens per image, 4095 tokens)
    with widths made tiny: data loading and one optimiser step of every stage."""
    from cxrlib.config import load_preset
    from cxrlib.data.datasets import build_datasets
    from cxrlib.utils import seed_everything

    small = {"hidden_size": 32, "num_layers": 1, "num_heads": 2}
    one = {"steps": 1, "warmup_steps": 0}
    cfg = load_preset("paper", {
        "data": {"max_studies": 12, "longitudinal_patients": 3, "source": "iu_phantom",
                 "max_images_per_study": 2},  # PhantomCXR: no real data here
        "encoder": {"hf_id": None, **small},
        "projector": {"hidden_size": 32, "depth": 1},
        "llm": {"hf_id": None, "vocab_size": 400, "hidden_size": 32, "intermediate_size": 64,
                "num_layers": 1, "num_heads": 2, "num_kv_heads": 1},
        "train": {"lm_pretrain": {**one, "batch_size": 2, "seq_len": 64},
                  "encoder_pretrain": {**one, "batch_size": 2},
                  "phase1": {**one, "global_batch": 2, "micro_batch": 1},
                  "phase2": {**one, "global_batch": 2, "micro_batch": 1, "val_per_task": 1}},
        "inference": {"batch_size": 2},
    })  # fmt: skip
    assert cfg["projector"]["num_queries"] == 361 and cfg["encoder"]["image_size"] == 518
    build_datasets(cfg, tmp_path / "data", workers=1)
    for stage in T.STAGES:
        seed_everything(cfg["seed"])
        summary = T.run_stage(stage, cfg, tmp_path, device="cpu")
        assert stage == "tokenizer" or summary["completed"], stage
    log = E.read_metrics(tmp_path / "phase2")
    assert len(log) == 1 and math.isfinite(log[0]["loss"])


@pytest.mark.slow
def test_a_retrained_phase1_makes_phase2_train_afresh(smoke_out, tmp_path):
    import copy

    from safetensors.torch import load_file

    out = copy_inputs(smoke_out, tmp_path)
    cfg = smoke_cfg()
    T.run_stage("phase1", cfg, out, device="cpu")
    T.run_stage("phase2", cfg, out, device="cpu")
    old = load_file(str(out / "phase2" / "trained.safetensors"))
    changed = copy.deepcopy(cfg)
    changed["train"]["phase1"]["lr"] = 5e-3
    with pytest.warns(UserWarning, match="phase1: not resuming.*config changed"):
        T.run_stage("phase1", changed, out, device="cpu")
    with pytest.warns(UserWarning, match="phase2: not resuming.*inputs.phase1 changed"):
        summary = T.run_stage("phase2", changed, out, device="cpu")
    new_phase1 = E.file_hash(out / "phase1" / "trained.safetensors")
    assert summary["identity"]["inputs"]["phase1"] == new_phase1
    new = load_file(str(out / "phase2" / "trained.safetensors"))
    assert any(not torch.equal(old[k], new[k]) for k in old), "phase 2 returned stale weights"


def test_word_alignment_makes_the_projector_write_each_image_s_words():
    """Two kinds of image (bright / dark) described by different words: after the alignment
    the projector's tokens are nearer their own description than the best constant output."""
    from cxrlib.model.toy import toy_model
    from cxrlib.phases import align_projector_to_words

    model, tok, cfg = toy_model("smoke")
    n, p, c = 32, model.projector.num_input_tokens, cfg["encoder"]["hidden_size"]
    m = model.num_image_tokens
    kind = torch.arange(n) % 2
    features = torch.randn(n, p, c) * 0.1 + kind.view(n, 1, 1).float()
    emb = model.llm.get_input_embeddings().weight.detach().float()
    ids = [
        tok(w, add_special_tokens=False)["input_ids"]
        for w in ("(no abnormality)", "(cardiomegaly)")
    ]
    words = [emb[(i + i[-1:] * m)[:m]] for i in ids]  # each text's first m tokens, as a description
    targets = torch.stack([words[k] for k in kind.tolist()])
    got = align_projector_to_words(
        model, features, targets, steps=150, lr=3e-3, batch_size=16, seed=0
    )
    assert got["final_loss"] < 0.7 * got["constant_loss"] < got["first_loss"]
    assert not any(q.requires_grad for q in model.projector.parameters())  # frozen as before


def test_checklist_alignment_targets_give_each_finding_a_fixed_token():
    """Slot 1 + k of a checklist target is finding k's word (or "no"), whatever else the image
    shows; a projector with fewer tokens than slots is an error that names the fix."""
    from cxrlib.constants import COT_FINDINGS
    from cxrlib.model.toy import toy_model
    from cxrlib.phases import read_checklist, word_alignment_targets

    model, tok, _ = toy_model("smoke", overrides={"projector": {"num_queries": 16}})
    emb = model.llm.get_input_embeddings().weight.detach().float()

    def word(w):
        return emb[tok(f" {w}", add_special_tokens=False)["input_ids"]].mean(0)

    image = {"view": "PA", "hw": [64, 64], "index": 0}
    records = [({"labels": {"Cardiomegaly": 1.0}}, image),
               ({"labels": {"Cardiomegaly": 1.0, "Edema": 1.0, "Fracture": -1.0}}, image)]  # fmt: skip
    targets = word_alignment_targets(model, records, "checklist")
    assert targets.shape == (2, 16, emb.shape[1])
    k = 1 + COT_FINDINGS.index("cardiomegaly")
    assert torch.allclose(targets[0, k], word("cardiomegaly"))
    assert torch.allclose(targets[1, k], word("cardiomegaly"))
    assert torch.allclose(targets[0, 1 + COT_FINDINGS.index("edema")], word("no"))
    assert torch.allclose(targets[1, 1 + COT_FINDINGS.index("edema")], word("edema"))
    assert torch.allclose(targets[1, 1 + COT_FINDINGS.index("fracture")], word("possible"))
    assert torch.allclose(targets[0, 0], word("PA"))
    # the targets themselves read back as the positive findings (uncertain is not named)
    assert read_checklist(model, targets) == [["cardiomegaly"], ["cardiomegaly", "edema"]]
    small, _, _ = toy_model("smoke")
    with pytest.raises(ValueError, match="projector.num_queries"):
        word_alignment_targets(small, records, "checklist")
