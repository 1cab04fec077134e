"""A random M4CXR in a second, for tests, benchmarks and trying the API without trained weights.

    >>> model, tokenizer, cfg = toy_model("smoke")

The tokenizer is a byte-level BPE trained on the card's prompt strings and a few report
sentences; the model has random weights (``build_model(..., load_pretrained=False)``).
"""

from __future__ import annotations

import torch

from cxrlib.config import load_preset
from cxrlib.constants import COT_FINDINGS, ORGANS, SYSTEM_TEXT
from cxrlib.model.build import build_model
from cxrlib.model.m4cxr import M4CXR
from cxrlib.tokenizer import train_bpe_tokenizer

TOY_SENTENCES = [
    SYSTEM_TEXT,
    "Which of the following findings are present in the radiology image? Findings: "
    + ", ".join(COT_FINDINGS),
    "Based on the previous conversation, provide a description of the findings in the "
    "radiology image.",
    "Provide the bounding box coordinates of " + ", ".join(ORGANS) + " in the radiology image.",
    "The heart is normal in size. The lungs are clear. No pleural effusion or pneumothorax.",
    "Mild cardiomegaly. Small left pleural effusion with basilar atelectasis.",
    "Support devices in place. No acute osseous abnormality. Not found. Yes. No. [12,30,55,80]",
]


def toy_tokenizer(vocab_size: int = 400):
    """A small BPE tokenizer with the project's special tokens."""
    return train_bpe_tokenizer(TOY_SENTENCES * 4, vocab_size=vocab_size, min_frequency=1)


def toy_model(
    preset: str = "smoke", seed: int = 0, tokenizer=None, lora: bool = False, overrides=None
) -> tuple[M4CXR, object, dict]:
    """A randomly initialised M4CXR of ``preset`` (fp32, CPU).

    Returns:
        ``(model, tokenizer, cfg)``.
    """
    cfg = load_preset(preset, overrides)
    tokenizer = tokenizer or toy_tokenizer()
    torch.manual_seed(seed)
    model = build_model(cfg, tokenizer, load_pretrained=False, lora=lora, dtype=torch.float32)
    return model, tokenizer, cfg
