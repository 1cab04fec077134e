"""The VQA datasets: their own questions and answers become the records' ``qa`` (and ``diff_qa``,
``dialog``; fields in ``sources/base.py``), asked verbatim by the ``vqa`` / ``difference_vqa``
builders. They label nothing else (``label_space`` empty), so they make VQA conversations only.

SLAKE 1.0 (``data.roots.slake``; the paper's VQA test set)::

    imgs/xmlab102/source.jpg                      one folder per image
    train.json, validate.json, test.json          [{"img_name": "xmlab102/source.jpg", "question",
                                                    "answer", "answer_type": "OPEN"|"CLOSED",
                                                    "q_lang": "en"|"zh", "modality": "X-Ray"|"CT"|
                                                    "MRI", "location", "content_type", ...}, ...]

Only ``test.json`` is read (the paper evaluates on it and trains on no SLAKE question): English
(``q_lang == "en"``), closed (``answer_type == "CLOSED"``) questions about chest X-rays
(``modality == "X-Ray"`` and a chest ``location``: Chest*, Lung, Heart, Mediastinum). One record
per image, split ``test``; what was left out is counted. SLAKE's chest X-rays come from NIH
ChestX-ray14 under new names: an overlap with NIH's training images cannot be checked here.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from cxrlib.data.sources.base import (
    SourceInfo,
    check_root,
    empty_labels,
    find_file,
    image_entry,
    source_error,
    study_record,
)

SLAKE = SourceInfo(
    "slake", "SLAKE 1.0", "https://www.med-vqa.com/slake/",
    ("test.json (img_name, question, answer, answer_type, q_lang, modality, location)",
     "imgs/xmlab<N>/source.jpg"),
)  # fmt: skip
SLAKE_KEYS = ("img_name", "question", "answer", "answer_type", "q_lang", "modality", "location")
CHEST_WORDS = ("chest", "lung", "heart", "mediastin")


def read_json_items(info: SourceInfo, path: Path, keys: Sequence[str]) -> list[dict]:
    """A JSON list of objects, each with ``keys`` (the first item without them is named)."""
    try:
        items = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise source_error(info, f"cannot read {path} as JSON: {e}") from e
    if not isinstance(items, list):
        raise source_error(info, f"{path.name} holds a {type(items).__name__}, not a list",
                           expected=f"{path.name}: a JSON list of objects with {list(keys)}")  # fmt: skip
    for k, item in enumerate(items):
        missing = [key for key in keys if not isinstance(item, dict) or key not in item]
        if missing:
            raise source_error(info, f"{path.name} item {k} has no key(s) {missing}",
                               expected=f"{path.name}: items with {list(keys)}")  # fmt: skip
    return items


def is_chest(location) -> bool:
    return any(w in str(location).lower() for w in CHEST_WORDS)


def load_slake(root, cfg: dict, files=(("test.json", "test"),)) -> tuple[list[dict], dict]:
    """SLAKE's English closed chest X-ray questions, one record per image."""
    root = check_root(SLAKE, root)
    counts: Counter = Counter()
    by_image: dict[tuple[str, str], list[dict]] = {}
    for name, split in files:
        items = read_json_items(SLAKE, find_file(SLAKE, root, [name]), SLAKE_KEYS)
        counts[f"questions_{name}"] = len(items)
        for item in items:
            if item["q_lang"] != "en":
                counts["questions_not_english"] += 1
            elif item["modality"] != "X-Ray":
                counts["questions_not_xray"] += 1
            elif not is_chest(item["location"]):
                counts["xray_questions_not_chest"] += 1
            elif str(item["answer_type"]).upper() != "CLOSED":
                counts["open_questions"] += 1
            else:
                qa = {"question": str(item["question"]).strip(),
                      "answer": str(item["answer"]).strip(), "answer_type": "closed",
                      "question_type": item.get("content_type")}  # fmt: skip
                by_image.setdefault((str(item["img_name"]), split), []).append(qa)
    records = []
    for (img_name, split), qa in sorted(by_image.items()):
        image_id = img_name.split("/")[0]
        # SLAKE gives no view; its chest X-rays are frontal films (NIH ChestX-ray14).
        image = image_entry(root / "imgs" / img_name, "PA")
        records.append(study_record(f"slake-{image_id}", f"slake-{image_id}", split, "slake",
                                    empty_labels(), [image], label_space=[], qa=qa))  # fmt: skip
    counts["questions"] = sum(len(r["qa"]) for r in records)
    counts["images"] = len(records)
    return records, dict(counts)
