"""Encoder features computed once: phase 1 trains only the projector, so the frozen encoder's
output for an image never changes and is cached instead of recomputed every step.

    >>> features = cached_features(model, data.images, indices, cfg, out / "encoder_features.pt")
    >>> model(input_ids, attention_mask, features=features[rows])   # same logits as from pixels
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cxrlib.model import ImageProcessor


@torch.no_grad()
def encoder_features(
    model, images: np.ndarray, indices: Sequence[int], cfg: dict, batch_size: int = 32
) -> torch.Tensor:
    """Patch features (before the final norm, CLS dropped) of ``images[indices]``: (N, P, D)."""
    processor = ImageProcessor(cfg)
    device = next(model.encoder.parameters()).device
    out = []
    for k in tqdm(range(0, len(indices), batch_size), desc="encoder features", leave=False):
        pixels = processor([np.asarray(images[i]) for i in indices[k : k + batch_size]])
        out.append(model.image_features(pixels.to(device)).cpu())
    return torch.cat(out)


def cached_features(
    model, images, indices: list[int], cfg: dict, path: Path, accelerator=None
) -> torch.Tensor:
    """Encoder features of ``indices``, computed once and kept in ``path`` (``.pt``).

    The cache is keyed by the image indices and a hash of the encoder weights, so a changed
    dataset or encoder recomputes it instead of silently using stale features.
    """
    weights = torch.cat(
        [p.detach().flatten()[:64].float().cpu() for p in model.encoder.parameters()]
    )
    key = hashlib.sha256(weights.numpy().tobytes() + str(list(indices)).encode()).hexdigest()[:16]
    ctx = accelerator.main_process_first() if accelerator else contextlib.nullcontext()
    with ctx:
        if path.exists():
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if saved.get("key") == key:
                return saved["features"]
        features = encoder_features(model, images, indices, cfg)
        if accelerator is None or accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"key": key, "features": features}, path)
    return features
