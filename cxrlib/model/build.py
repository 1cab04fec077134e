"""Builders: one function per part, one ``build_model`` for the whole M4CXR, LoRA, trainable sets.

The same code builds every preset; only where the weights come from differs:

| part | ``paper`` | ``tiny`` / ``smoke`` |
|---|---|---|
| encoder | ``microsoft/rad-dino`` from the local HF cache | ``Dinov2Config`` from the preset; weights from notebook 02 (``<out>/backbones/encoder``) |
| projector | C-Abstractor, fresh | same code, smaller |
| LLM | ``mistralai/Mistral-7B-Instruct-v0.2`` from the cache, embeddings resized for ``<image>`` | ``MistralConfig`` from the preset and the trained tokenizer; weights from notebook 02 (``<out>/backbones/llm``) |

    >>> model = build_model(cfg, tokenizer, backbones_dir=out / "backbones")  # tiny, phase 1
    >>> model = build_model(load_preset("paper"), None, meta=True)           # shapes only
    >>> add_lora(model, cfg); set_trainable(model, cfg["train"]["phase2"]["trainable"])
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import Dinov2Config, Dinov2Model, MistralConfig, MistralForCausalLM

from cxrlib.constants import BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, NOTEBOOKS, TRAINABLE_PARTS
from cxrlib.model.m4cxr import M4CXR
from cxrlib.model.projector import CAbstractor
from cxrlib.tokenizer import MissingWeightsError, missing_weights_message
from cxrlib.utils import default_dtype, require_artifact

PARTS = TRAINABLE_PARTS  # what set_trainable understands
BACKBONE_NOTEBOOK = NOTEBOOKS["backbones"]
ATTN = "sdpa"  # PyTorch scaled-dot-product attention, in both encoder and LLM

# Mistral-7B-Instruct-v0.2's settings that the preset does not list; the small LLM copies them.
MISTRAL_V02 = {"rope_theta": 1.0e6, "rms_norm_eps": 1e-5, "sliding_window": None}
PAPER_MAX_POSITIONS = 32768  # Mistral-7B-Instruct-v0.2's context length


class TokenIds:
    """The special ids the model needs, from a tokenizer or (meta builds) a fake vocabulary."""

    def __init__(self, tokenizer=None, vocab_size: int | None = None):
        if tokenizer is not None:
            ids = {
                t: tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_TOKEN, BOS_TOKEN, EOS_TOKEN)
            }
            if ids[IMAGE_TOKEN] is None or ids[IMAGE_TOKEN] == tokenizer.unk_token_id:
                raise ValueError(
                    f"the tokenizer has no {IMAGE_TOKEN} token: build it with "
                    "cxrlib.tokenizer.train_bpe_tokenizer or load_tokenizer"
                )
            self.vocab_size = len(tokenizer)
            self.image, self.bos, self.eos = ids[IMAGE_TOKEN], ids[BOS_TOKEN], ids[EOS_TOKEN]
            self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        else:  # Mistral's ids (<unk>=0, <s>=1, </s>=2) and <image> appended after the vocabulary
            self.vocab_size = vocab_size + 1
            self.image, self.bos, self.eos, self.pad = vocab_size, 1, 2, 0


# ---------------------------------------------------------------------------- configs
def encoder_config(cfg: dict) -> Dinov2Config:
    """A DINOv2 config from ``cfg["encoder"]`` (no register tokens, like Rad-DINO)."""
    e = cfg["encoder"]
    if e["hidden_size"] % e["num_heads"]:
        raise ValueError(
            f"encoder.hidden_size {e['hidden_size']} is not divisible by num_heads {e['num_heads']}"
        )
    return Dinov2Config(
        hidden_size=e["hidden_size"],
        num_hidden_layers=e["num_layers"],
        num_attention_heads=e["num_heads"],
        mlp_ratio=e["mlp_ratio"],
        image_size=e["image_size"],
        patch_size=e["patch_size"],
        num_channels=3,
        attn_implementation=ATTN,
    )


def llm_config(cfg: dict, ids: TokenIds) -> MistralConfig:
    """A Mistral config from ``cfg["llm"]`` with the tokenizer's vocabulary and special ids."""
    m = cfg["llm"]
    if m["hidden_size"] % m["num_heads"] or m["num_heads"] % m["num_kv_heads"]:
        raise ValueError(
            f"llm.hidden_size {m['hidden_size']} must divide by num_heads {m['num_heads']}, "
            f"which must divide by num_kv_heads {m['num_kv_heads']}"
        )
    max_positions = PAPER_MAX_POSITIONS if m["hf_id"] else m["max_length"]
    return MistralConfig(
        vocab_size=ids.vocab_size,
        hidden_size=m["hidden_size"],
        intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_layers"],
        num_attention_heads=m["num_heads"],
        num_key_value_heads=m["num_kv_heads"],
        max_position_embeddings=max(max_positions, m["max_length"]),
        rms_norm_eps=MISTRAL_V02["rms_norm_eps"],
        sliding_window=MISTRAL_V02["sliding_window"],
        rope_parameters={"rope_type": "default", "rope_theta": MISTRAL_V02["rope_theta"]},
        bos_token_id=ids.bos,
        eos_token_id=ids.eos,
        pad_token_id=ids.pad,
        tie_word_embeddings=False,
        attn_implementation=ATTN,
    )


