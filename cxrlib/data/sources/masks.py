"""Datasets whose labels are JSON boxes or segmentation masks: ChestX-Det10, COVID-19 Radiography.

ChestX-Det10 (``data.roots.chestx_det10``)::

    train.json, test.json     [{"file_name": "36199.png", "syms": ["Effusion", ...],
                                "boxes": [[x1, y1, x2, y2], ...]}, ...]
    the PNGs anywhere below the root (found by file name; commonly train_data/, test_data/)

COVID-19 Radiography Database (``data.roots.covid19_radiography``)::

    COVID/images/COVID-1.png, COVID/masks/COVID-1.png, Normal/..., Lung_Opacity/...,
    Viral Pneumonia/...     (images 299x299; masks possibly smaller: boxes are rescaled)

ChestX-Det10 images are NIH 1024x1024 PNGs; its classes map to CheXpert observations (Effusion ->
Pleural Effusion, Mass / Nodule -> Lung Lesion), Calcification, Emphysema and Fibrosis are counted
and left out; the split is the files' (test.json = test), train images split by image (seeded).
COVID-19 Radiography's lung masks give organ boxes: the two largest connected parts of a mask,
the one on the image's left being the patient's right lung (radiological convention, as the
phantom's ``organ_boxes``); the class gives Lung Opacity / Pneumonia (viral or COVID-19) / No
Finding.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from cxrlib.constants import NEGATIVE, POSITIVE
from cxrlib.data.labels import make_splits
from cxrlib.data.sources.base import (
    SourceInfo,
    check_root,
    empty_labels,
    find_file,
    finding_box,
    image_entry,
    source_error,
    study_record,
)

CHESTX_DET10 = SourceInfo(
    "chestx_det10", "ChestX-Det10", "https://github.com/Deepwise-AILab/ChestX-Det10-Dataset",
    ("train.json", "test.json", "<file_name>.png (anywhere below the root)"),
)  # fmt: skip
COVID19_RADIOGRAPHY = SourceInfo(
    "covid19_radiography", "COVID-19 Radiography Database",
    "https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database",
    ("COVID/images/COVID-1.png", "COVID/masks/COVID-1.png", "Normal/...", "Lung_Opacity/...",
     "Viral Pneumonia/..."),
)  # fmt: skip
DET10_TO_CHEXPERT = {
    "Atelectasis": "Atelectasis", "Consolidation": "Consolidation", "Effusion": "Pleural Effusion",
    "Fracture": "Fracture", "Mass": "Lung Lesion", "Nodule": "Lung Lesion",
    "Pneumothorax": "Pneumothorax",
}  # fmt: skip
DET10_SPACE = sorted(set(DET10_TO_CHEXPERT.values()))
DET10_HW = (1024, 1024)
COVID_CLASSES = {  # folder -> the positive observation
    "COVID": "Pneumonia", "Viral Pneumonia": "Pneumonia", "Lung_Opacity": "Lung Opacity",
    "Normal": "No Finding",
}  # fmt: skip
COVID_SPACE = ["No Finding", "Lung Opacity", "Pneumonia"]


def _labels(space, positives) -> dict:
    labels = empty_labels()
    for obs in space:
        labels[obs] = POSITIVE if obs in positives else NEGATIVE
    if "No Finding" in space and set(positives) - {"No Finding"}:
        labels["No Finding"] = NEGATIVE
    return labels


def load_chestx_det10(root, cfg: dict) -> tuple[list[dict], dict]:
    root = check_root(CHESTX_DET10, root)
    paths = {p.name: p for p in root.rglob("*.png")}
    counts: Counter = Counter()
    records = []
    for name, split in (("train.json", None), ("test.json", "test")):
        path = find_file(CHESTX_DET10, root, [name])
        try:
            items = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise source_error(CHESTX_DET10, f"{path} is not JSON: {e}") from e
        if items and not {"file_name", "syms", "boxes"} <= set(items[0]):
            raise source_error(CHESTX_DET10, f"{name} items have keys {sorted(items[0])}",
                               expected='items {"file_name", "syms", "boxes"}')  # fmt: skip
        counts[f"items_{name}"] = len(items)
        if split is None:
            d = cfg["data"]
            split_of = make_splits([i["file_name"] for i in items], d["val_fraction"], 0.0,
                                   d["split_seed"])  # fmt: skip
        for item in items:
            boxes, positives = [], set()
            for sym, box in zip(item["syms"], item["boxes"]):
                obs = DET10_TO_CHEXPERT.get(sym)
                if obs is None:
                    counts[f"unmapped_{sym}"] += 1
                    continue
                positives.add(obs)
                boxes.append(finding_box(obs, box))
            file_name = item["file_name"]
            image = image_entry(paths.get(file_name, root / file_name), "PA", DET10_HW, boxes)
            stem = Path(file_name).stem
            records.append(study_record(f"det10-{stem}", f"det10-{stem}",
                                        split or split_of[file_name], "chestx_det10",
                                        _labels(DET10_SPACE, positives), [image],
                                        label_space=DET10_SPACE))  # fmt: skip
    counts["images"] = len(records)
    return records, dict(counts)


def lung_boxes(mask: np.ndarray) -> dict[str, list[int]]:
    """``right lung`` / ``left lung`` boxes of a binary lung mask (patient's sides: the part on
    the image's left is the right lung); {} when it has fewer than two parts."""
    parts, n = ndimage.label(mask > 0)
    if n < 2:
        return {}
    sizes = ndimage.sum_labels(mask > 0, parts, range(1, n + 1))
    largest = np.argsort(sizes)[::-1][:2] + 1
    boxes = []
    for label in largest:
        ys, xs = np.nonzero(parts == label)
        boxes.append([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1])
    boxes.sort(key=lambda b: b[0] + b[2])
    return {"right lung": boxes[0], "left lung": boxes[1]}


def load_covid19_radiography(root, cfg: dict) -> tuple[list[dict], dict]:
    root = check_root(COVID19_RADIOGRAPHY, root)
    counts: Counter = Counter()
    entries = []
    for folder, obs in COVID_CLASSES.items():
        images = sorted((root / folder / "images").glob("*.png"))
        if not images:
            raise source_error(COVID19_RADIOGRAPHY, f"no images in {root / folder / 'images'}",
                               expected=f"{folder}/images/*.png and {folder}/masks/*.png")  # fmt: skip
        entries += [(folder, obs, p) for p in images]
    d = cfg["data"]
    split_of = make_splits([p.stem for _, _, p in entries], d["val_fraction"], d["test_fraction"],
                           d["split_seed"])  # fmt: skip
    records = []
    for folder, obs, path in entries:
        with Image.open(path) as im:
            hw = (im.height, im.width)
        organs = {}
        mask_path = root / folder / "masks" / path.name
        if mask_path.is_file():
            mask = np.asarray(Image.open(mask_path).convert("L"))
            sy, sx = hw[0] / mask.shape[0], hw[1] / mask.shape[1]  # masks may be smaller
            organs = {k: [round(b[0] * sx, 2), round(b[1] * sy, 2), round(b[2] * sx, 2),
                          round(b[3] * sy, 2)] for k, b in lung_boxes(mask).items()}  # fmt: skip
            counts["images_without_two_lungs"] += not organs
        else:
            counts["images_without_mask"] += 1
        image = image_entry(path, "PA", hw)
        image["organ_boxes"] = organs
        records.append(study_record(f"covid-{path.stem}", f"covid-{path.stem}", split_of[path.stem],
                                    "covid19_radiography", _labels(COVID_SPACE, {obs}), [image],
                                    label_space=COVID_SPACE))  # fmt: skip
    counts["images"] = len(records)
    return records, dict(counts)
