"""Datasets whose labels are JSON boxes or segmentation masks: ChestX-Det10, COVID-19 Radiography,
COVID-QU-Ex.

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

COVID-QU-Ex (``data.roots.covid_qu_ex``; the Kaggle download, layout as read by public loaders)::

    Infection Segmentation Data/Infection Segmentation Data/{Train,Val,Test}/
        {COVID-19,Non-COVID,Normal}/{images,infection masks,lung masks}/<name>.png
    (the doubled folder is Kaggle's; a single "Infection Segmentation Data/Train/..." works too)

Only the Infection Segmentation Data part is read (its images have lung and infection masks; the
larger Lung Segmentation Data part, lung masks only, is not: whether the two parts share images
is not known here, and a shared image could cross splits). Split: the folder's. Lung masks give
right / left lung boxes (as above); a COVID-19 image's infection mask gives Pneumonia boxes, one
per lung (the extent of the infected pixels inside that lung's box). Labels: COVID-19 -> Pneumonia
positive, Normal -> negative, Non-COVID (other lung diseases, pneumonias among them) unlabelled.
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


# --- COVID-QU-Ex ----------------------------------------------------------------------------------------
COVID_QU_EX = SourceInfo(
    "covid_qu_ex", "COVID-QU-Ex", "https://www.kaggle.com/datasets/anasmohammedtahir/covidqu",
    ("Infection Segmentation Data/{Train,Val,Test}/{COVID-19,Non-COVID,Normal}/"
     "{images,infection masks,lung masks}/<name>.png",),
)  # fmt: skip
QU_SET = "Infection Segmentation Data"
QU_SPLITS = {"Train": "train", "Val": "val", "Test": "test"}
QU_CLASSES = ("COVID-19", "Non-COVID", "Normal")


def _mask(path: Path, hw: tuple[int, int]) -> tuple[np.ndarray, float, float] | None:
    """A binary mask and its scale to the image (masks may be another size), or None."""
    if not path.is_file():
        return None
    mask = np.asarray(Image.open(path).convert("L")) > 0
    return mask, hw[0] / mask.shape[0], hw[1] / mask.shape[1]


def _scaled(box, sy: float, sx: float) -> list[float]:
    return [round(box[0] * sx, 2), round(box[1] * sy, 2), round(box[2] * sx, 2),
            round(box[3] * sy, 2)]  # fmt: skip


def infection_boxes(infection: np.ndarray, lungs: dict[str, list[int]]) -> list[list[int]]:
    """One box per lung: the extent of the infected pixels inside that lung's box (the whole
    mask's extent when no lung boxes are known); [] without infected pixels."""
    regions = list(lungs.values()) or [[0, 0, infection.shape[1], infection.shape[0]]]
    out = []
    for x1, y1, x2, y2 in regions:
        ys, xs = np.nonzero(infection[y1:y2, x1:x2])
        if len(xs):
            out.append([x1 + int(xs.min()), y1 + int(ys.min()), x1 + int(xs.max()) + 1,
                        y1 + int(ys.max()) + 1])  # fmt: skip
    return out


def load_covid_qu_ex(root, cfg: dict) -> tuple[list[dict], dict]:
    root = check_root(COVID_QU_EX, root)
    base = next((p for p in (root / QU_SET / QU_SET, root / QU_SET) if (p / "Train").is_dir()),
                None)  # Kaggle's download nests the folder in itself  # fmt: skip
    if base is None:
        raise source_error(COVID_QU_EX, f"no folder '{QU_SET}/Train' (or '{QU_SET}/{QU_SET}/Train') "
                           f"in {root}", expected=COVID_QU_EX.files[0])  # fmt: skip
    counts: Counter = Counter()
    records = []
    for folder, split in QU_SPLITS.items():
        for cls in QU_CLASSES:
            images = sorted((base / folder / cls / "images").glob("*.png"))
            if not images:
                raise source_error(COVID_QU_EX, f"no images in {base / folder / cls / 'images'}",
                                   expected=COVID_QU_EX.files[0])  # fmt: skip
            for path in images:
                with Image.open(path) as im:
                    hw = (im.height, im.width)
                organs, boxes, lungs = {}, [], {}
                lung = _mask(base / folder / cls / "lung masks" / path.name, hw)
                if lung is None:
                    counts["images_without_lung_mask"] += 1
                else:
                    lungs = lung_boxes(lung[0].astype(np.uint8))  # in the lung mask's pixels
                    organs = {k: _scaled(b, lung[1], lung[2]) for k, b in lungs.items()}
                    counts["images_without_two_lungs"] += not organs
                infection = _mask(base / folder / cls / "infection masks" / path.name, hw)
                if cls == "COVID-19" and infection is None:
                    counts["covid_images_without_infection_mask"] += 1
                elif infection is not None and infection[0].any():
                    if lung is not None and lung[0].shape != infection[0].shape:
                        lungs = {}  # different frames: fall back to the mask's whole extent
                        counts["infection_and_lung_masks_differ_in_size"] += 1
                    boxes = [finding_box("Pneumonia", _scaled(b, *infection[1:]))
                             for b in infection_boxes(infection[0], lungs)]  # fmt: skip
                image = image_entry(path, "PA", hw, boxes)
                image["organ_boxes"] = organs
                # Non-COVID images hold other lung diseases (pneumonias among them): unlabelled.
                space = [] if cls == "Non-COVID" else ["Pneumonia"]
                labels = _labels(space, {"Pneumonia"} if cls == "COVID-19" else set())
                sid = f"covidqu-{folder}-{cls}-{path.stem}"
                records.append(study_record(sid, sid, split, "covid_qu_ex", labels, [image],
                                            label_space=space))  # fmt: skip
                counts["boxes"] += len(boxes)
    counts["images"] = len(records)
    return records, dict(counts)
