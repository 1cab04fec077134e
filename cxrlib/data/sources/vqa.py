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

MIMIC-CXR-VQA (``data.roots.mimic_cxr_vqa``; PhysioNet mimic-ext-mimic-cxr-vqa 1.0.0)::

    mimiccxrvqa/dataset/{train,valid,test}.json   [{"split", "idx", "image_id" (= dicom_id),
                                                    "question", "content_type", "semantic_type",
                                                    "template", ..., "answer": [...],
                                                    "subject_id", "study_id", "image_path"}, ...]

One record per image with its questions; the answer list joined with ", " (an empty list is
``none``, counted); ``semantic_type == "verify"`` (yes / no) is closed, the rest open.

Medical-Diff-VQA (``data.roots.medical_diff_vqa``; PhysioNet medical-diff-vqa 1.0.0)::

    mimic_pair_questions.csv   study_id, subject_id, ref_id, question_type, question, answer, split
    mimic_all.csv              subject_id, study_id, <14 labels>, dicom_id, view, split, ...

One record per (main study, reference study) pair: the main study's image (``mimic_all.csv``'s
``dicom_id``), its non-difference questions in ``qa`` and, with the reference study's image as
``prior``, the ``difference`` questions in ``diff_qa``. Splits are the files' (``val`` -> val).

RaDialog-Instruct (``data.roots.radialog``; PhysioNet radialog-instruct-dataset 1.1.0)::

    mimic_cxr_instruct_llava_v2.json   [{"image": ".../<dicom_id>.jpg", "conversations":
                                         [{"from": "human", "value": "<image>\n..."},
                                          {"from": "gpt", "value": "..."}, ...],
                                         "task_type": "RG" | ...}, ...]

