"""Adapters for the paper's real datasets, and the build that turns them into saved records.

Each adapter reads one dataset's own published layout from the folder the preset names
(``data.roots.<name>``; nothing is downloaded) and returns study records of the shared schema
(``cxrlib.data.sources.base``). ``data.source`` picks what is built:

- ``iu_phantom`` (default): the synthetic path of ``cxrlib.data.datasets``, unchanged;
- one source name (``mimic_cxr``, ``nih``, ...), or several joined by ``+``
  (``mimic_cxr+ms_cxr``);
- ``paper``: every source the paper trains on whose root is set; MIMIC-CXR-JPG and MS-CXR are
  required (the test sets), the others are optional and the absent ones are listed in one warning.

    check_data_roots(cfg)                  # raises SourceError before anything heavy runs
    info = build_source_datasets(cfg, out)  # studies.jsonl + image_files.json + stats.json
    data = load_datasets(out)               # data.images is a lazy ImageStore

Leakage guards (``guard_leakage``): studies of MIMIC-derived training sets that contain an MS-CXR
image are removed; MS-CXR training images that are MIMIC test images are removed; training
records of the sets on MIMIC images (VQA, ...) with a MIMIC test image (any of a pair's images)
are removed; each count is saved in ``stats.json``.
"""

from __future__ import annotations

import json
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from cxrlib.config import save_config
from cxrlib.constants import REAL_SOURCES
from cxrlib.data.labels import SPLITS, save_splits
from cxrlib.data.sources.base import SourceError, SourceInfo, check_root, source_error
from cxrlib.data.sources.brax import BRAX, load_brax
from cxrlib.data.sources.chexpert import CHEXPERT, load_chexpert
from cxrlib.data.sources.detection import RSNA, SIIM, VINDR, load_rsna, load_siim, load_vindr
from cxrlib.data.sources.imagenome import CHEST_IMAGENOME, load_chest_imagenome
from cxrlib.data.sources.images import ImageFileError, ImageStore, image_size
from cxrlib.data.sources.masks import (
    CHESTX_DET10,
    COVID19_RADIOGRAPHY,
    COVID_QU_EX,
    load_chestx_det10,
    load_covid19_radiography,
    load_covid_qu_ex,
)
from cxrlib.data.sources.mimic import MIMIC, MS_CXR, load_mimic, load_ms_cxr
from cxrlib.data.sources.nih import NIH, load_nih
from cxrlib.data.sources.vqa import (
    MEDICAL_DIFF_VQA,
    MIMIC_CXR_VQA,
    RADIALOG,
    SLAKE,
    load_medical_diff_vqa,
    load_mimic_cxr_vqa,
    load_radialog,
    load_slake,
)

__all__ = ["SourceError", "check_data_roots", "build_source_datasets", "selected_sources"]

