"""What every dataset adapter shares: the error, finding files in a root, reading label tables,
and making the project's study / image records (the schema of ``cxrlib.data.datasets``).

An adapter turns one dataset's published layout into study records::

    {"study_id", "patient_id", "split", "source", "findings_text", "impression", "labels",
     "findings", "images": [{"path", "view", "hw", "finding_boxes", "organ_boxes"}], "prior",
     "changes", "label_space"}

exactly as the IU-Phantom path writes them, except that each image names its file (``path``,
relative to the dataset's root) instead of a row of ``images.npy``; ``build`` gives every image
its ``index`` into the lazy image store. ``label_space`` lists the CheXpert observations the
source actually labels: a label outside it is unknown, never a negative (NIH has no "Fracture").

Optional fields (absent = none; the sources that have them set them, the others keep working):

- ``qa``: the dataset's own questions about the record's image(s) (SLAKE, MIMIC-CXR-VQA,
  Medical-Diff-VQA): ``[{"question", "answer", "answer_type": "closed"|"open",
  "question_type", "image": index into images (default 0)}]``;
- ``diff_qa``: questions comparing the ``prior`` (reference) and the record (main) images
  (Medical-Diff-VQA's difference questions), items as in ``qa``;
- ``dialog``: a given conversation ``[{"user", "assistant"}, ...]`` (RaDialog-Instruct);
- per image, ``region_boxes``: anatomical regions by name, pixel boxes (Chest ImaGenome), used
  by the organ tasks beside ``organ_boxes``; ``phrase_boxes`` (MS-CXR, ImaGenome):
  ``[{"observation", "phrase", "boxes"}]``; ``mimic_split``: the image's MIMIC-CXR split, read by
  the leakage guard for sources on MIMIC images.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cxrlib.constants import CHEXPERT_LABELS, POSITIVE, UNCERTAIN


@dataclass(frozen=True)
class SourceInfo:
    """A dataset the adapters know: its preset key, where to get it, what it must contain."""

    name: str  # the key of ``data.roots``
    title: str
    page: str  # where to get it
    files: tuple[str, ...]  # the files (relative to the root) the adapter needs


class SourceError(FileNotFoundError):
    """A dataset root, file or column that is not where the adapter expects it."""


def source_error(info: SourceInfo, problem: str, expected: str | None = None) -> SourceError:
    """An error that names the dataset, what is wrong, the file expected, its page and the key."""
    lines = [f"{info.title} ({info.name}): {problem}"]
    if expected:
        lines.append(f"  expected: {expected}")
    lines.append(f"  get it from: {info.page}")
    lines.append(
        f"  then set the preset key data.roots.{info.name} (in a preset YAML, or "
        f"--set data.roots.{info.name}=/path/to/its/root with python -m cxrlib.data)"
    )
    return SourceError("\n".join(lines))


def check_root(info: SourceInfo, root: str | Path | None) -> Path:
    """The root folder of a dataset, or a ``SourceError`` saying which key to set."""
    if root in (None, ""):
        raise source_error(info, "no root folder given (data.roots." + info.name + " is null)",
                           expected=f"a folder holding {', '.join(info.files)}")  # fmt: skip
    root = Path(root).expanduser()
    if not root.is_dir():
        raise source_error(info, f"root folder {root} does not exist",
                           expected=f"a folder holding {', '.join(info.files)}")  # fmt: skip
    return root


def find_file(info: SourceInfo, root: Path, candidates: Sequence[str]) -> Path:
    """The first of ``candidates`` (relative paths, e.g. ``x.csv`` and ``x.csv.gz``) under root."""
    for name in candidates:
        if (root / name).is_file():
            return root / name
    raise source_error(info, f"missing file in {root}", expected=" or ".join(candidates))


def read_table(info: SourceInfo, path: Path, columns: Iterable[str], **kwargs) -> pd.DataFrame:
    """Read a csv (gz/zip: pandas infers it) and check that ``columns`` are there."""
    try:
        df = pd.read_csv(path, **kwargs)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise source_error(info, f"cannot read {path}: {e}") from e
    df.columns = [str(c).strip() for c in df.columns]  # SIIM's " EncodedPixels"
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise source_error(info, f"{path.name} has no column(s) {missing}; it has "
                           f"{list(df.columns)}", expected=f"{path.name} with {list(columns)}")  # fmt: skip
    return df


def label_value(value) -> int | None:
    """A CheXpert-style cell (1.0 / 0.0 / -1.0 / blank) -> 1, 0, -1 or None."""
    if value is None or value != value or value == "":  # blank: None or NaN (NaN != NaN)
        return None
    return int(float(value))


def empty_labels() -> dict[str, int | None]:
    return dict.fromkeys(CHEXPERT_LABELS)


def findings_from_labels(labels: dict[str, int | None]) -> list[dict]:
    """Positive and uncertain observations as ``Finding`` dicts (no side, zone or severity)."""
    return [
        {"observation": name, "side": None, "zone": None, "severity": None, "status": value}
        for name, value in labels.items()
        if name != "No Finding" and value in (POSITIVE, UNCERTAIN)
    ]


def finding_box(observation: str, box: Sequence[float]) -> dict:
    """One entry of an image's ``finding_boxes``: a positive finding and its pixel box."""
    finding = {"observation": observation, "side": None, "zone": None, "severity": None,
               "status": POSITIVE}  # fmt: skip
    return {"finding": finding, "box": [round(float(v), 2) for v in box]}


