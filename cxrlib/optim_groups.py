"""Optimiser parameter groups: decayed or not, and optionally a learning rate per model part.

Phase 2 trains LoRA, the projector and the pre-trained encoder together. One learning rate for
all of them (LoRA's 1e-3) moves the encoder, pre-trained in notebook 02, as fast as freshly
initialised adapters; ``train.<stage>.lr_scale`` gives a part its own multiple of ``lr``:

    lr_scale: {encoder: 0.1}     # encoder at 1e-4, LoRA and projector at 1e-3

    groups = part_param_groups(named, weight_decay=1e-4, lr=1e-3, lr_scale={"encoder": 0.1})
    optimizer = torch.optim.AdamW(groups, lr=1e-3)

The schedule (warmup, cosine) multiplies every group's own rate by the same factor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from cxrlib.constants import TRAINABLE_PARTS

PARTS = TRAINABLE_PARTS  # as cxrlib.model.set_trainable names them


def part_of(name: str) -> str:
    """The part a parameter belongs to, from its name in ``M4CXR.named_parameters()`` (``module.``
    is the prefix DDP adds)."""
    if "lora_" in name:
        return "lora"
    head = name.removeprefix("module.").split(".", 1)[0]
    return head if head in PARTS else "other"


def decays(name: str, p: torch.nn.Parameter) -> bool:
    """Weight decay on matrices only (not on biases, norms or positional vectors), as HF does."""
    return p.ndim >= 2 and "norm" not in name.lower()


def param_groups(named: Sequence[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list:
    """The two AdamW groups of one learning rate: decayed matrices, then everything else."""
    decay = [p for n, p in named if decays(n, p)]
    no_decay = [p for n, p in named if not decays(n, p)]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def part_param_groups(
    named: Sequence[tuple[str, torch.nn.Parameter]],
    weight_decay: float,
    lr: float,
    lr_scale: Mapping[str, float] | None = None,
) -> list[dict]:
    """AdamW groups by (part, decay or not), each part at ``lr * lr_scale.get(part, 1)``.

    Raises:
        ValueError: ``lr_scale`` names an unknown part, gives a part with no trainable parameter
            a scale other than 1, or a scale that is not positive (a silently ignored scale
            would be a wrong experiment).
    """
    lr_scale = dict(lr_scale or {})
    unknown = sorted(set(lr_scale) - set(PARTS))
    if unknown:
        raise ValueError(f"lr_scale names unknown parts {unknown}: choose from {', '.join(PARTS)}")
    bad = {k: v for k, v in lr_scale.items() if not float(v) > 0}
    if bad:
        raise ValueError(f"lr_scale values must be positive, got {bad}")
    groups: dict[tuple[str, bool], list] = {}
    for name, p in named:
        groups.setdefault((part_of(name), decays(name, p)), []).append(p)
    trained = {part for part, _ in groups}
    idle = sorted(k for k, v in lr_scale.items() if k not in trained and float(v) != 1.0)
    if idle:
        raise ValueError(f"lr_scale names {idle}, which train no parameter in this stage")
    return [
        {
            "params": params,
            "weight_decay": weight_decay if decay else 0.0,
            "lr": lr * float(lr_scale.get(part, 1.0)),
            "part": part,
        }
        for (part, decay), params in groups.items()
    ]