PHANTOM = "iu_phantom"
MAX_IMAGES = 5  # the card: multi-image prompts use up to 5 images of a study
IMAGE_FILES = "image_files.json"
SOURCES: dict[str, SourceInfo] = {s.name: s for s in (
    MIMIC, MS_CXR, NIH, CHEXPERT, RSNA, SIIM, VINDR, CHESTX_DET10, COVID19_RADIOGRAPHY, BRAX, SLAKE,
    MIMIC_CXR_VQA, MEDICAL_DIFF_VQA, RADIALOG, CHEST_IMAGENOME, COVID_QU_EX,
)}  # fmt: skip
assert tuple(SOURCES) == REAL_SOURCES, "constants.REAL_SOURCES lists every adapter (schema keys)"
# Sources the paper needs for its test protocol (report generation and phrase grounding).
PAPER_REQUIRED = ("mimic_cxr", "ms_cxr")
# Sources of the paper's mixture that no adapter reads yet (documented in docs/datasets.md).
NOT_IMPLEMENTED = ("jsrt", "qata_cov19")
LOADERS: dict[str, Callable] = {
    "mimic_cxr": lambda roots, cfg: load_mimic(roots["mimic_cxr"], cfg,
                                               cfg["data"].get("mimic_labels", "chexpert")),
    "ms_cxr": lambda roots, cfg: load_ms_cxr(roots["ms_cxr"], roots.get("mimic_cxr"), cfg),
    "nih": lambda roots, cfg: load_nih(roots["nih"], cfg),
    "chexpert": lambda roots, cfg: load_chexpert(roots["chexpert"], cfg),
    "rsna": lambda roots, cfg: load_rsna(roots["rsna"], cfg),
    "siim": lambda roots, cfg: load_siim(roots["siim"], cfg),
    "vindr": lambda roots, cfg: load_vindr(roots["vindr"], cfg),
    "chestx_det10": lambda roots, cfg: load_chestx_det10(roots["chestx_det10"], cfg),
    "covid19_radiography": lambda roots, cfg: load_covid19_radiography(
        roots["covid19_radiography"], cfg
    ),
    "brax": lambda roots, cfg: load_brax(roots["brax"], cfg),
    "slake": lambda roots, cfg: load_slake(roots["slake"], cfg),
    "mimic_cxr_vqa": lambda roots, cfg: load_mimic_cxr_vqa(roots["mimic_cxr_vqa"],
                                                           roots.get("mimic_cxr"), cfg),
    "medical_diff_vqa": lambda roots, cfg: load_medical_diff_vqa(roots["medical_diff_vqa"],
                                                                 roots.get("mimic_cxr"), cfg),
    "radialog": lambda roots, cfg: load_radialog(roots["radialog"], roots.get("mimic_cxr"), cfg),
    "chest_imagenome": lambda roots, cfg: load_chest_imagenome(roots["chest_imagenome"],
                                                               roots.get("mimic_cxr"), cfg),
    "covid_qu_ex": lambda roots, cfg: load_covid_qu_ex(roots["covid_qu_ex"], cfg),
}  # fmt: skip
# Sources whose images are MIMIC-CXR-JPG's, read under data.roots.mimic_cxr (beside MIMIC itself).
ON_MIMIC_IMAGES = ("ms_cxr", "mimic_cxr_vqa", "medical_diff_vqa", "radialog", "chest_imagenome")
# Sources whose training records must not hold an MS-CXR image (MS-CXR guarded separately).
MIMIC_DERIVED = ("mimic_cxr", "mimic_cxr_vqa", "medical_diff_vqa", "radialog",
                 "chest_imagenome")  # fmt: skip


def selected_sources(cfg: dict) -> list[str]:
    """The source names ``data.source`` asks for (``[]`` for the phantom path)."""
    source = cfg["data"].get("source", PHANTOM)
    if source == PHANTOM:
        return []
    roots = cfg["data"].get("roots") or {}
    if source == "paper":
        return [n for n in SOURCES if n in PAPER_REQUIRED or roots.get(n)]
    names = [s.strip() for s in str(source).split("+")]
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        later = [n for n in unknown if n in NOT_IMPLEMENTED]
        raise SourceError(
            f"data.source '{source}': unknown source(s) {unknown}"
            + (f" ({', '.join(later)}: no adapter yet, see docs/datasets.md)" if later else "")
            + f"; use {PHANTOM}, paper, or names of {', '.join(SOURCES)} joined by '+'"
        )
    on_mimic = [n for n in names if n in ON_MIMIC_IMAGES]
    if on_mimic and "mimic_cxr" not in names and not roots.get("mimic_cxr"):
        raise source_error(MIMIC, f"the images of {', '.join(on_mimic)} are MIMIC-CXR-JPG files: "
                           "set its root too")  # fmt: skip
    return names


def check_data_roots(cfg: dict) -> list[str]:
    """Check every root the preset's ``data.source`` needs, in seconds, before anything is built.

    Returns:
        The sources that will be built. Raises ``SourceError`` naming the dataset, the file it
        expected, where to get it and the preset key to set. With ``data.source: paper`` the
        optional sources without a root are listed in one warning.
    """
    names = selected_sources(cfg)
    if not names:
        return []
    if not 1 <= cfg["data"]["max_images_per_study"] <= MAX_IMAGES:
        raise ValueError(
            f"data.max_images_per_study {cfg['data']['max_images_per_study']}: use 1 to "
            f"{MAX_IMAGES} (the card's multi-image prompts take up to {MAX_IMAGES} images)"
        )
    roots = cfg["data"].get("roots") or {}
    problems = []
    for name in names:
        try:
            check_root(SOURCES[name], roots.get(name))
        except SourceError as e:
            problems.append(str(e))
    if any(n in ON_MIMIC_IMAGES for n in names) and "mimic_cxr" not in names:
        try:
            check_root(MIMIC, roots.get("mimic_cxr"))
        except SourceError as e:
            problems.append(str(e))
    if problems:
        raise SourceError(f"data.source '{cfg['data']['source']}' cannot be built:\n"
                          + "\n".join(problems))  # fmt: skip
    if cfg["data"]["source"] == "paper":
        absent = [n for n in SOURCES if n not in names] + list(NOT_IMPLEMENTED)
        warnings.warn(f"data.source 'paper': left out of the mixture (no root set, or no adapter "
                      f"yet): {', '.join(absent)}; the other sources' weights are renormalised",
                      stacklevel=2)  # fmt: skip
    return names


