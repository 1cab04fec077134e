"""A MIMIC-CXR-JPG-shaped tree with the release's file and column names, for the notebook runs on a
real source (tests/test_notebooks_mimic.py) and the size and time figures of docs/datasets.md.

    python tests/mimic_tree.py /tmp/fake-mimic --studies 1000   # prints what it wrote

Subjects have 1-4 studies on consecutive days (so multi-study pairs exist), studies 1-3 images
(PA or AP first, then LATERAL), about one study in twelve has no Findings section (the adapter
drops it). Images are real JPGs: PhantomCXR renders of the study's findings, so a model can learn
from them; ``Rows``/``Columns`` in the metadata are the files' own. The split is by subject, as
MIMIC-CXR-JPG's is (here 70 / 10 / 20 % of subjects train / validate / test).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxrlib.constants import CHEXPERT_LABELS
from cxrlib.data.labels import Finding
from cxrlib.data.phantom import render

# (findings text, rendered findings, CheXpert labels 1.0 / 0.0 / -1.0; others blank)
TEMPLATES = [
    ("The lungs are clear. Heart size is normal. No pleural effusion or pneumothorax.", [],
     {"No Finding": 1.0, "Pleural Effusion": 0.0, "Pneumothorax": 0.0}),
    ("There is a small left pleural effusion. Heart size is normal. No pneumothorax.",
     [Finding("Pleural Effusion", "left", "lower", "mild")],
     {"Pleural Effusion": 1.0, "Pneumothorax": 0.0}),
    ("The heart is moderately enlarged. The lungs are clear.",
     [Finding("Cardiomegaly", severity="moderate")], {"Cardiomegaly": 1.0}),
    ("Small right apical pneumothorax. No pleural effusion.",
     [Finding("Pneumothorax", "right", "upper", "mild")],
     {"Pneumothorax": 1.0, "Pleural Effusion": 0.0}),
    ("Mild pulmonary edema. The heart is enlarged.",
     [Finding("Edema", "bilateral", severity="mild"), Finding("Cardiomegaly", severity="mild")],
     {"Edema": 1.0, "Cardiomegaly": 1.0}),
    ("Right lower lobe consolidation, possibly pneumonia. No pneumothorax.",
     [Finding("Consolidation", "right", "lower")],
     {"Consolidation": 1.0, "Pneumonia": -1.0, "Pneumothorax": 0.0}),
]  # fmt: skip
METADATA_EXTRA = {  # columns the adapter does not read, present in the release's file
    "PerformedProcedureStepDescription": "CHEST (PA AND LAT)",
    "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
    "ViewCodeSequence_CodeMeaning": "postero-anterior",
    "PatientOrientationCodeSequence_CodeMeaning": "Erect",
}


def _split(k: int) -> str:
    """Subject ``k``'s split: 7 of 10 train, 1 validate, 2 test (enough of each in a small tree)."""
    return {7: "validate", 8: "test", 9: "test"}.get(k % 10, "train")


def write_mimic_tree(
    root: Path, studies: int = 60, hw: tuple[int, int] = (160, 128), seed: int = 0
) -> dict:
    """Write ``studies`` studies into ``root``; return what was written (counts, bytes and
    ``per_study``: subject, study, split, images, whether it has Findings)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    split_rows, meta_rows, label_rows, sections = [], [], [], []
    n_images = n_bytes = k = subject_k = 0
    written: list[dict] = []  # one entry per study, for tests to compute what to expect
    while k < studies:
        subject = f"{10000000 + 37 * subject_k:08d}"
        split = _split(subject_k)
        for j in range(min(int(rng.integers(1, 5)), studies - k)):
            study = f"{50000000 + 11 * k:08d}"
            text, findings, values = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
            folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
            folder.mkdir(parents=True, exist_ok=True)
            frontal = "AP" if rng.random() < 0.3 else "PA"
            views = [frontal, "LATERAL", frontal][: int(rng.integers(1, 4))]
            for i, view in enumerate(views):
                dicom_id = f"{rng.integers(16**8):08x}-{k:08x}-{i:08x}-{subject_k:08x}-00000000"
                pixels = render(
                    findings, view, hw, patient_seed=subject_k, acquisition_seed=k * 8 + i
                ).image
                path = folder / f"{dicom_id}.jpg"
                Image.fromarray(pixels).save(path, quality=95)
                n_images, n_bytes = n_images + 1, n_bytes + path.stat().st_size
                split_rows.append(dict(dicom_id=dicom_id, study_id=study, subject_id=subject,
                                       split=split))  # fmt: skip
                meta_rows.append(dict(dicom_id=dicom_id, subject_id=subject, study_id=study,
                                      ViewPosition=view, Rows=hw[0], Columns=hw[1],
                                      StudyDate=21800101 + j, StudyTime=83015.5 + 100 * i,
                                      **METADATA_EXTRA))  # fmt: skip
            labels = dict.fromkeys(CHEXPERT_LABELS, np.nan) | values
            label_rows.append(dict(subject_id=subject, study_id=study, **labels))
            no_findings = k % 12 == 5  # the adapter drops studies without a Findings section
            sections.append(dict(study=f"s{study}", impression="No acute process.",
                                 findings="" if no_findings else text, last_paragraph="",
                                 comparison="None." if j == 0 else "Prior study."))  # fmt: skip
            written.append({"subject": subject, "study": study, "split": split,
                            "images": len(views), "findings": not no_findings})  # fmt: skip
            k += 1
        subject_k += 1
    pd.DataFrame(split_rows).to_csv(root / "mimic-cxr-2.0.0-split.csv.gz", index=False)
    pd.DataFrame(meta_rows).to_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", index=False)
    pd.DataFrame(label_rows).to_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", index=False)
    pd.DataFrame(sections).to_csv(root / "mimic_cxr_sectioned.csv", index=False)
    with_findings = sum(bool(s["findings"]) for s in sections)
    return {"studies": studies, "studies_with_findings": with_findings, "subjects": subject_k,
            "images": n_images, "jpg_bytes": n_bytes, "per_study": written}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--studies", type=int, default=60)
    parser.add_argument("--size", type=int, nargs=2, default=[160, 128], metavar=("H", "W"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    written = write_mimic_tree(args.root, args.studies, tuple(args.size))
    written.pop("per_study")
    print(f"{written} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
