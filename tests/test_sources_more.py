"""The adapters added for issue 16 (BRAX, SLAKE, the MIMIC VQA sets, Chest ImaGenome, RaDialog) on
fixture trees with the datasets' real file names and columns: records, conversations, the official
mixture, leakage guards and the errors for a missing file or column."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrlib.config import load_preset
from cxrlib.constants import CHEXPERT_LABELS
from cxrlib.data.conversations import build_conversation
from cxrlib.data.datasets import ConversationDataset, build_datasets, load_datasets
from cxrlib.data.sources import SourceError


def smoke(**data) -> dict:
    return load_preset("smoke", {"data": data})


def save_png(path: Path, hw=(24, 20), value: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(hw, value, np.uint8)).save(path)


def indexed(record: dict) -> dict:
    """A record with image indices (as the build gives them) for the conversation builders."""
    out = dict(record, images=[dict(im, index=k) for k, im in enumerate(record["images"])])
    if record.get("prior"):
        n = len(out["images"])
        out["prior"] = dict(record["prior"], images=[dict(im, index=n + k) for k, im in
                                                     enumerate(record["prior"]["images"])])  # fmt: skip
    return out


# --- BRAX ---------------------------------------------------------------------------------------------
# patient A: study 1 = PA + lateral ("L"), rows disagree on Cardiomegaly (1 / -1 -> 1);
# study 2 = one decubitus film ("AP LLD": dropped). Patients B, C: one AP each.
BRAX_ROWS = [  # patient, accession, view, labels
    ("A", "1", "PA", {"Cardiomegaly": 1.0, "Pleural Effusion": 0.0}),
    ("A", "1", "L", {"Cardiomegaly": -1.0, "Edema": -1.0}),
    ("A", "2", "AP LLD", {"No Finding": 1.0}),
    ("B", "3", "AP", {"No Finding": 1.0}),
    ("C", "4", "AP", {"Pneumothorax": 1.0, "Support Devices": 1.0}),
]


def write_brax(root: Path) -> Path:
    rows = []
    for k, (patient, acc, view, labels) in enumerate(BRAX_ROWS):
        png = f"images/id_{patient}/Study_{acc}/Series_1/image-{k}.png"
        save_png(root / png, value=40 + 20 * k)
        row = dict(PngPath=png, PatientID=patient, AccessionNumber=acc, ViewPosition=view,
                   PatientSex="F", PatientAge="060Y", **dict.fromkeys(CHEXPERT_LABELS, np.nan))  # fmt: skip
        row.update(labels)
        rows.append(row)
    pd.DataFrame(rows).to_csv(root / "master_spreadsheet_update.csv", index=False)
    return root


def test_brax_studies_views_labels_and_conversations(tmp_path):
    from cxrlib.data.sources.brax import load_brax

    root = write_brax(tmp_path / "brax")
    records, counts = load_brax(root, smoke(max_images_per_study=5))
    by_id = {r["study_id"]: r for r in records}
    assert set(by_id) == {"brax-A-1", "brax-B-3", "brax-C-4"}
    assert counts["images_dropped_other_view"] == 1 and counts["dropped_no_usable_image"] == 1
    first = by_id["brax-A-1"]
    assert [im["view"] for im in first["images"]] == ["PA", "LATERAL"]
    assert first["labels"]["Cardiomegaly"] == 1 and first["labels"]["Edema"] == -1
    assert first["labels"]["Pleural Effusion"] == 0 and first["labels"]["Fracture"] is None
    assert first["images"][0]["path"] == str(root / "images/id_A/Study_1/Series_1/image-0.png")
    conv = build_conversation("multi_label", indexed(first), 0)
    assert conv["turns"][0]["assistant"] == "cardiomegaly."  # uncertain edema is not listed
    assert build_conversation("single_disease", indexed(by_id["brax-C-4"]), 0) is not None


def test_brax_build_and_official_mixture(tmp_path):
    root = write_brax(tmp_path / "brax")
    cfg = smoke(source="brax", roots={"brax": str(root)}, val_fraction=0.0, test_fraction=0.0)
    stats = build_datasets(cfg, tmp_path / "data")
    assert stats["studies_per_source"] == {"brax": 3} and stats["num_images"] == 4
    data = load_datasets(tmp_path / "data")
    assert data.images[data.studies[0]["images"][1]["index"]].shape == (24, 20)
    with pytest.warns(UserWarning, match="official mixture: 49 of 50 training sets have no data"):
        ds = ConversationDataset(data.studies, data.images, None, data.cfg, split="train")
    assert ds.weights == {"multi_label@brax": 1.0}  # the release uses BRAX for multi-label only
    assert ds.conversation(0)["task"] == "multi_label"


def test_brax_missing_file_and_column(tmp_path):
    from cxrlib.data.sources.brax import load_brax

    root = write_brax(tmp_path / "brax")
    df = pd.read_csv(root / "master_spreadsheet_update.csv").drop(columns=["ViewPosition"])
    df.to_csv(root / "master_spreadsheet_update.csv", index=False)
    with pytest.raises(
        SourceError, match=r"(?s)no column\(s\) \['ViewPosition'\].*data.roots.brax"
    ):
        load_brax(root, smoke())
    (root / "master_spreadsheet_update.csv").unlink()
    with pytest.raises(SourceError, match="(?s)BRAX.*master_spreadsheet_update.csv.*physionet"):
        load_brax(root, smoke())
