"""Reading the model's answers: CoT findings lists, boxes, yes/no (no torch, no model).

Every parser returns None for malformed text instead of raising, so the evaluation can count
malformed answers as wrong (and report how many there were):

    >>> parse_findings("cardiomegaly, edema.")       # ['cardiomegaly', 'edema']
    >>> parse_findings("Not found.")                 # []
    >>> parse_grounding("Yes. [10,20,30,40].")       # [[10, 20, 30, 40]]
    >>> parse_yes_no("Uncertain.")                   # 'uncertain'

The formats are the card's (``cxrlib.data.conversations`` writes them, ``cxrlib.data.boxes``
formats the boxes); parsing is as strict as the card's format unless a caller asks otherwise.
"""

from __future__ import annotations

import re

from cxrlib.constants import COT_FINDINGS
from cxrlib.data.boxes import parse_boxes
from cxrlib.data.conversations import NOT_FOUND, NOT_PRESENT

__all__ = ["parse_findings", "parse_grounding", "parse_multi_finding", "parse_yes_no"]


def _clean(text: str | None) -> str | None:
    if not isinstance(text, str):
        return None
    return re.sub(r"\s+", " ", text).strip().lower()


def parse_findings(text: str | None, strict: bool = True) -> list[str] | None:
    """Parse a CoT turn-1 answer (``"cardiomegaly, edema."`` / ``"Not found."``).

    Args:
        text: the model's answer.
        strict: if True every comma-separated item must be one of the 13 findings; if False
            unknown items are ignored.

    Returns:
        The findings named, deduplicated, in the card's order ([] for "Not found."); None when
        the answer is malformed (empty, or an unknown item in strict mode).
    """
    clean = _clean(text)
    if not clean:
        return None
    clean = clean.rstrip(". ")
    if clean == NOT_FOUND.lower().rstrip("."):
        return []
    items = [i.strip(" .") for i in clean.split(",")]
    known = [i for i in items if i in COT_FINDINGS]
    if not known or (strict and len(known) != len(items)):
        return None
    return [f for f in COT_FINDINGS if f in known]


def parse_yes_no(text: str | None) -> str | None:
    """``"Yes."`` / ``"Yes. [..]."`` -> ``yes``; ``"No."`` / ``"Not present."`` -> ``no``;
    ``"Uncertain."`` -> ``uncertain``; anything else -> None."""
    clean = _clean(text)
    if not clean:
        return None
    if clean.rstrip(". ") == NOT_PRESENT.lower().rstrip("."):
        return "no"
    word = re.match(r"^(yes|no|uncertain)\b", clean)
    return word.group(1) if word else None


def parse_grounding(text: str | None) -> list[list[int]] | None:
    """Boxes of a grounding answer; ``[]`` for "Not present."; None if no box can be read."""
    if parse_yes_no(text) == "no":
        return []
    boxes = parse_boxes(text, strict=False) if isinstance(text, str) else []
    return boxes or None


def parse_multi_finding(text: str | None) -> dict[str, list[list[int]]] | None:
    """``"edema [..], cardiomegaly [..], [..]."`` -> {finding: boxes}; {} for "Not found.";
    None when no known finding with a box can be read."""
    clean = _clean(text)
    if not clean:
        return None
    if clean.rstrip(". ") == NOT_FOUND.lower().rstrip("."):
        return {}
    out: dict[str, list[list[int]]] = {}
    pattern = "|".join(re.escape(f) for f in sorted(COT_FINDINGS, key=len, reverse=True))
    pieces = re.split(rf"({pattern})", clean)
    for name, boxes_text in zip(pieces[1::2], pieces[2::2]):
        boxes = parse_boxes(boxes_text, strict=False)
        if boxes:
            out.setdefault(name, []).extend(boxes)
    return out or None