def image_entry(path: str, view: str | None, hw=None, finding_boxes=None, **extra) -> dict:
    """An image record; ``hw`` may be None until ``build`` reads it from the file's header."""
    out = {"path": str(path), "view": normalise_view(view),
           "hw": [int(hw[0]), int(hw[1])] if hw is not None else None,
           "finding_boxes": list(finding_boxes or []), "organ_boxes": {}}  # fmt: skip
    out.update(extra)
    return out


def normalise_view(view) -> str | None:
    """``PA``, ``AP``, ``LATERAL`` (LL / LATERAL / Lateral), or None (blank, LAO, SWIMMERS, ...):
    adapters leave such images out and count them (the tasks know only these three views)."""
    v = "" if view is None or (isinstance(view, float) and pd.isna(view)) else str(view).upper()
    if v in ("PA", "AP"):
        return v
    if v in ("LATERAL", "LL", "RL", "LAT"):
        return "LATERAL"
    return None


VIEW_ORDER = {"PA": 0, "AP": 1, "LATERAL": 2}  # frontal first: single-image tasks prefer them


def ordered_images(images: list[dict], max_images: int, counts, tiebreak: str | None = None):
    """A study's images frontal first (then by ``image[tiebreak]``), cut to ``max_images``; the
    cut is counted in ``counts`` (``studies_cut_to_max_images``, ``images_cut``)."""
    images = sorted(
        images, key=lambda im: (VIEW_ORDER[im["view"]], im[tiebreak] if tiebreak else 0)
    )
    if len(images) > max_images:
        counts["studies_cut_to_max_images"] += 1
        counts["images_cut"] += len(images) - max_images
        images = images[:max_images]
    return images


def study_record(study_id, patient_id, split, source, labels, images, findings_text="",
                 impression="", label_space=None, **extra) -> dict:  # fmt: skip
    """A study record of the shared schema (``prior`` and ``changes`` None)."""
    rec = {
        "study_id": str(study_id), "patient_id": str(patient_id), "split": split,
        "source": source, "findings_text": findings_text or "", "impression": impression or "",
        "labels": labels, "findings": findings_from_labels(labels), "images": images,
        "prior": None, "changes": None,
        "label_space": list(label_space) if label_space is not None else list(CHEXPERT_LABELS),
    }  # fmt: skip
    rec.update(extra)
    return rec
