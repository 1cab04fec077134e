"""Chest ImaGenome 1.0.0: anatomical regions (boxes) and report phrases per MIMIC-CXR image.

Root (``data.roots.chest_imagenome``; PhysioNet chest-imagenome 1.0.0)::

    silver_dataset/splits/train.csv, valid.csv, test.csv     dicom_id, subject_id, study_id, ...
    silver_dataset/splits/images_to_avoid.csv (or at the root)  dicom_id, ...: the gold set
    silver_dataset/scene_graph/<dicom_id>_SceneGraph.json     (scene_graph.zip, extracted)
        objects:    [{"bbox_name", "original_x1", "original_y1", "original_x2", "original_y2",
                      "original_width", "original_height", ...}]   (MIMIC-CXR-JPG pixel frame)
        attributes: [{"bbox_name", "phrases": [...], "attributes": [[ "cat|yes|name", ...], ...]}]

One record per image of the split files (split: the file's; ``valid`` -> val; gold images are
left out of train and val, counted). ``region_boxes``: each region with a valid box, by its name
(``right lung``, ``cardiac silhouette``, ``left costophrenic angle``, ...), for the anatomy tasks
(``organ_grounding`` / ``grounded_organ``). ``phrase_boxes``: each report phrase that describes a
positive finding in a region (an attribute ``<category>|yes|<name>``, categories other than
``nlp`` and ``technicalassessment``), with the boxes of every region it is positive in; a box
that contains another box of the same phrase is dropped (the most specific regions are kept:
``right lower lung zone`` rather than ``right lung`` too). The images are MIMIC-CXR-JPG's, read
under ``data.roots.mimic_cxr`` (each carries its MIMIC split for the leakage guard).
"""

from __future__ import annotations

import json
from collections import Counter

from cxrlib.data.sources.base import (
    SourceInfo,
    check_root,
    empty_labels,
    find_file,
    read_table,
    source_error,
    study_record,
)
from cxrlib.data.sources.mimic import SPLIT_NAMES, mimic_image_entry, mimic_images

CHEST_IMAGENOME = SourceInfo(
    "chest_imagenome", "Chest ImaGenome 1.0.0", "https://physionet.org/content/chest-imagenome/",
    ("silver_dataset/splits/{train,valid,test}.csv",
     "silver_dataset/scene_graph/<dicom_id>_SceneGraph.json (extract scene_graph.zip)"),
)  # fmt: skip
BOX_KEYS = ("original_x1", "original_y1", "original_x2", "original_y2")
NOT_FINDINGS = {"nlp", "technicalassessment"}  # attribute categories that are no finding


def positive_findings(attributes) -> list[str]:
    """The finding names of one phrase's attributes marked ``yes`` (``anatomicalfinding|yes|
    lung opacity`` -> ``lung opacity``)."""
    out = []
    for attr in attributes or []:
        parts = str(attr).split("|")
        if len(parts) == 3 and parts[1] == "yes" and parts[0] not in NOT_FINDINGS:
            out.append(parts[2])
    return out


def _contains(outer: list[float], inner: list[float]) -> bool:
    return (outer != inner and outer[0] <= inner[0] and outer[1] <= inner[1]
            and outer[2] >= inner[2] and outer[3] >= inner[3])  # fmt: skip


def most_specific(boxes: list[list[float]]) -> list[list[float]]:
    """The boxes that contain no other box of the list (duplicates kept once)."""
    unique = [list(b) for b in dict.fromkeys(tuple(b) for b in boxes)]
    return [b for b in unique if not any(_contains(b, other) for other in unique)]


def scene_graph_regions(graph: dict, counts: Counter) -> tuple[dict, list[dict], tuple | None]:
    """``region_boxes``, ``phrase_boxes`` and the (height, width) frame of one scene graph."""
    regions, hw = {}, None
    for obj in graph.get("objects", []):
        try:
            box = [round(float(obj[k]), 2) for k in BOX_KEYS]
        except (KeyError, TypeError, ValueError):
            counts["regions_without_box"] += 1
            continue
        if box[2] <= box[0] or box[3] <= box[1]:
            counts["regions_with_empty_box"] += 1
            continue
        regions[str(obj["bbox_name"])] = box
        if hw is None and obj.get("original_height") and obj.get("original_width"):
            hw = (int(obj["original_height"]), int(obj["original_width"]))
    phrases: dict[str, dict] = {}
    for attr in graph.get("attributes", []):
        region = regions.get(str(attr.get("bbox_name")))
        if region is None:
            continue
        for phrase, attributes in zip(attr.get("phrases", []), attr.get("attributes", [])):
            findings = positive_findings(attributes)
            text = " ".join(str(phrase).split()).rstrip(".")
            if not findings or not text:
                continue
            entry = phrases.setdefault(text, {"observation": findings[0], "phrase": text,
                                              "boxes": []})  # fmt: skip
            entry["boxes"].append(region)
    for entry in phrases.values():
        entry["boxes"] = most_specific(entry["boxes"])
    return regions, list(phrases.values()), hw


def _dicom_ids(path) -> list[str]:
    return [str(d) for d in read_table(CHEST_IMAGENOME, path, ["dicom_id"], dtype=str)["dicom_id"]]


def load_chest_imagenome(root, mimic_root, cfg: dict) -> tuple[list[dict], dict]:
    root = check_root(CHEST_IMAGENOME, root)
    table = mimic_images(mimic_root)
    splits = root / "silver_dataset" / "splits"
    avoid_path = next((p for p in (splits / "images_to_avoid.csv", root / "images_to_avoid.csv")
                       if p.is_file()), None)  # fmt: skip
    gold = set(_dicom_ids(avoid_path)) if avoid_path is not None else set()
    counts: Counter = Counter(gold_images=len(gold))
    if avoid_path is None:
        counts["no_images_to_avoid_csv"] = 1
    graphs = root / "silver_dataset" / "scene_graph"
    if not graphs.is_dir():
        raise source_error(CHEST_IMAGENOME, f"no folder {graphs}",
                           expected="silver_dataset/scene_graph/<dicom_id>_SceneGraph.json "
                           "(extract silver_dataset/scene_graph.zip there)")  # fmt: skip
    records = []
    for name in ("train", "valid", "test"):
        split = SPLIT_NAMES[name]
        ids = _dicom_ids(find_file(CHEST_IMAGENOME, root, [f"silver_dataset/splits/{name}.csv"]))
        counts[f"images_{name}.csv"] = len(ids)
        for dicom in ids:
            if split != "test" and dicom in gold:
                counts["gold_images_left_out_of_training"] += 1
                continue
            path = graphs / f"{dicom}_SceneGraph.json"
            if not path.is_file():
                counts["images_without_scene_graph"] += 1
                continue
            try:
                graph = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise source_error(CHEST_IMAGENOME, f"cannot read {path} as JSON: {e}") from e
            regions, phrases, hw = scene_graph_regions(graph, counts)
            if not regions:
                counts["images_without_regions"] += 1
                continue
            image = mimic_image_entry(mimic_root, table, dicom, counts)
            if image is None:
                continue
            if hw is not None and list(hw) != image["hw"]:
                counts["frame_differs_from_mimic_metadata"] += 1
                image["hw"] = list(hw)  # the boxes' own frame
            image["region_boxes"], image["phrase_boxes"] = regions, phrases
            counts["phrases"] += len(phrases)
            records.append(study_record(f"imagenome-{dicom}", table[dicom][0], split,
                                        "chest_imagenome", empty_labels(), [image],
                                        label_space=[]))  # fmt: skip
    counts["images"] = len(records)
    return records, dict(counts)
