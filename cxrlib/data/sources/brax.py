"""BRAX 1.1.0 (Brazilian labeled chest X-ray dataset): the 14 CheXpert labels per image.

Root (``data.roots.brax``): the PhysioNet folder ``brax/1.1.0`` with
``master_spreadsheet_update.csv`` (or the older ``master_spreadsheet.csv``): one row per image,
``PngPath`` (relative to the root) and the 14 CheXpert labels (``1.0 / 0.0 / -1.0 / blank``,
labelled from the reports by the CheXpert labeler). Pinned by this project's dataset notes:
``PngPath`` and the labels. Not pinned there, taken from code that reads the 1.1.0 file:
``PatientID`` and ``ViewPosition`` (``PA``, ``AP``, ``L``, ``RL``, ``AP LLD``, ...; needed) and
``AccessionNumber`` (optional: the study; without it every image is its own study). An error
names the column if a release spells them otherwise.

One record per (PatientID, AccessionNumber) study, images frontal first and at most
``data.max_images_per_study``; labels per study: positive if any of its rows says 1, else
uncertain if any says -1, else negative if any says 0, else blank. BRAX has no official split:
patients are split seeded (``data.val_fraction``, ``data.test_fraction``). No reports (the paper
uses BRAX for multi-label classification only).
"""

from __future__ import annotations

from collections import Counter

import pandas as pd

from cxrlib.constants import CHEXPERT_LABELS, NEGATIVE, POSITIVE, UNCERTAIN
from cxrlib.data.labels import make_splits
from cxrlib.data.sources.base import (
    SourceInfo,
    check_root,
    find_file,
    image_entry,
    label_value,
    normalise_view,
    ordered_images,
    read_table,
    study_record,
)

BRAX = SourceInfo(
    "brax", "BRAX 1.1.0", "https://physionet.org/content/brax/",
    ("master_spreadsheet_update.csv (PngPath, PatientID, ViewPosition, the 14 labels; "
     "PatientID / ViewPosition names unverified)", "<PngPath> images"),
)  # fmt: skip
FILES = ["master_spreadsheet_update.csv", "master_spreadsheet_update.csv.gz",
         "master_spreadsheet.csv"]  # fmt: skip
COLUMNS = ["PngPath", "PatientID", "ViewPosition", *CHEXPERT_LABELS]
BRAX_VIEWS = {"L": "LATERAL"}  # BRAX writes a lateral as "L" (also RL / LL, as elsewhere)


def brax_view(value) -> str | None:
    """``PA`` / ``AP`` / ``LATERAL`` or None (decubitus ``AP LLD``, oblique ``RLO``, blank)."""
    v = "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)
    return BRAX_VIEWS.get(v.strip().upper()) or normalise_view(v.strip())


def merge_labels(rows: list[dict]) -> dict[str, int | None]:
    """One study's labels from its images' rows: 1 over -1 over 0 over blank."""
    out = {}
    for name in CHEXPERT_LABELS:
        values = {label_value(r[name]) for r in rows} - {None}
        out[name] = next((v for v in (POSITIVE, UNCERTAIN, NEGATIVE) if v in values), None)
    return out


def load_brax(root, cfg: dict) -> tuple[list[dict], dict]:
    root = check_root(BRAX, root)
    data = cfg["data"]
    max_images = int(data["max_images_per_study"])
    df = read_table(BRAX, find_file(BRAX, root, FILES), COLUMNS,
                    dtype={"PatientID": str, "AccessionNumber": str}, low_memory=False)  # fmt: skip
    counts: Counter = Counter(rows=len(df))
    has_study = "AccessionNumber" in df.columns
    if not has_study:
        counts["no_AccessionNumber_column_one_study_per_image"] = 1
    split_of = make_splits(set(df["PatientID"]), data["val_fraction"], data["test_fraction"],
                           data["split_seed"])  # fmt: skip
    studies: dict[tuple, list[dict]] = {}
    for row in df.to_dict("records"):
        key = (row["PatientID"], row["AccessionNumber"] if has_study else row["PngPath"])
        studies.setdefault(key, []).append(row)
    records = []
    for (patient, study), rows in studies.items():
        images = []
        for row in rows:
            view = brax_view(row["ViewPosition"])
            if view is None:
                counts["images_dropped_other_view"] += 1
                continue
            images.append(image_entry(root / str(row["PngPath"]), view))
        if not images:
            counts["dropped_no_usable_image"] += 1
            continue
        images = ordered_images(images, max_images, counts)
        records.append(study_record(f"brax-{patient}-{study}", patient, split_of[patient], "brax",
                                    merge_labels(rows), images))  # fmt: skip
    counts["studies"] = len(records)
    return records, dict(counts)