# ---------------------------------------------------------------------------- parts
def _check_width(model: nn.Module, expected: int, what: str, key: str, source: str) -> None:
    got = model.config.hidden_size
    if got != expected:
        raise ValueError(
            f"{what} loaded from {source} has hidden size {got} but the preset says "
            f"{key} = {expected}: rebuild it with notebook {BACKBONE_NOTEBOOK} or fix the preset"
        )


def build_encoder(
    cfg: dict,
    pretrained: bool = True,
    backbones_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
) -> Dinov2Model:
    """The vision encoder: Rad-DINO (``paper``), notebook 02's weights, or random (``tiny``).

    Args:
        cfg: resolved preset.
        pretrained: load weights (HF cache for ``encoder.hf_id``, else ``backbones_dir/encoder``).
        backbones_dir: ``<out>/backbones`` of notebook 02; required when pretrained and no hf_id.
        dtype: dtype to load pre-trained weights in (default: as stored).
    """
    hf_id = cfg["encoder"]["hf_id"]
    kw = {"attn_implementation": ATTN, "dtype": dtype or "auto"}
    if not pretrained:
        return Dinov2Model(encoder_config(cfg))
    if hf_id:
        source = hf_id
        try:
            model = Dinov2Model.from_pretrained(hf_id, local_files_only=True, **kw)
        except OSError as err:
            raise MissingWeightsError(missing_weights_message(hf_id)) from err
    else:
        path = require_artifact(_backbones(backbones_dir, "encoder"), made_by=BACKBONE_NOTEBOOK)
        source = str(path)
        model = Dinov2Model.from_pretrained(path, **kw)
    _check_width(model, cfg["encoder"]["hidden_size"], "the encoder", "encoder.hidden_size", source)
    return model


def build_llm(
    cfg: dict,
    tokenizer=None,
    pretrained: bool = True,
    backbones_dir: str | Path | None = None,
    ids: TokenIds | None = None,
    dtype: torch.dtype | None = None,
) -> MistralForCausalLM:
    """The language model: Mistral-7B-Instruct (``paper``), notebook 02's weights, or random.

    Args:
        cfg: resolved preset.
        tokenizer: the preset's tokenizer (vocabulary size and special ids).
        pretrained: load weights (HF cache for ``llm.hf_id``, else ``backbones_dir/llm``).
        backbones_dir: ``<out>/backbones`` of notebook 02; required when pretrained and no hf_id.
        ids: special ids (default: read from ``tokenizer``).
        dtype: dtype to load pre-trained weights in (default: as stored).
    """
    ids = ids or TokenIds(tokenizer)
    kw = {"attn_implementation": ATTN, "dtype": dtype or "auto"}
    hf_id = cfg["llm"]["hf_id"]
    if not pretrained:
        return MistralForCausalLM(llm_config(cfg, ids))
    if hf_id:
        source = hf_id
        try:
            model = MistralForCausalLM.from_pretrained(hf_id, local_files_only=True, **kw)
        except OSError as err:
            raise MissingWeightsError(missing_weights_message(hf_id)) from err
        old = model.get_input_embeddings().num_embeddings
        if old != ids.vocab_size:
            # <image> was added to Mistral's tokenizer: new rows set to the mean of the old ones
            # (deterministic, so a reloaded checkpoint gives the same logits; the input row is
            # never used anyway: image positions receive projector outputs).
            model.resize_token_embeddings(ids.vocab_size, mean_resizing=False)
            with torch.no_grad():
                for table in (model.get_input_embeddings(), model.get_output_embeddings()):
                    table.weight[old:] = table.weight[:old].mean(dim=0)
        model.config.pad_token_id = ids.pad
    else:
        path = require_artifact(_backbones(backbones_dir, "llm"), made_by=BACKBONE_NOTEBOOK)
        source = str(path)
        model = MistralForCausalLM.from_pretrained(path, **kw)
        vocab = model.get_input_embeddings().num_embeddings
        if vocab != ids.vocab_size:
            raise ValueError(
                f"the LLM in {path} has {vocab} token embeddings but the tokenizer has "
                f"{ids.vocab_size} tokens: use the tokenizer saved by notebook {BACKBONE_NOTEBOOK}"
            )
    _check_width(model, cfg["llm"]["hidden_size"], "the LLM", "llm.hidden_size", source)
    return model


