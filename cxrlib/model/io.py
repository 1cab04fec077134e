"""Save and load only what was trained (projector, LoRA adapters, encoder if trained).

A checkpoint folder holds::

    trained.safetensors   the trained parts' weights (names as in ``model.state_dict()``)
    trained.json          which parts, the LoRA settings, where the base weights live
    config.json           the resolved preset (``cxrlib.config.save_config``)
    tokenizer/            the tokenizer (``save_pretrained`` format)

The frozen base weights are not copied: ``paper`` takes them from the Hugging Face cache, ``tiny``
and ``smoke`` from notebook 02's ``<out>/backbones`` (its path is stored relative to the
checkpoint). ``load_trained(directory)`` rebuilds the model for inference without the training
code.

    >>> save_trained(model, out / "phase2", cfg)
    >>> model = load_trained(out / "phase2", device="cuda")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from cxrlib.config import load_config, save_config
from cxrlib.model.build import PARTS, add_lora, build_model, has_lora, parameters_of
from cxrlib.model.m4cxr import M4CXR
from cxrlib.utils import MissingArtifactError, check_stage_complete

WEIGHTS_FILE = "trained.safetensors"
MANIFEST_FILE = "trained.json"
TOKENIZER_DIR = "tokenizer"


def trained_state_dict(model: M4CXR, parts: list[str]) -> dict[str, torch.Tensor]:
    """The weights of ``parts`` (all of a part's weights, including ones kept frozen in it)."""
    state = model.state_dict()
    keep = {}
    for part in parts:
        if part == "encoder":  # the whole encoder, so a reload needs no encoder base weights
            names = [k for k in state if k.startswith("encoder.")]
        else:
            names = [n for n, _ in parameters_of(model, part)]
            if part == "projector":
                names += [k for k in state if k.startswith("projector.")]  # buffers too
        for name in names:
            keep[name] = state[name].detach().contiguous().cpu()
    return keep


def save_trained(
    model: M4CXR,
    directory: str | Path,
    cfg: dict,
    parts: list[str] | None = None,
    backbones_dir: str | Path | None = None,
    tokenizer=None,
) -> Path:
    """Write the trained parts, the resolved config and the tokenizer to ``directory``.

    Args:
        model: the trained model.
        directory: checkpoint folder (created).
        cfg: the resolved preset used for training.
        parts: what to save; default ``model.trainable_parts`` (set by ``set_trainable``).
        backbones_dir: ``<out>/backbones`` the base weights came from (``tiny``/``smoke``).
        tokenizer: default ``model.tokenizer`` (attached by ``build_model``).

    Returns:
        The checkpoint folder.
    """
    parts = list(parts if parts is not None else model.trainable_parts)
    if not parts:
        raise ValueError(
            "nothing to save: pass parts=[...] or call set_trainable(model, parts) before training"
        )
    for part in parts:
        if part not in PARTS:
            raise ValueError(f"unknown part '{part}': choose from {', '.join(PARTS)}")
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    if tokenizer is None:
        raise ValueError("no tokenizer to save: pass tokenizer=... (or build with build_model)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    save_file(trained_state_dict(model, parts), directory / WEIGHTS_FILE)
    manifest = {
        "parts": parts,
        "lora": dict(cfg["lora"]) if has_lora(model) else None,
        # relative, so the whole output folder can move
        "backbones_dir": os.path.relpath(Path(backbones_dir).resolve(), directory.resolve())
        if backbones_dir is not None
        else None,
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    save_config(cfg, directory)
    tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
    return directory


def load_trained_weights(model: M4CXR, directory: str | Path) -> list[str]:
    """Load a checkpoint's saved parts into an existing model (e.g. phase 1's projector).

    Returns:
        The parts that were loaded.
    """
    directory = Path(directory)
    path = directory / WEIGHTS_FILE
    if not path.exists():
        raise MissingArtifactError(f"{path} does not exist: is {directory} a cxrlib checkpoint?")
    state = load_file(str(path))
    if any(".lora_" in k for k in state) and not has_lora(model):
        raise ValueError(f"{directory} holds LoRA adapters: call add_lora(model, cfg) first")
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(
            f"{directory} does not fit this model; unexpected weights, e.g. "
            f"{result.unexpected_keys[:3]}: was it trained with another preset?"
        )
    return json.loads((directory / MANIFEST_FILE).read_text())["parts"]


def load_trained(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    backbones_dir: str | Path | None = None,
    allow_incomplete: bool = False,
) -> M4CXR:
    """Rebuild a saved model for inference (frozen, eval mode, tokenizer in ``model.tokenizer``).

    Args:
        directory: a folder written by ``save_trained``.
        device: where to put the model.
        dtype: default bf16 on GPU, fp32 on CPU.
        backbones_dir: override the stored location of notebook 02's base weights.
        allow_incomplete: load a stage whose training stopped early (``--max-steps``) with a
            warning instead of ``IncompleteArtifactError``.
    """
    directory = Path(directory)
    check_stage_complete(directory, allow_incomplete=allow_incomplete)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.exists():
        raise MissingArtifactError(
            f"{manifest_path} does not exist: train first (notebooks 03/04 write phase1/ and "
            "phase2/) or point to a folder written by save_trained"
        )
    manifest = json.loads(manifest_path.read_text())
    cfg = load_config(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(directory / TOKENIZER_DIR))
    if backbones_dir is None and manifest["backbones_dir"] is not None:
        backbones_dir = directory / manifest["backbones_dir"]
    # Base weights are needed only for parts that were not saved in full.
    pretrained = {"llm"} if "llm" not in manifest["parts"] else set()
    if "encoder" not in manifest["parts"]:
        pretrained.add("encoder")
    model = build_model(
        cfg,
        tokenizer,
        device=device,
        dtype=dtype,
        load_pretrained=pretrained,
        backbones_dir=backbones_dir,
    )
    if manifest["lora"] is not None:
        add_lora(model, {"lora": manifest["lora"]})
    load_trained_weights(model, directory)
    model.requires_grad_(False)
    model.trainable_parts = list(manifest["parts"])
    return model.eval()
