"""The M4CXR model: preprocessing, splicing, the paper model on meta, LoRA, save/load, generation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxrlib.config import load_preset
from cxrlib.constants import IGNORE_INDEX
from cxrlib.data.boxes import to_relative
from cxrlib.model import (
    ImageError,
    ImageProcessor,
    ImageTokenError,
    SequenceTooLongError,
    add_lora,
    build_encoder,
    build_model,
    count_parameters,
    enable_gradient_checkpointing,
    load_trained,
    load_trained_weights,
    save_trained,
    set_trainable,
)
from cxrlib.model.toy import toy_model, toy_tokenizer
from cxrlib.tokenizer import MissingWeightsError
from cxrlib.utils import MissingArtifactError

PAPER_PROJECTOR_PARAMS = 38_254_784  # the hand formula of tests/test_projector.py


pytestmark = pytest.mark.usefixtures("one_thread")


def hf_cached(hf_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(hf_id, "config.json"), str)


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


@pytest.fixture()
def toy(tok):
    model, _, cfg = toy_model("smoke", seed=0, tokenizer=tok)
    return model, tok, cfg


def prompt(model, tok, n_images: int, text: str) -> list[int]:
    """<s>[INST] text <image>*n [/INST] with images expanded."""
    ids = [tok.bos_token_id] + tok.encode(f"[INST] {text}", add_special_tokens=False)
    ids += [model.image_token_id] * (model.num_image_tokens * n_images)
    return ids + tok.encode(" [/INST]", add_special_tokens=False)


def left_pad(rows, pad):
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


# ---------------------------------------------------------------------------- preprocessing
def test_processor_shapes_and_normalisation():
    cfg = load_preset("smoke")
    proc = ImageProcessor(cfg)
    out = proc([np.full((72, 64), 255, np.uint8), np.zeros((50, 90), np.uint8)])
    s = cfg["encoder"]["image_size"]
    assert out.shape == (2, 3, s, s) and out.dtype == torch.float32
    mean, std = cfg["encoder"]["image_mean"][0], cfg["encoder"]["image_std"][0]
    assert torch.allclose(out[0], torch.full_like(out[0], (1 - mean) / std), atol=1e-4)
    assert torch.allclose(out[1], torch.full_like(out[1], -mean / std), atol=1e-4)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])  # gray -> 3


@pytest.mark.parametrize("hw", [(144, 128), (128, 160)])
def test_a_box_drawn_on_the_image_lands_where_to_relative_says(hw):
    cfg = load_preset("tiny")
    s = cfg["encoder"]["image_size"]
    box = [20, 30, 60, 80] if hw[0] > hw[1] else [40, 20, 100, 70]
    image = np.zeros(hw, np.uint8)
    image[box[1] : box[3], box[0] : box[2]] = 255
    x = ImageProcessor(cfg)([image])[0, 0]
    mean, std = cfg["encoder"]["image_mean"][0], cfg["encoder"]["image_std"][0]
    ys, xs = ((x * std + mean) > 0.5).nonzero(as_tuple=True)  # half-intensity edge
    seen = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    expected = [v * s / 100 for v in to_relative(box, hw)]
    assert np.allclose(seen, expected, atol=1.5), (seen, expected)


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((64, 64), np.float32), "dtype float32"),
        (np.zeros((64, 64, 3), np.uint8), "grayscale"),
        ([[0, 1], [2, 3]], "numpy array"),
    ],
)
def test_processor_rejects_bad_images(image, match):
    with pytest.raises(ImageError, match=match):
        ImageProcessor(load_preset("smoke"))([image])


@pytest.mark.skipif(hf_cached("microsoft/rad-dino"), reason="Rad-DINO is cached here")
def test_paper_processor_without_cache_names_the_model():
    with pytest.raises(MissingWeightsError, match="microsoft/rad-dino"):
        ImageProcessor(load_preset("paper"))


# ---------------------------------------------------------------------------- the paper model
@pytest.fixture(scope="module")
def paper_meta():
    return build_model(load_preset("paper"), None, meta=True)


def test_paper_model_on_meta_has_the_papers_shapes(paper_meta):
    m = paper_meta
    assert m.num_image_tokens == 361 and m.image_size == 518
    assert count_parameters(m.projector) == PAPER_PROJECTOR_PARAMS
    assert m.llm.get_input_embeddings().weight.shape == (32001, 4096)  # 32000 + <image>
    assert m.image_token_id == 32000 and m.llm.config.num_hidden_layers == 32
    assert m.encoder.config.hidden_size == 768 and m.encoder.config.num_hidden_layers == 12
    pixel_values = torch.zeros(2, 3, 518, 518, device="meta")
    assert m.image_features(pixel_values).shape == (2, 1369, 768)  # 37 x 37, CLS dropped
    assert m.encode_images(pixel_values).shape == (2, 361, 4096)
    ids = torch.full((1, 800), 5)
    ids[0, 10:371] = ids[0, 400:761] = m.image_token_id  # two images in one sample
    assert m.embed_inputs(ids, pixel_values).shape == (1, 800, 4096)


def test_paper_trainable_sets_per_phase():
    cfg = load_preset("paper")
    m = build_model(cfg, None, meta=True)
    assert set_trainable(m, ["projector"]) == PAPER_PROJECTOR_PARAMS
    add_lora(m, cfg)
    lora = 32 * 8 * ((4096 + 4096) + (4096 + 1024))  # r x (in + out) for q_proj and v_proj
    encoder = count_parameters(m.encoder) - 768 * 3  # final LayerNorm and mask token stay frozen
    assert (
        set_trainable(m, ["lora", "projector", "encoder"])
        == lora + PAPER_PROJECTOR_PARAMS + encoder
    )
    assert set_trainable(m, ["lora"]) == lora == 3_407_872


# ---------------------------------------------------------------------------- small models
def test_tiny_preset_builds_with_its_config(tok):
    model, _, cfg = toy_model("tiny", tokenizer=tok)
    assert model.num_image_tokens == 16 and model.image_size == 112
    assert model.llm.config.hidden_size == 256 and model.llm.config._attn_implementation == "sdpa"
    assert model.encoder.config._attn_implementation == "sdpa"
    assert model.llm.get_input_embeddings().num_embeddings == len(tok)
    assert next(model.parameters()).dtype == torch.float32  # CPU default


def test_features_are_the_last_layer_without_the_final_norm(toy):
    model = toy[0]
    pixel_values = torch.randn(2, 3, model.image_size, model.image_size)
    enc = model.encoder
    manual = enc.embeddings(pixel_values)
    for layer in enc.encoder.layer:
        manual = layer(manual)
    feats = model.image_features(pixel_values)
    assert torch.allclose(feats, manual[:, 1:], atol=1e-5)
    normed = enc(pixel_values=pixel_values).last_hidden_state[:, 1:]
    assert not torch.allclose(feats, normed, atol=1e-3)


def test_splicing_several_images_per_sample(toy):
    model, tok, _ = toy
    rows = [prompt(model, tok, 2, "two images"), prompt(model, tok, 1, "one")]
    ids, _ = left_pad(rows, model.pad_token_id)
    pixel_values = torch.randn(3, 3, model.image_size, model.image_size)
    embeds = model.embed_inputs(ids, pixel_values)
    image_tokens = model.encode_images(pixel_values)
    m = model.num_image_tokens
    pos0 = (ids[0] == model.image_token_id).nonzero().flatten()
    pos1 = (ids[1] == model.image_token_id).nonzero().flatten()
    assert torch.allclose(embeds[0, pos0[:m]], image_tokens[0])
    assert torch.allclose(embeds[0, pos0[m:]], image_tokens[1])
    assert torch.allclose(embeds[1, pos1], image_tokens[2])
    text = ids != model.image_token_id
    assert torch.equal(embeds[text], model.llm.get_input_embeddings()(ids)[text])


def test_text_only_logits_equal_the_plain_llm(toy):
    model, tok, _ = toy
    rows = [tok.encode("the heart is normal in size"), tok.encode("no effusion")]
    ids, mask = left_pad(rows, model.pad_token_id)
    ours = model(ids, mask).logits
    for i, row in enumerate(rows):
        plain = model.llm(input_ids=torch.tensor([row])).logits[0]
        assert torch.allclose(ours[i, mask[i].bool()], plain, atol=1e-5)


def test_loss_is_cross_entropy_on_labelled_tokens(toy):
    model, tok, _ = toy
    ids = torch.tensor([prompt(model, tok, 1, "report") + tok.encode("clear lungs")])
    labels = ids.clone()
    labels[0, :-3] = IGNORE_INDEX
    pixel_values = torch.randn(1, 3, model.image_size, model.image_size)
    out = model(ids, pixel_values=pixel_values, labels=labels)
    manual = F.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX)
    assert torch.allclose(out.loss, manual, atol=1e-5)


# ---------------------------------------------------------------------------- bad input
def test_bad_input_errors(toy):
    model, tok, _ = toy
    ids = torch.tensor([prompt(model, tok, 2, "x")])
    s = model.image_size
    with pytest.raises(ImageTokenError, match="2 image placeholder.*but 1 image"):
        model(ids, pixel_values=torch.randn(1, 3, s, s))
    with pytest.raises(ImageTokenError, match="not a multiple of"):
        model(ids[:, : -5 - model.num_image_tokens // 2], pixel_values=torch.randn(2, 3, s, s))
    with pytest.raises(ValueError, match=rf"expected \(N, 3, {s}, {s}\)"):
        model(ids, pixel_values=torch.randn(2, 3, s + 1, s + 1))
    with pytest.raises(ValueError, match="float tensor"):
        model(ids, pixel_values=torch.zeros(2, 3, s, s, dtype=torch.uint8))
    too_long = torch.full((1, model.max_length + 1), 5)
    with pytest.raises(SequenceTooLongError, match="llm.max_length"):
        model(too_long)
    with pytest.raises(SequenceTooLongError):
        model.generate(too_long)


def test_build_errors(tok, tmp_path):
    cfg = load_preset("smoke")
    with pytest.raises(ValueError, match="backbones_dir"):
        build_model(cfg, tok)
    with pytest.raises(MissingArtifactError, match="02-backbones"):
        build_model(cfg, tok, backbones_dir=tmp_path)
    with pytest.raises(ValueError, match="tokenizer"):
        build_model(cfg, None)
    model = build_model(cfg, tok, load_pretrained=False)
    with pytest.raises(ValueError, match="unknown trainable part 'decoder'"):
        set_trainable(model, ["decoder"])
    with pytest.raises(ValueError, match="add_lora"):
        set_trainable(model, ["lora"])


@pytest.mark.skipif(hf_cached("mistralai/Mistral-7B-Instruct-v0.2"), reason="Mistral is cached")
def test_missing_paper_weights_name_the_model():
    cfg = load_preset("paper", {"encoder": {"hf_id": None}})  # reach the LLM even without Rad-DINO
    cfg["encoder"].update(load_preset("smoke")["encoder"])
    with pytest.raises(MissingWeightsError, match="mistralai/Mistral-7B-Instruct-v0.2"):
        build_model(cfg, toy_tokenizer(), load_pretrained={"llm"})


@pytest.mark.skipif(hf_cached("microsoft/rad-dino"), reason="Rad-DINO is cached here")
def test_missing_rad_dino_names_the_model():
    with pytest.raises(MissingWeightsError, match="microsoft/rad-dino.*huggingface-cli download"):
        build_encoder(load_preset("paper"))


# ---------------------------------------------------------------------------- LoRA and phases
def test_lora_targets_and_trainable_sets(toy):
    model, tok, cfg = toy
    ids = torch.tensor([tok.encode("the lungs are clear")])
    before = model(ids).logits
    add_lora(model, cfg)
    assert torch.allclose(model(ids).logits, before)  # LoRA starts as a no-op
    lora_names = [n for n, _ in model.llm.named_parameters() if "lora_A" in n]
    assert len(lora_names) == 2 * cfg["llm"]["num_layers"]
    assert all(".q_proj." in n or ".v_proj." in n for n in lora_names)
    q = model.llm.base_model.model.model.layers[0].self_attn.q_proj
    assert q.r["default"] == 8 and q.scaling["default"] == 32 / 8
    assert q.lora_dropout["default"].p == 0.05

    set_trainable(model, cfg["train"]["phase1"]["trainable"])
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"projector"}

    set_trainable(model, cfg["train"]["phase2"]["trainable"])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {n.split(".")[0] for n in names} == {"projector", "encoder", "llm"}
    assert all("lora_" in n for n in names if n.startswith("llm."))
    assert not any(n.startswith("encoder.layernorm") for n in names)
    assert model.trainable_parts == ["projector", "lora", "encoder"]


def test_gradient_checkpointing_keeps_gradients_and_recomputes(tok):
    """Phase-2 gradients (LoRA + projector + encoder) with and without checkpointing agree, and
    with it on, each encoder and LLM layer runs twice per step (forward, then recomputation)."""
    model, _, cfg = toy_model("smoke", seed=0, tokenizer=tok, lora=True)
    perturb([p for n, p in model.llm.named_parameters() if "lora_B" in n])  # B = 0 at start
    set_trainable(model, cfg["train"]["phase2"]["trainable"])
    model.train()
    ids = torch.tensor([prompt(model, tok, 2, "report") + tok.encode("clear lungs")] * 2)
    labels = ids.clone()
    labels[:, :-4] = IGNORE_INDEX
    pixel_values = torch.randn(4, 3, model.image_size, model.image_size)
    calls = {"encoder": 0, "llm": 0}
    # hooks on the attention INSIDE the first layer: transformers keeps a layer's own hooks
    # outside the checkpoint, and PyTorch may stop a recomputation early once backward has the
    # tensors it needs, but the attention (first in the layer) is always recomputed
    model.encoder.encoder.layer[0].attention.register_forward_hook(
        lambda *_: calls.update(encoder=calls["encoder"] + 1)
    )
    model.llm.base_model.model.model.layers[0].self_attn.register_forward_hook(
        lambda *_: calls.update(llm=calls["llm"] + 1)
    )

    def grads():
        calls.update(encoder=0, llm=0)
        torch.manual_seed(1)  # same LoRA dropout masks in both runs
        model.zero_grad(set_to_none=True)
        model(ids, pixel_values=pixel_values, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    assert calls == {"encoder": 1, "llm": 1}
    on = {"encoder": {"gradient_checkpointing": True}, "llm": {"gradient_checkpointing": True}}
    assert enable_gradient_checkpointing(model, load_preset("smoke", on)) == ["encoder", "llm"]
    checkpointed = grads()
    assert calls == {"encoder": 2, "llm": 2}
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name, g in plain.items():
        assert g.abs().sum() > 0, name
        assert torch.allclose(g, checkpointed[name], rtol=1e-4, atol=1e-6), name
    assert load_preset("tiny")["llm"]["gradient_checkpointing"] is False


# ---------------------------------------------------------------------------- save / load
def perturb(params):
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("parts", [["projector"], ["lora", "projector", "encoder"]])
def test_save_load_round_trip_gives_identical_outputs(tok, tmp_path, parts):
    cfg = load_preset("smoke")
    # What notebook 02 leaves behind: base encoder and LLM in save_pretrained format.
    torch.manual_seed(0)
    base = build_model(cfg, tok, load_pretrained=False)
    base.encoder.save_pretrained(tmp_path / "backbones" / "encoder")
    base.llm.save_pretrained(tmp_path / "backbones" / "llm")

    model = build_model(cfg, tok, backbones_dir=tmp_path / "backbones", lora="lora" in parts)
    set_trainable(model, parts)
    perturb(p for p in model.parameters() if p.requires_grad)  # "training"
    save_trained(model, tmp_path / "ckpt", cfg, backbones_dir=tmp_path / "backbones")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {
        "trained.safetensors",
        "trained.json",
        "config.json",
        "tokenizer",
    }

    loaded = load_trained(tmp_path / "ckpt")
    ids = torch.tensor([prompt(model, tok, 1, "report")])
    pixel_values = torch.randn(1, 3, model.image_size, model.image_size)
    assert torch.equal(
        model(ids, pixel_values=pixel_values).logits, loaded(ids, pixel_values=pixel_values).logits
    )
    a = model.generate(ids, pixel_values=pixel_values, max_new_tokens=6).sequences
    b = loaded.generate(ids, pixel_values=pixel_values, max_new_tokens=6).sequences
    assert torch.equal(a, b)
    assert loaded.tokenizer.get_vocab() == tok.get_vocab()
    assert not any(p.requires_grad for p in loaded.parameters())

    # phase 2 starting from a phase-1 checkpoint: weights go into an existing model
    fresh = build_model(cfg, tok, backbones_dir=tmp_path / "backbones", lora="lora" in parts)
    assert sorted(load_trained_weights(fresh, tmp_path / "ckpt")) == sorted(parts)
    assert torch.equal(fresh.projector.pos_emb, model.projector.pos_emb)


def test_load_errors(tmp_path):
    with pytest.raises(MissingArtifactError, match="trained.json"):
        load_trained(tmp_path)


# ---------------------------------------------------------------------------- generation
def pseudo_eos(model, tok, ids, mask, pixel_values):
    """A token that sample 0 emits early and sample 1 never: used as </s> so samples finish
    at different steps (a random model never emits the real </s>)."""
    seqs = model.generate(ids, mask, pixel_values, max_new_tokens=10).sequences
    for t in seqs[0, 1:5].tolist():
        if t not in seqs[1].tolist():
            return t
    pytest.skip("no token separates the two samples")


@pytest.fixture()
def two_prompts(toy):
    model, tok, _ = toy
    rows = [prompt(model, tok, 1, "lungs"), prompt(model, tok, 2, "the heart is normal in size")]
    ids, mask = left_pad(rows, model.pad_token_id)
    pixel_values = torch.randn(3, 3, model.image_size, model.image_size)
    return model, tok, rows, ids, mask, pixel_values


def test_batched_left_padded_generation_equals_per_sample(two_prompts):
    model, tok, rows, ids, mask, pv = two_prompts
    model.eos_token_id = pseudo_eos(model, tok, ids, mask, pv)
    batch = model.generate(ids, mask, pv, max_new_tokens=8)
    assert batch.finished.tolist() == [True, False]
    singles = [
        model.generate(torch.tensor([rows[0]]), None, pv[:1], max_new_tokens=8),
        model.generate(torch.tensor([rows[1]]), None, pv[1:], max_new_tokens=8),
    ]
    assert batch.token_lists() == [s.token_lists()[0] for s in singles]
    # after </s> the finished sample is padded, and the turn is closed in the tails
    n0 = len(batch.token_lists()[0])
    assert batch.sequences[0, n0] == model.eos_token_id
    assert (batch.sequences[0, n0 + 1 :] == model.pad_token_id).all()
    assert batch.tails[0] == [] and batch.tails[1][-1] == model.eos_token_id


def test_cached_continuation_equals_full_recomputation(two_prompts):
    model, tok, rows, ids, mask, pv = two_prompts
    model.eos_token_id = pseudo_eos(model, tok, ids, mask, pv)
    turn1 = model.generate(ids, mask, pv, max_new_tokens=8)
    assert turn1.finished.tolist() == [True, False]  # sample 0 leaves a hole in the cache
    turn2_rows = [
        tok.encode("[INST] based on the previous [/INST]"),
        tok.encode("[INST] more [/INST]"),
    ]
    t2_ids, t2_mask = left_pad(turn2_rows, model.pad_token_id)
    cached = model.generate(t2_ids, t2_mask, max_new_tokens=6, past=turn1, output_scores=True)

    images = [pv[:1], pv[1:]]
    for i in range(2):
        full = rows[i] + turn1.token_lists()[i] + [model.eos_token_id] + turn2_rows[i]
        again = model.generate(torch.tensor([full]), None, images[i], max_new_tokens=6)
        assert cached.token_lists()[i] == again.token_lists()[0]
        # and the logits themselves, not only their argmax
        logits_full = model(torch.tensor([full]), pixel_values=images[i]).logits[0, -1]
        assert torch.allclose(cached.scores[i, 0], logits_full, atol=1e-4)
    with pytest.raises(ValueError, match="already continued"):
        model.generate(t2_ids, t2_mask, past=turn1)


def test_batch_size_of_a_continuation_must_match(two_prompts):
    model, tok, rows, ids, mask, pv = two_prompts
    turn1 = model.generate(ids, mask, pv, max_new_tokens=2)
    with pytest.raises(ValueError, match="batch size"):
        model.generate(torch.tensor([[5, 6]]), past=turn1)


def test_hub_code_path_with_local_folders(tok, tmp_path):
    """The ``paper`` path (hf_id set, local_files_only) run on small models saved to folders:
    the LLM's embeddings grow by the added tokens, new rows = mean of the old ones."""
    cfg = load_preset("smoke")
    torch.manual_seed(0)
    base = build_model(cfg, tok, load_pretrained=False)
    base.encoder.save_pretrained(tmp_path / "enc")
    small = toy_model("smoke", tokenizer=toy_tokenizer(vocab_size=300))[0]
    small.llm.save_pretrained(tmp_path / "llm")
    ImageProcessor(cfg).hf.save_pretrained(tmp_path / "enc")
    old = small.llm.get_input_embeddings().num_embeddings
    assert old < len(tok)

    cfg["encoder"]["hf_id"], cfg["llm"]["hf_id"] = str(tmp_path / "enc"), str(tmp_path / "llm")
    model = build_model(cfg, tok)
    assert torch.equal(model.encoder.embeddings.cls_token, base.encoder.embeddings.cls_token)
    emb = model.llm.get_input_embeddings().weight
    assert emb.shape[0] == len(tok)
    assert torch.allclose(emb[old:], emb[:old].mean(0).expand(len(tok) - old, -1))
    assert ImageProcessor(cfg)([np.zeros((72, 64), np.uint8)]).shape[-1] == 56
    cfg["encoder"]["image_size"] = 70
    with pytest.raises(ValueError, match="crops to 56 px"):
        ImageProcessor(cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_defaults_to_bf16_and_generates(tok):
    cfg = load_preset("smoke")
    model = build_model(cfg, tok, device="cuda", load_pretrained=False)
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = torch.tensor([prompt(model, tok, 1, "report")])  # CPU ids: moved by the model
    pixel_values = torch.randn(1, 3, model.image_size, model.image_size)
    out = model.generate(ids, pixel_values=pixel_values, max_new_tokens=4)
    assert out.sequences.shape == (1, 4) and out.sequences.is_cuda
