"""CheXpert (v1.0 or v1.0-small): the 14 labels per study, frontal and lateral images.

Root (``data.roots.chexpert``): the folder with ``train.csv`` and ``valid.csv``
(``Path, Sex, Age, Frontal/Lateral, AP/PA,`` + the 14 labels, ``1.0 / 0.0 / -1.0 / blank``) and
``train/patient00001/study1/view1_frontal.jpg``. ``Path`` begins with the release folder
(``CheXpert-v1.0-small/train/...``), which is the root itself. One record per study (all its
images, frontal first, at most ``data.max_images_per_study``); ``train.csv`` patients are split
into train / val by patient (seeded); ``valid.csv`` (radiologist labels) is the test split.
No reports; the paper uses CheXpert for classification only.
"""

from __future__ import annotations

from collections import Counter

from cxrlib.constants import CHEXPERT_LABELS
from cxrlib.data.labels import make_splits
from cxrlib.data.sources.base import (
    SourceInfo,
    check_root,
    find_file,
    image_entry,
    label_value,
    ordered_images,
    read_table,
    study_record,
)

CHEXPERT = SourceInfo(
    "chexpert", "CheXpert v1.0 (or v1.0-small)", "https://stanfordmlgroup.github.io/competitions/chexpert/",
    ("train.csv", "valid.csv", "train/patientXXXXX/studyN/viewN_frontal.jpg"),
)  # fmt: skip
COLUMNS = ["Path", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]


def _view(frontal_lateral, ap_pa) -> str | None:
    if str(frontal_lateral) == "Lateral":
        return "LATERAL"
    return str(ap_pa) if str(ap_pa) in ("PA", "AP") else None


def load_chexpert(root, cfg: dict, files=("train.csv", "valid.csv")) -> tuple[list[dict], dict]:
    root = check_root(CHEXPERT, root)
    data = cfg["data"]
    max_images = int(data["max_images_per_study"])
    counts: Counter = Counter()
    records = []
    for name in files:
        df = read_table(CHEXPERT, find_file(CHEXPERT, root, [name, name + ".gz"]), COLUMNS)
        counts[f"rows_{name}"] = len(df)
        parts = df["Path"].str.split("/", n=4, expand=True)  # release/split/patient/study/view
        df["patient"], df["study"] = parts[2], parts[2] + "/" + parts[3]
        views = [_view(f, a) for f, a in zip(df["Frontal/Lateral"], df["AP/PA"])]  # None kept
        if name.startswith("train"):
            by_patient = make_splits(set(df["patient"]), data["val_fraction"], 0.0,
                                     data["split_seed"])  # fmt: skip
        # One pass over the rows (a groupby per study is minutes on the 223,414 rows).
        images_of: dict[str, list[dict]] = {}
        first_row: dict[str, tuple] = {}
        base = str(root)
        for row in zip(df["study"], df["Path"], views, df["patient"],
                       *(df[k] for k in CHEXPERT_LABELS)):  # fmt: skip
            study, path, view = row[0], row[1], row[2]
            first_row.setdefault(study, row)
            bucket = images_of.setdefault(study, [])
            if view is None:
                counts["images_dropped_other_view"] += 1
                continue
            bucket.append(image_entry(base + "/" + path.split("/", 1)[1], view))
        for study, images in images_of.items():
            if not images:
                counts["dropped_no_usable_image"] += 1
                continue
            images = ordered_images(images, max_images, counts)
            row = first_row[study]
            labels = {k: label_value(v) for k, v in zip(CHEXPERT_LABELS, row[4:])}
            split = by_patient[row[3]] if name.startswith("train") else "test"
            records.append(study_record(f"chexpert-{study}", row[3], split, "chexpert", labels,
                                        images))  # fmt: skip
    counts["studies"] = len(records)
    return records, dict(counts)
