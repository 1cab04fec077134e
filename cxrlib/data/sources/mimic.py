"""MIMIC-CXR-JPG (reports, multi-image, multi-study) and MS-CXR (phrase boxes on MIMIC images).

MIMIC-CXR-JPG 2.0.0 / 2.1.0 root (``data.roots.mimic_cxr``)::

    mimic-cxr-2.0.0-split.csv(.gz)      dicom_id, study_id, subject_id, split (train|validate|test)
    mimic-cxr-2.0.0-metadata.csv(.gz)   dicom_id, ..., ViewPosition, Rows, Columns, StudyDate, StudyTime
    mimic-cxr-2.0.0-chexpert.csv(.gz)   subject_id, study_id, the 14 labels (or -negbio.csv.gz)
    files/p10/p10000032/s50414267/<dicom_id>.jpg
    reports: mimic_cxr_sectioned.csv(.gz) (study, impression, findings, ...; MIT-LCP's
             create_section_files.py) or the reports zip extracted: files/p10/p10000032/s50414267.txt

One record per study with a Findings section (the target; studies without one are dropped and
counted), its images frontal first and at most ``data.max_images_per_study`` (the card: up to 5;
a study with more is cut and the cut is counted and warned about), and as ``prior`` the subject's
previous kept study ordered by (StudyDate, StudyTime) -- the card's consecutive study pairs.

MS-CXR (``data.roots.ms_cxr``): ``MS_CXR_Local_Alignment_v1.1.0.csv`` (or ``_v1.0.0``) with
``dicom_id, category_name, label_text, path, x, y, w, h, image_width, image_height`` (+ ``split``
in 1.1.0); the images are MIMIC-CXR-JPG's, found under ``data.roots.mimic_cxr``. One record per
image; each (dicom_id, label_text) is one phrase with all its boxes (``phrase_boxes``).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from cxrlib.constants import CHEXPERT_LABELS, POSITIVE
from cxrlib.data.labels import make_splits
from cxrlib.data.sources.base import (
    SourceInfo,
    check_root,
    empty_labels,
    find_file,
    image_entry,
    label_value,
    normalise_view,
    ordered_images,
    read_table,
    source_error,
    study_record,
)

MIMIC = SourceInfo(
    "mimic_cxr", "MIMIC-CXR-JPG 2.0.0/2.1.0", "https://physionet.org/content/mimic-cxr-jpg/",
    ("mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-metadata.csv.gz",
     "mimic-cxr-2.0.0-chexpert.csv.gz", "files/pXX/p<subject>/s<study>/<dicom_id>.jpg",
     "mimic_cxr_sectioned.csv or files/pXX/p<subject>/s<study>.txt (MIMIC-CXR reports)"),
)  # fmt: skip
MS_CXR = SourceInfo(
    "ms_cxr", "MS-CXR 0.1/1.1.0", "https://physionet.org/content/ms-cxr/",
    ("MS_CXR_Local_Alignment_v1.1.0.csv (or _v1.0.0.csv)",),
)  # fmt: skip
SPLIT_NAMES = {"train": "train", "validate": "val", "val": "val", "valid": "val", "test": "test"}


def _csv(root: Path, stem: str) -> list[str]:
    return [f"{stem}.csv.gz", f"{stem}.csv"]


def study_order_key(date, time) -> tuple[int, str]:
    """(StudyDate, StudyTime) as sortable values; StudyTime ``HHMMSS.fff`` may have lost its
    leading zeros (``93015.0`` is 09:30:15), so it is zero-padded before comparing."""
    whole, _, frac = f"{float(time):.3f}".partition(".")
    return int(float(date)), f"{int(whole):06d}.{frac}"


_SECTION_RE = re.compile(r"^\s*([A-Z][A-Z ]+):", re.MULTILINE)


def report_sections(text: str) -> dict[str, str]:
    """A free-text report split at its upper-case headings (``FINDINGS:``, ``IMPRESSION:``)."""
    parts = _SECTION_RE.split(text)
    out = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        out[name.strip().lower()] = " ".join(body.split())
    return out


def _reports(root: Path) -> dict[str, tuple[str, str]] | None:
    """study_id -> (findings, impression) from the sectioned csv, or None if it is absent."""
    for name in _csv(root, "mimic_cxr_sectioned"):
        if (root / name).is_file():
            df = read_table(MIMIC, root / name, ["study", "findings", "impression"], dtype=str)
            return {
                str(s).lstrip("s"): (
                    f if isinstance(f, str) else "",
                    i if isinstance(i, str) else "",
                )
                for s, f, i in zip(df["study"], df["findings"], df["impression"])
            }
    return None


def _report_from_txt(root: Path, subject: str, study: str) -> tuple[str, str] | None:
    path = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
    if not path.is_file():
        return None
    sections = report_sections(path.read_text(errors="replace"))
    return sections.get("findings", ""), sections.get("impression", "")


def image_path(root: Path, subject: str, study: str, dicom_id: str) -> Path:
    return root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom_id}.jpg"


def load_mimic(root, cfg: dict, labeler: str = "chexpert") -> tuple[list[dict], dict]:
    """MIMIC-CXR-JPG study records (with priors) and the counts of what was left out.

    Args:
        root: the MIMIC-CXR-JPG root.
        cfg: the preset (``data.max_images_per_study``).
        labeler: ``chexpert`` or ``negbio`` (which label file).
    """
    root = check_root(MIMIC, root)
    max_images = int(cfg["data"]["max_images_per_study"])
    split_df = read_table(MIMIC, find_file(MIMIC, root, _csv(root, "mimic-cxr-2.0.0-split")),
                          ["dicom_id", "study_id", "subject_id", "split"], dtype=str)  # fmt: skip
    meta = read_table(
        MIMIC, find_file(MIMIC, root, _csv(root, "mimic-cxr-2.0.0-metadata")),
        ["dicom_id", "study_id", "subject_id", "ViewPosition", "Rows", "Columns", "StudyDate",
         "StudyTime"], dtype={"dicom_id": str, "study_id": str, "subject_id": str},
    )  # fmt: skip
    label_df = read_table(
        MIMIC, find_file(MIMIC, root, _csv(root, f"mimic-cxr-2.0.0-{labeler}")),
        ["subject_id", "study_id", *CHEXPERT_LABELS], dtype={"study_id": str, "subject_id": str},
    )  # fmt: skip
    labels_of = {
        str(row["study_id"]): {k: label_value(row[k]) for k in CHEXPERT_LABELS}
        for row in label_df.to_dict("records")
    }
    sectioned = _reports(root)
    meta = meta.merge(split_df[["dicom_id", "split"]], on="dicom_id", how="left")
    counts: Counter = Counter()
    counts["images_without_split"] = int(meta["split"].isna().sum())
    meta = meta[meta["split"].notna()]

    studies = []
    for (subject, study), rows in meta.groupby(["subject_id", "study_id"], sort=False):
        counts["studies"] += 1
        report = (
            sectioned.get(study)
            if sectioned is not None
            else _report_from_txt(root, subject, study)
        )
        if report is None:
            counts["dropped_no_report_file"] += 1
            continue
        findings, impression = report
        if not findings.strip():
            counts["dropped_no_findings"] += 1
            continue
        images = []
        for row in rows.to_dict("records"):
            view = normalise_view(row["ViewPosition"])
            if view is None:
                counts["images_dropped_other_view"] += 1
                continue
            images.append(image_entry(image_path(root, subject, study, row["dicom_id"]), view,
                                      (row["Rows"], row["Columns"]), dicom_id=row["dicom_id"]))  # fmt: skip
        if not images:
            counts["dropped_no_usable_image"] += 1
            continue
        images = ordered_images(images, max_images, counts, "dicom_id")
        first = rows.iloc[0]
        labels = labels_of.get(study)
        if labels is None:
            counts["studies_without_labels"] += 1
            labels = empty_labels()
        rec = study_record(study, subject, SPLIT_NAMES[str(first["split"])], "mimic_cxr", labels,
                           images, findings, impression)  # fmt: skip
        rec["order"] = list(study_order_key(first["StudyDate"], first["StudyTime"]))
        studies.append(rec)
    link_priors(studies)
    counts["kept"] = len(studies)
    counts["with_prior"] = sum(s["prior"] is not None for s in studies)
    return studies, dict(counts)


def link_priors(studies: list[dict]) -> None:
    """Give each study its subject's previous study (by ``order``) as ``prior``: the card's
    windows of two consecutive studies. The prior is a copy without its own prior."""
    by_subject: dict[str, list[dict]] = {}
    for s in studies:
        by_subject.setdefault(s["patient_id"], []).append(s)
    for subject_studies in by_subject.values():
        subject_studies.sort(key=lambda s: (tuple(s["order"]), s["study_id"]))
        for prev, cur in zip(subject_studies, subject_studies[1:]):
            if prev["split"] != cur["split"]:  # MIMIC splits by subject; never cross splits
                continue
            cur["prior"] = {k: prev[k] for k in ("study_id", "findings_text", "impression",
                                                 "labels", "findings", "images")}  # fmt: skip


# --- MS-CXR ---------------------------------------------------------------------------------------
MS_CXR_COLUMNS = ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h",
                  "image_width", "image_height"]  # fmt: skip


def load_ms_cxr(root, mimic_root, cfg: dict, mimic_splits: dict[str, str] | None = None):
    """MS-CXR image records with ``phrase_boxes``; the images are found under the MIMIC root.

    Split: the file's ``split`` column (1.1.0); else the dicom's MIMIC split (``mimic_splits``);
    else a seeded split by subject.
    """
    root = check_root(MS_CXR, root)
    mimic_root = check_root(MIMIC, mimic_root)
    path = find_file(MS_CXR, root, ["MS_CXR_Local_Alignment_v1.1.0.csv",
                                    "MS_CXR_Local_Alignment_v1.0.0.csv"])  # fmt: skip
    df = read_table(MS_CXR, path, MS_CXR_COLUMNS, dtype={"dicom_id": str})
    counts: Counter = Counter(rows=len(df))
    subject_of = {d: _subject_from_path(p) for d, p in zip(df["dicom_id"], df["path"])}
    if "split" in df.columns:
        split_of = {d: SPLIT_NAMES[str(s)] for d, s in zip(df["dicom_id"], df["split"])}
    elif mimic_splits is not None:
        split_of = {d: mimic_splits.get(d) for d in df["dicom_id"]}
    else:
        by_subject = make_splits(set(subject_of.values()), cfg["data"]["val_fraction"],
                                 cfg["data"]["test_fraction"], cfg["data"]["split_seed"])  # fmt: skip
        split_of = {d: by_subject[subject_of[d]] for d in df["dicom_id"]}
    records = []
    for dicom_id, rows in df.groupby("dicom_id", sort=True):
        first = rows.iloc[0]
        if split_of.get(dicom_id) is None:
            counts["dropped_no_split"] += 1
            continue
        phrases = []
        for (category, phrase), group in rows.groupby(["category_name", "label_text"], sort=False):
            boxes = [[x, y, x + w, y + h] for x, y, w, h in
                     zip(group["x"], group["y"], group["w"], group["h"])]  # fmt: skip
            phrases.append({"observation": str(category), "phrase": str(phrase).strip(),
                            "boxes": [[round(float(v), 2) for v in b] for b in boxes]})  # fmt: skip
        counts["phrases"] += len(phrases)
        labels = empty_labels()
        for p in phrases:
            if p["observation"] in labels:
                labels[p["observation"]] = POSITIVE
        image = image_entry(mimic_root / str(first["path"]), "PA",
                            (first["image_height"], first["image_width"]),
                            dicom_id=dicom_id, phrase_boxes=phrases)  # fmt: skip
        # MS-CXR gives one frontal image and a phrase per finding; it labels nothing else.
        records.append(study_record(f"mscxr-{dicom_id}", subject_of[dicom_id], split_of[dicom_id],
                                    "ms_cxr", labels, [image],
                                    label_space=[p["observation"] for p in phrases]))  # fmt: skip
    counts["images"] = len(records)
    return records, dict(counts)


def _subject_from_path(path: str) -> str:
    match = re.search(r"/p(\d{8})/", "/" + str(path))
    if not match:
        raise source_error(MS_CXR, f"path '{path}' is not a MIMIC-CXR-JPG image path",
                           expected="files/pXX/p<subject>/s<study>/<dicom_id>.jpg")  # fmt: skip
    return match.group(1)


# --- the MIMIC-CXR-JPG images other datasets point to ---------------------------------------------
_IMAGE_TABLES: dict[str, dict[str, tuple]] = {}


def mimic_images(mimic_root) -> dict[str, tuple]:
    """``dicom_id -> (subject_id, study_id, split, view, (rows, columns))`` from MIMIC-CXR-JPG's
    split and metadata files, read once per root: the VQA sets, Chest ImaGenome and RaDialog
    name MIMIC images, and their MIMIC split is what the leakage guard checks."""
    root = check_root(MIMIC, mimic_root)
    key = str(root.resolve())
    if key not in _IMAGE_TABLES:
        split_df = read_table(MIMIC, find_file(MIMIC, root, _csv(root, "mimic-cxr-2.0.0-split")),
                              ["dicom_id", "split"], dtype=str)  # fmt: skip
        meta = read_table(MIMIC, find_file(MIMIC, root, _csv(root, "mimic-cxr-2.0.0-metadata")),
                          ["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns"],
                          dtype={"dicom_id": str, "subject_id": str, "study_id": str})  # fmt: skip
        split_of = dict(zip(split_df["dicom_id"], split_df["split"]))
        _IMAGE_TABLES[key] = {
            d: (sub, st, SPLIT_NAMES.get(str(split_of.get(d))), normalise_view(v), (int(r), int(c)))
            for d, sub, st, v, r, c in zip(meta["dicom_id"], meta["subject_id"], meta["study_id"],
                                           meta["ViewPosition"], meta["Rows"], meta["Columns"])
        }  # fmt: skip
    return _IMAGE_TABLES[key]


def mimic_image_entry(mimic_root, table: dict, dicom_id: str, counts: Counter) -> dict | None:
    """The image record of a MIMIC dicom (with its ``mimic_split``), or None (counted) when the
    dicom is not in MIMIC-CXR-JPG's files or has a view other than PA / AP / lateral."""
    row = table.get(str(dicom_id))
    if row is None or row[2] is None:
        counts["images_not_in_mimic_cxr_jpg"] += 1
        return None
    subject, study, split, view, hw = row
    if view is None:
        counts["images_dropped_other_view"] += 1
        return None
    return image_entry(image_path(Path(mimic_root).expanduser(), subject, study, str(dicom_id)),
                       view, hw, dicom_id=str(dicom_id), mimic_split=split)  # fmt: skip