def guard_leakage(records: list[dict]) -> dict[str, int]:
    """Remove what would leak test images into training; returns the counts removed."""
    counts: Counter = Counter()
    ms_cxr_images = {im.get("dicom_id") for r in records if r["source"] == "ms_cxr"
                     for im in r["images"]}  # fmt: skip
    mimic_test = {im.get("dicom_id") for r in records if r["source"] == "mimic_cxr"
                  and r["split"] == "test" for im in r["images"]}  # fmt: skip
    # Images of other sets on MIMIC images carry their MIMIC split (MIMIC itself may not be built).
    mimic_test |= {im["dicom_id"] for r in records for im in _all_images(r)
                   if im.get("mimic_split") == "test"}  # fmt: skip
    kept, removed = [], set()
    for r in records:
        ids = {im.get("dicom_id") for im in _all_images(r)} - {None}
        if r["split"] != "test" and r["source"] in MIMIC_DERIVED and ids & ms_cxr_images:
            counts[f"{r['source']}_{r['split']}_studies_with_ms_cxr_images"] += 1
            removed.add((r["source"], r["study_id"]))
            continue
        if r["split"] != "test" and r["source"] in ON_MIMIC_IMAGES and ids & mimic_test:
            what = "images" if r["source"] == "ms_cxr" else "records_with_images"
            counts[f"{r['source']}_{r['split']}_{what}_in_mimic_test"] += 1
            removed.add((r["source"], r["study_id"]))
            continue
        kept.append(r)
    records[:] = kept
    # A removed study may be another's prior: drop those links too (the prior's text leaks).
    for r in records:
        if r["prior"] is not None and (r["source"], r["prior"]["study_id"]) in removed:
            r["prior"] = None
            counts["priors_unlinked"] += 1
    return dict(counts)


def _all_images(record: dict) -> list[dict]:
    return record["images"] + (record["prior"]["images"] if record.get("prior") else [])


def load_sources(cfg: dict, names: list[str]) -> tuple[list[dict], dict[str, dict]]:
    """Run the adapters of ``names``; the records of all of them and each one's counts."""
    roots = cfg["data"].get("roots") or {}
    records, counts = [], {}
    for name in names:
        recs, counts[name] = LOADERS[name](roots, cfg)
        if counts[name].get("studies_cut_to_max_images"):
            warnings.warn(
                f"{counts[name]['studies_cut_to_max_images']} studies of {name} have more than "
                f"{cfg['data']['max_images_per_study']} images (data.max_images_per_study): "
                f"{counts[name]['images_cut']} images left out, frontal views kept first",
                stacklevel=2,
            )
        records += recs
    counts["leakage_removed"] = guard_leakage(records)
    return records, counts


def index_images(records: list[dict], read_missing_sizes: bool = True) -> list[str]:
    """Give every image an ``index`` into the returned path list (a path shared by a study and
    its prior, or by MIMIC and MS-CXR, gets one index); fill missing ``hw`` from file headers."""
    paths: list[str] = []
    index_of: dict[str, int] = {}
    for r in records:
        for im in _all_images(r):
            if im["path"] not in index_of:
                index_of[im["path"]] = len(paths)
                paths.append(im["path"])
            im["index"] = index_of[im["path"]]
            has_boxes = im["finding_boxes"] or im.get("phrase_boxes") or im.get("region_boxes")
            if im["hw"] is None and has_boxes and read_missing_sizes:  # boxes need the size
                im["hw"] = list(image_size(im["path"]))
    return paths


