"""The adapters added for issue 16 (BRAX, SLAKE, the MIMIC VQA sets, Chest ImaGenome, RaDialog) on
fixture trees with the datasets' real file names and columns: records, conversations, the official
mixture, leakage guards and the errors for a missing file or column."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrlib.config import load_preset
from cxrlib.constants import CHEXPERT_LABELS
from cxrlib.data.conversations import build_conversation, supported_tasks
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


# --- SLAKE ----------------------------------------------------------------------------------------------
def slake_item(qid, img, question, answer, lang="en", modality="X-Ray", location="Lung",
               answer_type="CLOSED") -> dict:  # fmt: skip
    return {"img_id": int(img[5:]), "img_name": f"{img}/source.jpg", "question": question,
            "answer": answer, "q_lang": lang, "location": location, "modality": modality,
            "answer_type": answer_type, "base_type": "vqa", "content_type": "Abnormality",
            "triple": ["vhead", "_", "_"], "qid": qid}  # fmt: skip


def write_slake(root: Path) -> Path:
    test = [
        slake_item(1, "xmlab10", "Is the lung healthy?", "No"),
        slake_item(2, "xmlab10", "Does the picture contain heart?", "Yes", location="Chest_heart"),
        slake_item(3, "xmlab10", "Where is the abnormality?", "Left Lung", answer_type="OPEN"),
        slake_item(4, "xmlab10", "肺部健康吗?", "否", lang="zh"),
        slake_item(5, "xmlab11", "Is this a CT?", "Yes", modality="CT", location="Abdomen"),
        slake_item(6, "xmlab12", "Is there a pneumothorax?", "Yes"),
        slake_item(7, "xmlab13", "Is the colon visible?", "No", location="Abdomen"),
    ]
    for name, items in (("train.json", [slake_item(9, "xmlab20", "Is it normal?", "Yes")]),
                        ("validate.json", []), ("test.json", test)):  # fmt: skip
        root.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(items, ensure_ascii=False))
    for img in ("xmlab10", "xmlab11", "xmlab12", "xmlab13", "xmlab20"):
        save_png(root / "imgs" / img / "source.jpg")
    return root


def test_slake_english_closed_chest_xray_questions(tmp_path):
    from cxrlib.data.sources.vqa import load_slake

    root = write_slake(tmp_path / "Slake1.0")
    records, counts = load_slake(root, smoke())
    by_id = {r["study_id"]: r for r in records}
    assert set(by_id) == {"slake-xmlab10", "slake-xmlab12"}  # train.json is not read
    assert counts == {"questions_test.json": 7, "questions_not_english": 1,
                      "questions_not_xray": 1, "xray_questions_not_chest": 1,
                      "open_questions": 1, "questions": 3, "images": 2}  # fmt: skip
    first = by_id["slake-xmlab10"]
    assert first["split"] == "test" and [q["answer"] for q in first["qa"]] == ["No", "Yes"]
    assert first["images"][0]["path"] == str(root / "imgs/xmlab10/source.jpg")
    convs = {build_conversation("vqa", indexed(first), seed)["turns"][0]["user"]
             for seed in range(20)}  # fmt: skip
    assert convs == {"radiology image: <image> Answer the question. Is the lung healthy?",
                     "radiology image: <image> Answer the question. Does the picture contain heart?"}  # fmt: skip
    assert supported_tasks(indexed(first)) == ["vqa"]  # SLAKE labels nothing else


def test_slake_build_and_missing_key(tmp_path):
    from cxrlib.data.sources.vqa import load_slake

    root = write_slake(tmp_path / "Slake1.0")
    stats = build_datasets(smoke(source="slake", roots={"slake": str(root)}), tmp_path / "data")
    assert stats["split_sizes"] == {"train": 0, "val": 0, "test": 2}
    assert stats["task_sizes"]["test"]["vqa"] == 2
    data = load_datasets(tmp_path / "data")
    ds = ConversationDataset(data.studies, data.images, None, data.cfg, tasks=["vqa"],
                             split="test")  # fmt: skip
    assert ds[0]["images"][0].shape == (24, 20) and ds[0]["meta"]["answer_type"] == "closed"
    items = json.loads((root / "test.json").read_text())
    del items[3]["modality"]
    (root / "test.json").write_text(json.dumps(items))
    with pytest.raises(SourceError, match=r"(?s)test.json item 3 has no key\(s\) \['modality'\]"
                       r".*data.roots.slake"):  # fmt: skip
        load_slake(root, smoke())
    (root / "test.json").unlink()
    with pytest.raises(SourceError, match="(?s)SLAKE 1.0.*missing file.*test.json"):
        load_slake(root, smoke())
