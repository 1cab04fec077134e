"""NIH ChestX-ray14: labels of 112,120 frontal images, 984 boxes, the official test list.

Root (``data.roots.nih``)::

    Data_Entry_2017.csv (or Data_Entry_2017_v2020.csv, .gz)   Image Index, Finding Labels ("|"),
                                                              Patient ID, View Position, ...
    BBox_List_2017.csv(.gz)     Image Index, Finding Label, Bbox [x, y, w, h]  (1024x1024 pixels)
    train_val_list.txt, test_list.txt   (optional: else a seeded split by patient)
    images_001/images/00000001_000.png ... (or images/*.png)

One record per image (NIH has no reports). NIH's labels map to CheXpert's observations (Effusion
-> Pleural Effusion, Infiltration / the box label Infiltrate -> Lung Opacity, Mass and Nodule ->
Lung Lesion, Pleural_Thickening -> Pleural Other); Emphysema, Fibrosis and Hernia have no CheXpert
observation and are counted, not used. NIH labels no fracture, device or mediastinum, so those stay
outside ``label_space`` (unknown, never "absent").
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from cxrlib.constants import NEGATIVE, POSITIVE
from cxrlib.data.labels import make_splits
from cxrlib.data.sources.base import (
    SourceInfo,
    check_root,
    empty_labels,
    find_file,
    finding_box,
    image_entry,
    read_table,
    study_record,
)

NIH = SourceInfo(
    "nih", "NIH ChestX-ray14", "https://nihcc.app.box.com/v/ChestXray-NIHCC",
    ("Data_Entry_2017.csv", "BBox_List_2017.csv", "images_*/images/*.png"),
)  # fmt: skip
NIH_TO_CHEXPERT = {
    "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Consolidation": "Consolidation",
    "Edema": "Edema", "Effusion": "Pleural Effusion", "Infiltration": "Lung Opacity",
    "Infiltrate": "Lung Opacity", "Mass": "Lung Lesion", "Nodule": "Lung Lesion",
    "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax",
    "Pleural_Thickening": "Pleural Other", "No Finding": "No Finding",
}  # fmt: skip
UNMAPPED = ("Emphysema", "Fibrosis", "Hernia")
LABEL_SPACE = sorted(set(NIH_TO_CHEXPERT.values()))
NIH_HW = (1024, 1024)  # the released PNGs (boxes are in this frame)


def _image_index(root: Path) -> dict[str, Path]:
    """Image name -> path over the ``images_XXX/images`` folders (or ``images``)."""
    out = {}
    for folder in sorted(root.glob("images*")):
        inner = folder / "images" if (folder / "images").is_dir() else folder
        if inner.is_dir():
            for entry in inner.iterdir():
                out[entry.name] = entry
    return out


def load_nih(root, cfg: dict) -> tuple[list[dict], dict]:
    root = check_root(NIH, root)
    entries = read_table(NIH, find_file(NIH, root, [
        "Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv.gz",
        "Data_Entry_2017_v2020.csv.gz"]), ["Image Index", "Finding Labels", "Patient ID",
                                           "View Position"], dtype={"Patient ID": str})  # fmt: skip
    bbox = read_table(NIH, find_file(NIH, root, ["BBox_List_2017.csv", "BBox_List_2017.csv.gz"]),
                      ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"])  # fmt: skip
    boxes: dict[str, list[dict]] = {}
    for name, label, x, y, w, h in zip(bbox["Image Index"], bbox["Finding Label"], bbox["Bbox [x"],
                                       bbox["y"], bbox["w"], bbox["h]"]):  # fmt: skip
        boxes.setdefault(name, []).append(finding_box(NIH_TO_CHEXPERT[label], [x, y, x + w, y + h]))
    split_of = _splits(root, entries, cfg)
    index = _image_index(root)
    counts: Counter = Counter(rows=len(entries), boxes=len(bbox))
    records = []
    for name, findings, patient, view in zip(entries["Image Index"], entries["Finding Labels"],
                                             entries["Patient ID"], entries["View Position"]):  # fmt: skip
        labels = empty_labels()
        for obs in LABEL_SPACE:
            labels[obs] = NEGATIVE
        for finding in str(findings).split("|"):
            if finding in UNMAPPED:
                counts[f"unmapped_{finding}"] += 1
            else:
                labels[NIH_TO_CHEXPERT[finding]] = POSITIVE
        if any(v == POSITIVE for k, v in labels.items() if k != "No Finding"):
            labels["No Finding"] = NEGATIVE
        path = index.get(name, root / "images" / name)
        image = image_entry(path, view, NIH_HW, boxes.get(name, []))
        records.append(study_record(name.removesuffix(".png"), patient, split_of[name], "nih",
                                    labels, [image], label_space=LABEL_SPACE))  # fmt: skip
    counts["images_with_boxes"] = sum(bool(r["images"][0]["finding_boxes"]) for r in records)
    return records, dict(counts)


def _splits(root: Path, entries, cfg: dict) -> dict[str, str]:
    """The official lists (test = test_list.txt; val = a seeded share of train_val patients)."""
    data = cfg["data"]
    names = list(entries["Image Index"])
    patient_of = dict(zip(names, entries["Patient ID"]))
    if (root / "test_list.txt").is_file():
        test = set((root / "test_list.txt").read_text().split())
        trainval_patients = {patient_of[n] for n in names if n not in test}
        by_patient = make_splits(trainval_patients, data["val_fraction"], 0.0, data["split_seed"])
        return {n: "test" if n in test else by_patient[patient_of[n]] for n in names}
    by_patient = make_splits(set(patient_of.values()), data["val_fraction"],
                             data["test_fraction"], data["split_seed"])  # fmt: skip
    return {n: by_patient[patient_of[n]] for n in names}