def check_image_files(paths: list[str], records: list[dict]) -> None:
    """Raise, naming the dataset and a few examples, if any image file is missing."""
    missing = [p for p in paths if not Path(p).is_file()]
    if not missing:
        return
    source_of = {im["path"]: r["source"] for r in records for im in _all_images(r)}
    by_source = Counter(source_of[p] for p in missing)
    name, _ = by_source.most_common(1)[0]
    example = next(p for p in missing if source_of[p] == name)
    raise source_error(SOURCES[name], f"{len(missing)} of {len(paths)} image files are missing "
                       f"({dict(by_source)}), e.g. {example}",
                       expected="the dataset's images in its own layout (docs/datasets.md)")  # fmt: skip


def build_source_datasets(cfg: dict, out_dir: str | Path) -> dict:
    """Build the records of the preset's real sources and save them in ``out_dir``.

    Writes ``studies.jsonl``, ``splits.json``, ``config.json``, ``stats.json`` and
    ``image_files.json`` (the image paths in index order; ``load_datasets`` serves them through
    an ``ImageStore``). Returns the stats.
    """
    start = time.perf_counter()
    names = check_data_roots(cfg)
    if not names:
        raise ValueError("build_source_datasets: data.source is iu_phantom (use build_datasets)")
    records, counts = load_sources(cfg, names)
    if cfg["data"].get("max_studies"):
        records = _cap(records, int(cfg["data"]["max_studies"]), int(cfg["data"]["split_seed"]))
    try:
        paths = index_images(records)
    except ImageFileError:
        paths = index_images(records, read_missing_sizes=False)
        check_image_files(paths, records)
        raise
    check_image_files(paths, records)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "studies.jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    (out_dir / IMAGE_FILES).write_text(json.dumps(paths))
    save_splits({r["study_id"]: r["split"] for r in records}, out_dir / "splits.json")
    save_config(cfg, out_dir)
    stats = source_stats(records, counts)
    stats["build_seconds"] = round(time.perf_counter() - start, 2)
    stats["num_images"] = len(paths)
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def _cap(records: list[dict], n: int, seed: int) -> list[dict]:
    """A seeded sample of ``n`` studies per source (``data.max_studies``; for small runs)."""
    import numpy as np

    out = []
    for source in dict.fromkeys(r["source"] for r in records):
        recs = [r for r in records if r["source"] == source]
        if len(recs) > n:
            pick = np.random.default_rng(seed).choice(len(recs), n, replace=False)
            recs = [recs[i] for i in sorted(pick)]
        out += recs
    return out


def source_stats(records: list[dict], counts: dict) -> dict:
    """Per source: studies and images per split, and what the adapter left out."""
    from cxrlib.data.datasets import task_sizes

    per_source = {}
    for source in dict.fromkeys(r["source"] for r in records):
        recs = [r for r in records if r["source"] == source]
        per_source[source] = {
            "studies": {s: sum(r["split"] == s for r in recs) for s in SPLITS},
            "images": {s: sum(len(r["images"]) for r in recs if r["split"] == s) for s in SPLITS},
            "task_sizes": task_sizes(recs),
        }
    from cxrlib.data.datasets import label_counts

    lc = label_counts(records)
    return {
        "sources": per_source, "adapter_counts": counts, "num_studies": len(records),
        "studies_per_source": dict(Counter(r["source"] for r in records)),
        # the keys the phantom build's DatasetInfo has too (notebooks read them from stats.json)
        "split_sizes": {s: sum(r["split"] == s for r in records) for s in SPLITS},
        "split_sizes_by_source": {k: v["studies"] for k, v in per_source.items()},
        "images_per_split": {s: sum(v["images"][s] for v in per_source.values()) for s in SPLITS},
        "task_sizes": task_sizes(records),
        "label_counts": lc,
        "label_prevalence": {k: round(v / max(1, len(records)), 4) for k, v in lc.items()},
    }  # fmt: skip


def open_image_store(out_dir: Path, cfg: dict) -> ImageStore:
    """The lazy image store of a saved real-source build (cache from ``data.image_cache``)."""
    paths = json.loads((Path(out_dir) / IMAGE_FILES).read_text())
    cache = cfg["data"].get("image_cache")
    return ImageStore(paths, cache, cfg["encoder"]["image_size"] if cache else None)