def _backbones(backbones_dir: str | Path | None, part: str) -> Path:
    if backbones_dir is None:
        raise ValueError(
            f"the preset builds its {part} from a config, so its pre-trained weights come from "
            f"notebook {BACKBONE_NOTEBOOK}: pass backbones_dir=<out>/backbones, or "
            "load_pretrained=False for random weights"
        )
    return Path(backbones_dir) / part


# ---------------------------------------------------------------------------- the model
def build_model(
    cfg: dict,
    tokenizer=None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    meta: bool = False,
    load_pretrained: bool | Iterable[str] = True,
    backbones_dir: str | Path | None = None,
    lora: bool = False,
) -> M4CXR:
    """Build the M4CXR model of a preset.

    Args:
        cfg: resolved preset (``cxrlib.config.load_preset``).
        tokenizer: the preset's tokenizer (``cxrlib.tokenizer.load_tokenizer``); may be None only
            with ``meta=True`` (Mistral's 32,000 ids plus ``<image>`` are assumed).
        device: where the model goes.
        dtype: parameter dtype; default bf16 on GPU, fp32 on CPU.
        meta: build on the meta device without weights (shapes and parameter counts only).
        load_pretrained: True = pre-trained encoder and LLM, False = random, or a subset of
            ``{"encoder", "llm"}`` to load only those (``load_trained`` uses this).
        backbones_dir: ``<out>/backbones`` written by notebook 02 (``tiny``/``smoke``).
        lora: add the LoRA adapters of ``cfg["lora"]`` right away (see ``add_lora``).

    Returns:
        An ``M4CXR`` in eval mode with every parameter frozen; call ``set_trainable`` to train.
    """
    if tokenizer is None and not meta:
        raise ValueError("build_model needs the preset's tokenizer (only meta=True builds omit it)")
    ids = TokenIds(tokenizer) if tokenizer is not None else TokenIds(None, cfg["llm"]["vocab_size"])
    if isinstance(load_pretrained, bool):
        pretrained = {"encoder", "llm"} if load_pretrained else set()
    else:
        pretrained = set(load_pretrained)
        if not pretrained <= {"encoder", "llm"}:
            raise ValueError(f"load_pretrained parts must be 'encoder'/'llm', got {pretrained}")
    if meta:
        pretrained = set()
    device = torch.device("meta") if meta else torch.device(device)
    dtype = dtype or default_dtype(device)

    ctx = torch.device("meta") if meta else contextlib.nullcontext()
    with ctx:
        encoder = build_encoder(cfg, "encoder" in pretrained, backbones_dir, dtype=dtype)
        llm = build_llm(cfg, tokenizer, "llm" in pretrained, backbones_dir, ids=ids, dtype=dtype)
        projector = CAbstractor.from_config(cfg)
    model = M4CXR(
        encoder=encoder,
        projector=projector,
        llm=llm,
        image_token_id=ids.image,
        pad_token_id=ids.pad,
        eos_token_id=ids.eos,
        max_length=cfg["llm"]["max_length"],
    )
    model.tokenizer = tokenizer
    enable_gradient_checkpointing(model, cfg)
    if lora:
        add_lora(model, cfg)
    if not meta:
        model.to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model.eval()