One record per conversation (``dialog``: its human / gpt turns in order, the ``<image>`` mark
removed: the builder puts the card's image prefix before the first turn), split train. The image
is found by its dicom id (the file name of ``image``) under the MIMIC root; ``task_type == "RG"``
(report generation, which MIMIC-CXR's own report tasks cover) is left out, as in the release.

The images of these sets are MIMIC-CXR-JPG's, found under ``data.roots.mimic_cxr``; each image carries
its MIMIC split (``mimic_split``) so that the leakage guard removes training records with a MIMIC
test image (either image of a pair) or an MS-CXR image.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from cxrlib.constants import IMAGE_TOKEN
from cxrlib.data.sources.base import (
    SourceInfo,
    check_root,
    empty_labels,
    find_file,
    image_entry,
    read_table,
    source_error,
    study_record,
)
from cxrlib.data.sources.mimic import SPLIT_NAMES, mimic_image_entry, mimic_images

SLAKE = SourceInfo(
    "slake", "SLAKE 1.0", "https://www.med-vqa.com/slake/",
    ("test.json (img_name, question, answer, answer_type, q_lang, modality, location)",
     "imgs/xmlab<N>/source.jpg"),
)  # fmt: skip
SLAKE_KEYS = ("img_name", "question", "answer", "answer_type", "q_lang", "modality", "location")
CHEST_WORDS = ("chest", "lung", "heart", "mediastin")
MIMIC_CXR_VQA = SourceInfo(
    "mimic_cxr_vqa", "MIMIC-CXR-VQA 1.0.0 (mimic-ext-mimic-cxr-vqa)",
    "https://physionet.org/content/mimic-ext-mimic-cxr-vqa/",
    ("mimiccxrvqa/dataset/train.json, valid.json, test.json",),
)  # fmt: skip
MIMIC_CXR_VQA_KEYS = ("image_id", "question", "answer", "subject_id", "study_id")
MEDICAL_DIFF_VQA = SourceInfo(
    "medical_diff_vqa", "Medical-Diff-VQA 1.0.0", "https://physionet.org/content/medical-diff-vqa/",
    ("mimic_pair_questions.csv", "mimic_all.csv"),
)  # fmt: skip
RADIALOG = SourceInfo(
    "radialog", "RaDialog-Instruct 1.1.0", "https://physionet.org/content/radialog-instruct-dataset/",
    ("mimic_cxr_instruct_llava_v2.json",),
)  # fmt: skip
RADIALOG_KEYS = ("image", "conversations")
SKIPPED_TASK_TYPES = {"RG"}
PAIR_COLUMNS = ["study_id", "subject_id", "ref_id", "question_type", "question", "answer", "split"]
CLOSED_ANSWERS = {"yes", "no"}


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


def load_mimic_cxr_vqa(root, mimic_root, cfg: dict) -> tuple[list[dict], dict]:
    """MIMIC-CXR-VQA: one record per MIMIC image with its questions (``qa``)."""
    root = check_root(MIMIC_CXR_VQA, root)
    table = mimic_images(mimic_root)
    counts: Counter = Counter()
    by_image: dict[str, dict] = {}
    for name in ("train", "valid", "test"):
        path = find_file(MIMIC_CXR_VQA, root, [f"mimiccxrvqa/dataset/{name}.json",
                                               f"dataset/{name}.json", f"{name}.json"])  # fmt: skip
        items = read_json_items(MIMIC_CXR_VQA, path, MIMIC_CXR_VQA_KEYS)
        counts[f"questions_{name}"] = len(items)
        for item in items:
            answer = item["answer"]
            parts = [str(a).strip() for a in answer] if isinstance(answer, list) else [str(answer)]
            if not parts:
                counts["empty_answers_as_none"] += 1
            qa = {"question": str(item["question"]).strip(),
                  "answer": ", ".join(parts) or "none",
                  "answer_type": "closed" if item.get("semantic_type") == "verify" else "open",
                  "question_type": item.get("content_type")}  # fmt: skip
            entry = by_image.setdefault(str(item["image_id"]), {
                "split": SPLIT_NAMES[name], "subject": str(item["subject_id"]), "qa": []})  # fmt: skip
            entry["qa"].append(qa)
    records = []
    for dicom_id, entry in by_image.items():
        image = mimic_image_entry(mimic_root, table, dicom_id, counts)
        if image is None:
            counts["questions_dropped_image"] += len(entry["qa"])
            continue
        records.append(study_record(f"mimicvqa-{dicom_id}", entry["subject"], entry["split"],
                                    "mimic_cxr_vqa", empty_labels(), [image], label_space=[],
                                    qa=entry["qa"]))  # fmt: skip
    counts["images"] = len(records)
    counts["questions"] = sum(len(r["qa"]) for r in records)
    return records, dict(counts)


def _ids(series) -> list[str]:
    """Study / subject ids as strings whether the csv wrote them as ints, floats or text."""
    return ["" if v != v else str(v).removesuffix(".0").lstrip("s") for v in series]


def load_medical_diff_vqa(root, mimic_root, cfg: dict) -> tuple[list[dict], dict]:
    """Medical-Diff-VQA: one record per (main, reference) study pair, ``qa`` + ``diff_qa``."""
    root = check_root(MEDICAL_DIFF_VQA, root)
    table = mimic_images(mimic_root)
    pairs = read_table(MEDICAL_DIFF_VQA, find_file(MEDICAL_DIFF_VQA, root, [
        "mimic_pair_questions.csv", "mimic_pair_questions.csv.gz"]), PAIR_COLUMNS, dtype=str)  # fmt: skip
    studies = read_table(MEDICAL_DIFF_VQA, find_file(MEDICAL_DIFF_VQA, root, [
        "mimic_all.csv", "mimic_all.csv.gz"]), ["study_id", "dicom_id"], dtype=str)  # fmt: skip
    dicom_of: dict[str, str] = {}
    for study, dicom in zip(_ids(studies["study_id"]), studies["dicom_id"]):
        dicom_of.setdefault(study, str(dicom))  # one image per study (the dataset's choice)
    counts: Counter = Counter(questions=len(pairs))
    groups: dict[tuple[str, str], dict] = {}
    for study, subject, ref, qtype, question, answer, split in zip(
        _ids(pairs["study_id"]), _ids(pairs["subject_id"]), _ids(pairs["ref_id"]),
        pairs["question_type"], pairs["question"], pairs["answer"], pairs["split"],
    ):  # fmt: skip
        answer = str(answer).strip()
        qa = {"question": str(question).strip(), "answer": answer, "question_type": str(qtype),
              "answer_type": "closed" if answer.lower() in CLOSED_ANSWERS else "open"}  # fmt: skip
        group = groups.setdefault((study, ref), {"subject": subject, "split": split, "qa": [],
                                                 "diff_qa": []})  # fmt: skip
        group["diff_qa" if qtype == "difference" else "qa"].append(qa)
    records = []
    for (study, ref), group in groups.items():
        main = _study_image(mimic_root, table, dicom_of, study, counts)
        if main is None:
            counts["questions_dropped_main_image"] += len(group["qa"]) + len(group["diff_qa"])
            continue
        prior = None
        if group["diff_qa"]:
            ref_image = _study_image(mimic_root, table, dicom_of, ref, counts)
            if ref_image is None:
                counts["difference_questions_dropped_reference_image"] += len(group["diff_qa"])
                group["diff_qa"] = []
            else:
                prior = {"study_id": ref, "findings_text": "", "impression": "",
                         "labels": empty_labels(), "findings": [], "images": [ref_image]}  # fmt: skip
        if not group["qa"] and not group["diff_qa"]:
            continue
        split = SPLIT_NAMES.get(str(group["split"]))
        if split is None:
            raise source_error(MEDICAL_DIFF_VQA, f"split '{group['split']}' of study {study}",
                               expected="mimic_pair_questions.csv split in train|val|test")  # fmt: skip
        rec = study_record(f"diffvqa-{study}-{ref}", group["subject"], split, "medical_diff_vqa",
                           empty_labels(), [main], label_space=[], qa=group["qa"],
                           diff_qa=group["diff_qa"])  # fmt: skip
        rec["prior"] = prior
        records.append(rec)
    counts["records"] = len(records)
    counts["with_reference"] = sum(r["prior"] is not None for r in records)
    return records, dict(counts)


def _study_image(mimic_root, table, dicom_of, study, counts) -> dict | None:
    dicom = dicom_of.get(study)
    if dicom is None:
        counts["studies_not_in_mimic_all"] += 1
        return None
    return mimic_image_entry(mimic_root, table, dicom, counts)


def dialog_turns(conversation) -> list[dict] | None:
    """LLaVA ``conversations`` -> ``[{"user", "assistant"}]`` (``<image>`` removed), or None when
    the turns do not alternate human / gpt or a value is empty."""
    if not isinstance(conversation, list) or not conversation or len(conversation) % 2:
        return None
    turns = []
    for human, gpt in zip(conversation[0::2], conversation[1::2]):
        if not (isinstance(human, dict) and isinstance(gpt, dict)):
            return None
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            return None
        user = " ".join(str(human.get("value", "")).replace(IMAGE_TOKEN, " ").split())
        assistant = str(gpt.get("value", "")).strip()
        if not user or not assistant:
            return None
        turns.append({"user": user, "assistant": assistant})
    return turns


def load_radialog(root, mimic_root, cfg: dict) -> tuple[list[dict], dict]:
    """RaDialog-Instruct: one training record per conversation (``dialog``)."""
    root = check_root(RADIALOG, root)
    table = mimic_images(mimic_root)
    items = read_json_items(RADIALOG, find_file(RADIALOG, root, [
        "mimic_cxr_instruct_llava_v2.json"]), RADIALOG_KEYS)  # fmt: skip
    counts: Counter = Counter(conversations=len(items))
    records = []
    for k, item in enumerate(items):
        task_type = item.get("task_type")
        if task_type in SKIPPED_TASK_TYPES:
            counts[f"skipped_task_type_{task_type}"] += 1
            continue
        turns = dialog_turns(item["conversations"])
        if turns is None:
            counts["conversations_malformed"] += 1
            continue
        image = mimic_image_entry(mimic_root, table, Path(str(item["image"])).stem, counts)
        if image is None:
            continue
        subject = table[image["dicom_id"]][0]
        records.append(study_record(f"radialog-{item.get('id', k)}", subject, "train", "radialog",
                                    empty_labels(), [image], label_space=[], dialog=turns,
                                    task_type=task_type))  # fmt: skip
    counts["records"] = len(records)
    return records, dict(counts)
