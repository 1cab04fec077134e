"""Training batches for the two M4CXR phases: phase-1 pairs and the collate both phases share.

>>> pairs = Phase1Pairs(data.studies, tokenizer, cfg, "train")   # <image> -> Findings
>>> collate = ConversationCollate(tokenizer.pad_token_id, cfg)
>>> batch = collate([pairs[0], pairs[1]])   # input_ids, attention_mask, labels, pixel_values
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from cxrlib.constants import FRONTAL_VIEWS, REPORT_SOURCES
from cxrlib.data.conversations import build_conversation
from cxrlib.data.tokenize import collate, encode_conversation
from cxrlib.model import ImageProcessor

# Phase 1's single-image report data: IU studies on the phantom path (not the longitudinal set),
# MIMIC-CXR on real data (the card: "MIMIC-CXR single images, report only").
PHASE1_SOURCES = REPORT_SOURCES  # phase-1 pairs need a written Findings section


class Phase1Pairs(Dataset):
    """Phase-1 "report only" pairs: every frontal image of the split's IU (or MIMIC-CXR) studies.

    Items are encoded conversations (``<image>`` -> Findings) plus the row of the image's cached
    features (or the raw image when the encoder trains and features cannot be cached).
    """

    def __init__(
        self,
        studies,
        tokenizer,
        cfg: dict,
        split: str = "train",
        source: str | tuple[str, ...] | None = PHASE1_SOURCES,
        allow_empty: bool = False,
    ):
        self.items, self.image_indices = [], []
        sources = (source,) if isinstance(source, str) else source
        for s in studies:
            if s["split"] != split or (sources and s["source"] not in sources):
                continue
            for im in s["images"]:
                if im["view"] not in FRONTAL_VIEWS:
                    continue
                conv = build_conversation("report_only", {**s, "images": [im]}, 0)
                if conv is None:
                    continue
                enc = encode_conversation(
                    conv, tokenizer, cfg["projector"]["num_queries"], cfg["llm"]["max_length"]
                )
                enc.update(image_index=im["index"], study_id=s["study_id"], row=len(self.items))
                self.items.append(enc)
                self.image_indices.append(im["index"])
        if not self.items and not allow_empty:
            raise ValueError(f"no frontal images with Findings in split '{split}' (notebook 01)")
        self.features = None  # set to the (N, P, D) cache, row-aligned with items
        self.images = None  # or the images.npy array when features are not cached

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.items[i])
        if self.features is not None:
            item["features"] = self.features[i]
        else:
            item["images"] = [np.asarray(self.images[item["image_index"]])]
        return item


class ConversationCollate:
    """``cxrlib.data.tokenize.collate`` plus what the model needs: cached ``features`` or
    ``pixel_values``."""

    def __init__(self, pad_id: int, cfg: dict):
        self.pad_id = pad_id
        self.processor = ImageProcessor(cfg)

    def __call__(self, items: list[dict]) -> dict:
        batch = collate(items, self.pad_id, padding_side="right")
        out = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        if "features" in items[0]:
            out["features"] = torch.stack([it["features"] for it in items])
        else:
            images = batch.get("images") or []
            out["pixel_values"] = self.processor(images) if images else None
        if "tasks" in batch:
            out["tasks"] = batch["tasks"]
        return out