def enable_gradient_checkpointing(model: M4CXR, cfg: dict) -> list[str]:
    """Recompute activations in the backward pass (``encoder.gradient_checkpointing``,
    ``llm.gradient_checkpointing``): less memory for long sequences, about one more forward of
    compute; gradients are unchanged. Active only in ``train()`` mode (transformers' layers
    check ``self.training``).

    Returns:
        The parts it was enabled for.
    """
    done = []
    for part in ("encoder", "llm"):
        # .get: configs saved before this option existed (old checkpoints) have no such key
        if cfg[part].get("gradient_checkpointing", False):
            module = model.encoder if part == "encoder" else model.llm
            # non-reentrant checkpointing works when the layer inputs do not require grad (a
            # frozen LLM under LoRA) and is what PyTorch recommends
            module.activation_checkpointing_enable({"use_reentrant": False})
            done.append(part)
    return done


def has_lora(model: M4CXR) -> bool:
    return isinstance(model.llm, PeftModel)


def add_lora(model: M4CXR, cfg: dict) -> M4CXR:
    """Wrap the LLM with ``peft`` LoRA adapters (``cfg["lora"]``: r, alpha, dropout, targets).

    The adapters start as a no-op (LoRA's B matrix is zero), so outputs do not change.
    """
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    lc = cfg["lora"]
    config = LoraConfig(
        r=lc["r"],
        lora_alpha=lc["alpha"],
        lora_dropout=lc["dropout"],
        target_modules=list(lc["target_modules"]),
        task_type="CAUSAL_LM",
    )
    ref = model.llm.get_input_embeddings().weight
    with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        model.llm = get_peft_model(model.llm, config)
    if ref.device.type != "meta":  # new adapter weights follow the base model's device/dtype
        for name, p in model.llm.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(device=ref.device, dtype=ref.dtype)
    return model


def parameters_of(model: M4CXR, part: str) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs that ``set_trainable`` unfreezes for ``part``."""
    if part == "projector":
        return [(f"projector.{n}", p) for n, p in model.projector.named_parameters()]
    if part == "encoder":
        # The final LayerNorm (features are taken before it) and the mask token (used only by
        # masked-image pre-training) receive no gradient here, so they stay frozen.
        skip = ("layernorm.", "embeddings.mask_token")
        return [
            (f"encoder.{n}", p)
            for n, p in model.encoder.named_parameters()
            if not n.startswith(skip)
        ]
    if part == "lora":
        if not has_lora(model):
            raise ValueError("the model has no LoRA adapters: call add_lora(model, cfg) first")
        return [(f"llm.{n}", p) for n, p in model.llm.named_parameters() if "lora_" in n]
    if part == "llm":
        return [(f"llm.{n}", p) for n, p in model.llm.named_parameters() if "lora_" not in n]
    raise ValueError(f"unknown trainable part '{part}': choose from {', '.join(PARTS)}")


def set_trainable(model: M4CXR, parts: Iterable[str]) -> int:
    """Freeze everything, then unfreeze ``parts`` (from ``cfg["train"][phase]["trainable"]``).

    Args:
        model: the M4CXR model.
        parts: subset of ``"projector"``, ``"lora"``, ``"encoder"``, ``"llm"``.

    Returns:
        The number of trainable parameters.
    """
    parts = list(parts)
    for part in parts:
        if part not in PARTS:
            raise ValueError(f"unknown trainable part '{part}': choose from {', '.join(PARTS)}")
    model.requires_grad_(False)
    for part in parts:
        for _, p in parameters_of(model, part):
            p.requires_grad_(True)
    model.trainable_parts = sorted(set(parts), key=PARTS.index)
    return count_parameters(model, trainable_only=True)


def upcast_trainable(model: nn.Module) -> None:
    """Keep trainable weights in fp32 (frozen ones may stay bf16): autocast computes in bf16,
    but AdamW updates of ~1e-4 relative size would vanish in bf16 weights."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
