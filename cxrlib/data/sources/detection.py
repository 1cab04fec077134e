"""The box datasets without reports: RSNA Pneumonia, SIIM-ACR Pneumothorax, VinDr-CXR.

RSNA (``data.roots.rsna``; Kaggle "RSNA Pneumonia Detection Challenge", stage 2)::

    stage_2_train_labels.csv     patientId, x, y, width, height, Target  (one row per box)
    stage_2_train_images/<patientId>.dcm   (1024x1024; the view is read from each DICOM header,
                                 or from stage_2_train_images_dicom_headers.csv when present)

SIIM-ACR (``data.roots.siim``; Kaggle "SIIM-ACR Pneumothorax Segmentation")::

    train-rle.csv                ImageId, " EncodedPixels" (RLE of a 1024x1024 mask, column-major,
                                 relative offsets; -1 = no pneumothorax; one row per instance)
    dicom-images-train/**/<ImageId>.dcm

VinDr-CXR (``data.roots.vindr``; PhysioNet 1.0.0, or the Kaggle VinBigData copy)::

    annotations/annotations_train.csv, annotations/annotations_test.csv (PhysioNet) or train.csv
                                 (Kaggle): image_id, class_name, rad_id, x_min, y_min, x_max, y_max
    train/<image_id>.dicom (or .dcm), test/<image_id>.dicom

Boxes: RSNA's rows as they are (pneumonia); SIIM one box per mask instance (the instance's
extent, derived from its RLE); VinDr's three readers' boxes of a class merged (boxes that overlap
with IoU >= 0.5 are averaged into one), a class positive when any reader marks it. Labels map to
CheXpert observations; each source labels only what it annotates (``label_space``). Images of
VinDr have their own sizes: ``hw`` is read from the DICOM header when the data is built.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pydicom

from cxrlib.constants import NEGATIVE, POSITIVE
from cxrlib.data.boxes import box_iou
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

RSNA = SourceInfo(
    "rsna", "RSNA Pneumonia Detection Challenge",
    "https://www.kaggle.com/c/rsna-pneumonia-detection-challenge",
    ("stage_2_train_labels.csv", "stage_2_train_images/<patientId>.dcm"),
)  # fmt: skip
SIIM = SourceInfo(
    "siim", "SIIM-ACR Pneumothorax Segmentation",
    "https://www.kaggle.com/c/siim-acr-pneumothorax-segmentation",
    ("train-rle.csv", "dicom-images-train/**/<ImageId>.dcm"),
)  # fmt: skip
VINDR = SourceInfo(
    "vindr", "VinDr-CXR 1.0.0", "https://physionet.org/content/vindr-cxr/",
    ("annotations/annotations_train.csv (or Kaggle train.csv)", "train/<image_id>.dicom"),
)  # fmt: skip
SIIM_HW = RSNA_HW = (1024, 1024)
VINDR_TO_CHEXPERT = {
    "Aortic enlargement": "Enlarged Cardiomediastinum", "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly", "Consolidation": "Consolidation", "Edema": "Edema",
    "Infiltration": "Lung Opacity", "Lung Opacity": "Lung Opacity", "Nodule/Mass": "Lung Lesion",
    "Pleural effusion": "Pleural Effusion", "Pleural thickening": "Pleural Other",
    "Pneumothorax": "Pneumothorax", "Rib fracture": "Fracture", "Clavicle fracture": "Fracture",
    "No finding": "No Finding",
}  # fmt: skip
MERGE_IOU = 0.5


def _split_by(ids, cfg: dict) -> dict[str, str]:
    d = cfg["data"]
    return make_splits(ids, d["val_fraction"], d["test_fraction"], d["split_seed"])


def _labels(space: list[str], positives: set[str]) -> dict:
    labels = empty_labels()
    for obs in space:
        labels[obs] = POSITIVE if obs in positives else NEGATIVE
    if "No Finding" in space and positives - {"No Finding"}:
        labels["No Finding"] = NEGATIVE
    return labels


# --- RSNA -----------------------------------------------------------------------------------------
def load_rsna(root, cfg: dict) -> tuple[list[dict], dict]:
    root = check_root(RSNA, root)
    df = read_table(RSNA, find_file(RSNA, root, ["stage_2_train_labels.csv",
                                                 "stage_2_train_labels.csv.zip"]),
                    ["patientId", "x", "y", "width", "height", "Target"])  # fmt: skip
    views = _rsna_views(root)
    split_of = _split_by(set(df["patientId"]), cfg)
    counts: Counter = Counter(rows=len(df))
    records = []
    for pid, rows in df.groupby("patientId", sort=True):
        boxes = [finding_box("Pneumonia", [x, y, x + w, y + h]) for x, y, w, h, t in
                 zip(rows["x"], rows["y"], rows["width"], rows["height"], rows["Target"]) if t == 1]  # fmt: skip
        path = root / "stage_2_train_images" / f"{pid}.dcm"
        view = views[pid] if views is not None else _header_view(path)
        labels = _labels(["Pneumonia"], {"Pneumonia"} if boxes else set())
        records.append(study_record(f"rsna-{pid}", pid, split_of[pid], "rsna", labels,
                                    [image_entry(path, view, RSNA_HW, boxes)],
                                    label_space=["Pneumonia"]))  # fmt: skip
    counts["images"] = len(records)
    counts["boxes"] = int((df["Target"] == 1).sum())
    return records, dict(counts)


def _rsna_views(root: Path) -> dict[str, str] | None:
    for name in ("stage_2_train_images_dicom_headers.csv",
                 "stage_2_train_images_dicom_headers.csv.gz"):  # fmt: skip
        if (root / name).is_file():
            df = read_table(RSNA, root / name, ["PatientID", "ViewPosition"])
            return dict(zip(df["PatientID"], df["ViewPosition"]))
    return None


def _header_view(path: Path) -> str | None:
    if not path.is_file():
        return None  # reported with the other missing images when the data is built
    return str(pydicom.dcmread(str(path), stop_before_pixels=True).get("ViewPosition", ""))


# --- SIIM -----------------------------------------------------------------------------------------
def rle_box(rle: str, hw: tuple[int, int] = SIIM_HW) -> list[int]:
    """The [x1, y1, x2, y2] pixel extent of one SIIM RLE mask (relative offsets, column-major).

    Run k starts ``start_k`` pixels after the end of run k-1; pixel p of the flattened mask is
    column ``p // H``, row ``p % H``. A run that wraps into the next column covers the whole
    height between them, so the box is computed from runs without drawing the mask.
    """
    h, _ = hw
    values = np.array(rle.split(), dtype=np.int64)
    starts, lengths = values[0::2], values[1::2]
    begin = np.cumsum(starts + np.concatenate([[0], lengths[:-1]]))
    end = begin + lengths - 1  # last pixel of each run
    col0, col1 = begin // h, end // h
    row0, row1 = begin % h, end % h
    wraps = col1 > col0
    top = np.where(wraps, 0, row0).min()
    bottom = np.where(wraps, h - 1, row1).max()
    return [int(col0.min()), int(top), int(col1.max()) + 1, int(bottom) + 1]


def load_siim(root, cfg: dict) -> tuple[list[dict], dict]:
    root = check_root(SIIM, root)
    df = read_table(SIIM, find_file(SIIM, root, ["train-rle.csv", "train-rle.csv.gz",
                                                 "siim-pneumothorax-train-rle.csv.gz"]),
                    ["ImageId", "EncodedPixels"], dtype=str)  # fmt: skip
    paths = {p.stem: p for p in root.glob("dicom-images-train/**/*.dcm")}
    split_of = _split_by(set(df["ImageId"]), cfg)
    counts: Counter = Counter(rows=len(df))
    records = []
    for image_id, rows in df.groupby("ImageId", sort=True):
        rles = [r.strip() for r in rows["EncodedPixels"] if r.strip() != "-1"]
        boxes = [finding_box("Pneumothorax", rle_box(r)) for r in rles]
        path = paths.get(image_id, root / "dicom-images-train" / f"{image_id}.dcm")
        labels = _labels(["Pneumothorax"], {"Pneumothorax"} if boxes else set())
        # SIIM's images are frontal chest films; the challenge gives no view per image.
        records.append(study_record(f"siim-{image_id}", image_id, split_of[image_id], "siim",
                                    labels, [image_entry(path, "PA", SIIM_HW, boxes)],
                                    label_space=["Pneumothorax"]))  # fmt: skip
        counts["boxes"] += len(boxes)
    counts["images"] = len(records)
    counts["positive_images"] = sum(r["labels"]["Pneumothorax"] == POSITIVE for r in records)
    return records, dict(counts)


# --- VinDr-CXR --------------------------------------------------------------------------------------
def merge_reader_boxes(boxes: list[list[float]], iou: float = MERGE_IOU) -> list[list[float]]:
    """Greedy merge of several readers' boxes of one class: a box joins the first cluster whose
    mean box it overlaps with IoU >= ``iou``; each cluster becomes its mean box."""
    clusters: list[list[list[float]]] = []
    for box in boxes:
        for cluster in clusters:
            if box_iou(np.mean(cluster, axis=0).tolist(), box) >= iou:
                cluster.append(box)
                break
        else:
            clusters.append([box])
    return [np.mean(c, axis=0).round(2).tolist() for c in clusters]


def load_vindr(root, cfg: dict) -> tuple[list[dict], dict]:
    root = check_root(VINDR, root)
    columns = ["image_id", "class_name", "rad_id", "x_min", "y_min", "x_max", "y_max"]
    physionet = root / "annotations" / "annotations_train.csv"
    if physionet.is_file():
        tables = [("train", physionet)]
        test = root / "annotations" / "annotations_test.csv"
        if test.is_file():
            tables.append(("test", test))
    else:
        tables = [(None, find_file(VINDR, root, ["annotations/annotations_train.csv", "train.csv",
                                                 "train.csv.gz"]))]  # fmt: skip
    space = sorted(set(VINDR_TO_CHEXPERT.values()))
    counts: Counter = Counter()
    records = []
    for split, path in tables:
        df = read_table(VINDR, path, columns)
        counts[f"rows_{path.name}"] = len(df)
        split_of = _split_by(set(df["image_id"]), cfg) if split is None else None
        folder = "test" if split == "test" else "train"
        # One pass over the rows: image -> class -> the readers' boxes.
        per_image: dict[str, dict[str, list]] = {}
        for image_id, cls, *box in zip(df["image_id"], df["class_name"], df["x_min"],
                                       df["y_min"], df["x_max"], df["y_max"]):  # fmt: skip
            classes = per_image.setdefault(image_id, {})
            obs = VINDR_TO_CHEXPERT.get(cls)
            if obs is None:
                counts["unmapped_rows"] += 1
                continue
            boxes_of = classes.setdefault(obs, [])
            if not np.isnan(box[0]):
                boxes_of.append([float(v) for v in box])
        for image_id in sorted(per_image):
            classes = per_image[image_id]
            boxes = [finding_box(obs, b) for obs in sorted(classes)
                     for b in merge_reader_boxes(classes[obs])]  # fmt: skip
            stem = root / folder / image_id
            path_img = next((stem.with_suffix(s) for s in (".dicom", ".dcm")
                             if stem.with_suffix(s).is_file()), stem.with_suffix(".dicom"))  # fmt: skip
            counts["boxes"] += len(boxes)
            # VinDr-CXR is posteroanterior chest radiographs; hw is read from the header later.
            records.append(study_record(
                f"vindr-{image_id}", image_id, split or split_of[image_id], "vindr",
                _labels(space, set(classes)), [image_entry(path_img, "PA", None, boxes)],
                label_space=space))  # fmt: skip
    counts["images"] = len(records)
    return records, dict(counts)
