"""The adapters added for issue 16 (BRAX, SLAKE, the MIMIC VQA sets, Chest ImaGenome, RaDialog) on
fixture trees with the datasets' real file names and columns: records, conversations, the official
mixture, leakage guards and the errors for a missing file or column."""

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_sources import dicom_id, write_mimic, write_ms_cxr

from cxrlib.config import load_preset
from cxrlib.constants import CHEXPERT_LABELS
from cxrlib.data.boxes import to_relative
from cxrlib.data.conversations import build_conversation, supported_tasks
from cxrlib.data.datasets import ConversationDataset, build_datasets, load_datasets
from cxrlib.data.sources import SourceError, load_sources


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


# --- MIMIC-CXR-VQA and Medical-Diff-VQA on the MIMIC fixture tree of test_sources -----------------------
# MIMIC: subject 10000032 (train) s50000001 (7 images; the 7th has a blank view), s50000002,
# s50000003 (image 0 is an MS-CXR image); subject 10000764 (test) s50000010, s50000011.
def vqa_item(split, dicom, subject, study, question, answer, semantic="verify") -> dict:
    return {"split": split, "idx": 0, "image_id": dicom, "question": question,
            "content_type": "presence", "semantic_type": semantic, "template": question,
            "template_program": "program_1", "template_arguments": {}, "answer": answer,
            "subject_id": subject, "study_id": study,
            "image_path": f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"}  # fmt: skip


def write_mimic_cxr_vqa(root: Path) -> Path:
    a, b = "10000032", "10000764"
    train = [
        vqa_item("train", dicom_id("50000001", 0), a, "50000001", "Is there cardiomegaly?", ["yes"]),
        vqa_item("train", dicom_id("50000001", 0), a, "50000001", "List the abnormalities.",
                 ["cardiomegaly", "pleural effusion"], semantic="query"),
        vqa_item("train", dicom_id("50000001", 1), a, "50000001", "Any devices?", [], "query"),
        vqa_item("train", dicom_id("50000003", 0), a, "50000003", "Is there opacity?", ["yes"]),
        vqa_item("train", dicom_id("50000010", 0), b, "50000010", "Is there edema?", ["no"]),
        vqa_item("train", dicom_id("50000001", 6), a, "50000001", "Is it normal?", ["no"]),
        vqa_item("train", "ffffffff-0000-0000-0000-000000000000", a, "50000001", "Edema?", ["no"]),
    ]  # fmt: skip
    test = [vqa_item("test", dicom_id("50000011", 0), b, "50000011", "Pneumothorax?", ["yes"])]
    folder = root / "mimiccxrvqa" / "dataset"
    folder.mkdir(parents=True)
    for name, items in (("train", train), ("valid", []), ("test", test)):
        (folder / f"{name}.json").write_text(json.dumps(items))
    return root


def write_medical_diff_vqa(root: Path) -> Path:
    root.mkdir(parents=True)
    image_of = {"50000001": 0, "50000002": 0, "50000003": 0, "50000010": 0, "50000011": 0}
    subject_of = {s: "10000032" if s < "50000010" else "10000764" for s in image_of}
    rows = []
    for k, (study, k_img) in enumerate(image_of.items()):
        labels = dict.fromkeys(CHEXPERT_LABELS, np.nan)
        rows.append(dict(subject_id=int(subject_of[study]), study_id=int(study), **labels,
                         dicom_id=dicom_id(study, k_img), view="PA", split="train",
                         study_date=21800506 + k, study_order=k))  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "mimic_all.csv", index=False)
    diff = "What has changed compared to the reference image?"
    questions = [  # main, ref, type, question, answer, split
        ("50000002", "50000001", "abnormality", "What abnormalities are seen?", "cardiomegaly", "train"),
        ("50000002", "50000001", "difference", diff, "the main image is missing the finding of effusion", "train"),
        ("50000003", "50000002", "difference", diff, "nothing has changed.", "train"),  # MS-CXR main
        ("50000001", "50000010", "difference", diff, "nothing has changed.", "train"),  # test ref
        ("50000011", "50000010", "presence", "Is there pneumothorax?", "yes", "test"),
        ("50000011", "50000010", "difference", diff, "the main image has additional findings", "test"),
        ("50000002", "59999999", "difference", diff, "nothing has changed.", "train"),  # no ref image
        ("50000002", "59999999", "view", "Which view is this image?", "PA view", "train"),
    ]  # fmt: skip
    pd.DataFrame([dict(study_id=int(m), subject_id=int(subject_of.get(m, "10000032")),
                       ref_id=int(r), question_type=t, question=q, answer=a, split=s)
                  for m, r, t, q, a, s in questions]).to_csv(root / "mimic_pair_questions.csv",
                                                             index=False)  # fmt: skip
    return root


@pytest.fixture
def mimic_vqa_roots(tmp_path):
    mimic = write_mimic(tmp_path / "mimic-cxr-jpg")
    return {"mimic_cxr": str(mimic), "ms_cxr": str(write_ms_cxr(tmp_path / "ms-cxr")),
            "mimic_cxr_vqa": str(write_mimic_cxr_vqa(tmp_path / "mimic-cxr-vqa")),
            "medical_diff_vqa": str(write_medical_diff_vqa(tmp_path / "medical-diff-vqa"))}  # fmt: skip


def test_mimic_cxr_vqa_records_and_leakage(mimic_vqa_roots):
    from cxrlib.data.sources.vqa import load_mimic_cxr_vqa

    roots = mimic_vqa_roots
    records, counts = load_mimic_cxr_vqa(roots["mimic_cxr_vqa"], roots["mimic_cxr"], smoke())
    assert counts["images_dropped_other_view"] == 1 and counts["images_not_in_mimic_cxr_jpg"] == 1
    assert counts["empty_answers_as_none"] == 1 and len(records) == 5
    by_id = {r["study_id"]: r for r in records}
    first = by_id[f"mimicvqa-{dicom_id('50000001', 0)}"]
    assert [(q["answer"], q["answer_type"]) for q in first["qa"]] == [
        ("yes", "closed"), ("cardiomegaly, pleural effusion", "open")]  # fmt: skip
    assert first["images"][0]["path"].endswith(f"s50000001/{dicom_id('50000001', 0)}.jpg")
    assert first["images"][0]["mimic_split"] == "train" and first["images"][0]["hw"] == [40, 32]
    assert by_id[f"mimicvqa-{dicom_id('50000001', 1)}"]["qa"][0]["answer"] == "none"
    conv = build_conversation("vqa", indexed(first), 1)
    assert conv["turns"][0]["user"].startswith("radiology image: <image> Answer the question. ")
    cfg = smoke(source="mimic_cxr_vqa+ms_cxr", roots=roots)
    records, counts = load_sources(cfg, ["ms_cxr", "mimic_cxr_vqa"])  # MIMIC itself not built
    removed = counts["leakage_removed"]
    assert removed["mimic_cxr_vqa_train_studies_with_ms_cxr_images"] == 1
    assert removed["mimic_cxr_vqa_train_records_with_images_in_mimic_test"] == 1
    kept = {r["study_id"] for r in records if r["source"] == "mimic_cxr_vqa"}
    assert kept == {f"mimicvqa-{dicom_id(s, k)}" for s, k in
                    (("50000001", 0), ("50000001", 1), ("50000011", 0))}  # fmt: skip


def test_medical_diff_vqa_pairs_reference_images_and_leakage(mimic_vqa_roots):
    from cxrlib.data.sources.vqa import load_medical_diff_vqa

    roots = mimic_vqa_roots
    records, counts = load_medical_diff_vqa(roots["medical_diff_vqa"], roots["mimic_cxr"], smoke())
    by_id = {r["study_id"]: r for r in records}
    assert counts["studies_not_in_mimic_all"] == 1
    assert counts["difference_questions_dropped_reference_image"] == 1
    pair = by_id["diffvqa-50000002-50000001"]
    assert pair["split"] == "train" and pair["prior"]["study_id"] == "50000001"
    assert pair["prior"]["images"][0]["dicom_id"] == dicom_id("50000001", 0)
    assert [q["question_type"] for q in pair["qa"]] == ["abnormality"] and len(pair["diff_qa"]) == 1
    no_ref = by_id["diffvqa-50000002-59999999"]
    assert no_ref["prior"] is None and no_ref["diff_qa"] == [] and len(no_ref["qa"]) == 1
    conv = build_conversation("difference_vqa", indexed(pair), 0)
    assert conv["images"] == [1, 0]  # reference (prior) first, then main
    assert conv["turns"][0]["user"] == (
        "reference: <image>, main: <image> Using the provided reference and main radiology images, "
        "answer the following question. What has changed compared to the reference image?")  # fmt: skip
    assert conv["turns"][0]["assistant"] == "the main image is missing the finding of effusion"
    assert conv["meta"]["prior_study_id"] == "50000001"
    assert build_conversation("difference_vqa", indexed(no_ref), 0) is None
    assert build_conversation("vqa", indexed(no_ref), 0)["turns"][0]["assistant"] == "PA view"
    cfg = smoke(source="medical_diff_vqa+ms_cxr", roots=roots)
    records, counts = load_sources(cfg, ["ms_cxr", "medical_diff_vqa"])
    removed = counts["leakage_removed"]
    assert removed["medical_diff_vqa_train_studies_with_ms_cxr_images"] == 1  # the MS-CXR main
    assert removed["medical_diff_vqa_train_records_with_images_in_mimic_test"] == 1  # test ref
    kept = {r["study_id"] for r in records if r["source"] == "medical_diff_vqa"}
    assert kept == {"diffvqa-50000002-50000001", "diffvqa-50000011-50000010",
                    "diffvqa-50000002-59999999"}  # fmt: skip


def test_mimic_vqa_sets_build_and_official_mixture(mimic_vqa_roots, tmp_path):
    cfg = smoke(source="mimic_cxr+ms_cxr+mimic_cxr_vqa+medical_diff_vqa", roots=mimic_vqa_roots,
                max_images_per_study=5)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = build_datasets(cfg, tmp_path / "data")
    assert stats["studies_per_source"]["medical_diff_vqa"] == 3
    data = load_datasets(tmp_path / "data")
    # a MIMIC image and the same file named by a VQA set share one index
    mimic_paths = {im["path"]: im["index"] for s in data.studies if s["source"] == "mimic_cxr"
                   for im in s["images"]}  # fmt: skip
    vqa = next(s for s in data.studies if s["study_id"] == "diffvqa-50000002-50000001")
    assert mimic_paths[vqa["prior"]["images"][0]["path"]] == vqa["prior"]["images"][0]["index"]
    with pytest.warns(UserWarning, match="official mixture"):
        ds = ConversationDataset(data.studies, data.images, None, data.cfg, split="train",
                                 length=400)  # fmt: skip
    vqa_keys = {k: w for k, w in ds.weights.items() if "vqa@" in k}
    assert set(vqa_keys) == {"vqa@mimic_cxr_vqa", "vqa@medical_diff_vqa",
                             "difference_vqa@medical_diff_vqa"}  # fmt: skip
    assert vqa_keys["difference_vqa@medical_diff_vqa"] / vqa_keys["vqa@medical_diff_vqa"] == 2
    k = next(i for i in range(400) if ds.conversation(i)["task"] == "difference_vqa")
    assert len(ds[k]["images"]) == 2 and all(im.shape == (40, 32) for im in ds[k]["images"])


def test_mimic_vqa_sets_errors(mimic_vqa_roots, tmp_path):
    from cxrlib.data.sources import check_data_roots
    from cxrlib.data.sources.vqa import load_medical_diff_vqa, load_mimic_cxr_vqa

    roots = dict(mimic_vqa_roots, mimic_cxr=None)
    with pytest.raises(SourceError, match="(?s)images of medical_diff_vqa are MIMIC-CXR-JPG"):
        check_data_roots(smoke(source="medical_diff_vqa", roots=roots))
    root = Path(mimic_vqa_roots["medical_diff_vqa"])
    df = pd.read_csv(root / "mimic_pair_questions.csv").drop(columns=["ref_id"])
    df.to_csv(root / "mimic_pair_questions.csv", index=False)
    with pytest.raises(SourceError, match=r"(?s)Medical-Diff-VQA.*no column\(s\) \['ref_id'\]"):
        load_medical_diff_vqa(root, mimic_vqa_roots["mimic_cxr"], smoke())
    vqa_root = Path(mimic_vqa_roots["mimic_cxr_vqa"])
    (vqa_root / "mimiccxrvqa" / "dataset" / "valid.json").unlink()
    with pytest.raises(SourceError, match="(?s)missing file.*mimiccxrvqa/dataset/valid.json"
                       ".*data.roots.mimic_cxr_vqa"):  # fmt: skip
        load_mimic_cxr_vqa(vqa_root, mimic_vqa_roots["mimic_cxr"], smoke())


# --- RaDialog-Instruct ------------------------------------------------------------------------------------
def write_radialog(root: Path) -> Path:
    root.mkdir(parents=True)
    prefix = "mimic-cxr-jpg/2.0.0/files"

    def item(k, study, subject, k_img, turns, task_type="CL"):
        conv = []
        for i, (q, a) in enumerate(turns):
            conv += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q},
                     {"from": "gpt", "value": a}]  # fmt: skip
        return {"id": f"conv{k}", "task_type": task_type, "conversations": conv,
                "image": f"{prefix}/p{subject[:2]}/p{subject}/s{study}/{dicom_id(study, k_img)}.jpg"}  # fmt: skip

    items = [
        item(
            0,
            "50000001",
            "10000032",
            0,
            [("Is there cardiomegaly?", "Yes."), ("Where is the effusion?", "Left base.")],
        ),  # fmt: skip
        item(1, "50000001", "10000032", 0, [("Write the report.", "The heart ...")], "RG"),
        item(2, "50000010", "10000764", 0, [("Is there edema?", "No.")]),  # a MIMIC test image
        item(3, "50000003", "10000032", 0, [("Any opacity?", "Yes.")]),  # an MS-CXR image
        {
            "id": "conv4",
            "task_type": "CL",
            "image": f"{prefix}/x/{dicom_id('50000001', 0)}.jpg",
            "conversations": [{"from": "gpt", "value": "Hello"}],
        },  # fmt: skip
    ]
    (root / "mimic_cxr_instruct_llava_v2.json").write_text(json.dumps(items))
    return root


def test_radialog_dialogs_and_leakage(tmp_path):
    from cxrlib.data.sources.vqa import load_radialog

    mimic = write_mimic(tmp_path / "mimic-cxr-jpg")
    root = write_radialog(tmp_path / "radialog")
    records, counts = load_radialog(root, mimic, smoke())
    assert counts["skipped_task_type_RG"] == 1 and counts["conversations_malformed"] == 1
    assert len(records) == 3 and {r["split"] for r in records} == {"train"}
    first = records[0]
    assert first["images"][0]["path"].endswith(f"s50000001/{dicom_id('50000001', 0)}.jpg")
    conv = build_conversation("vqa", indexed(first), 0)
    assert [t["user"] for t in conv["turns"]] == [
        "radiology image: <image> Is there cardiomegaly?", "Where is the effusion?"]  # fmt: skip
    assert [t["assistant"] for t in conv["turns"]] == ["Yes.", "Left base."]
    assert conv["images"] == [0] and supported_tasks(indexed(first)) == ["vqa"]
    cfg = smoke(source="radialog+ms_cxr", roots={"mimic_cxr": str(mimic), "radialog": str(root),
                                                 "ms_cxr": str(write_ms_cxr(tmp_path / "ms"))})  # fmt: skip
    records, counts = load_sources(cfg, ["ms_cxr", "radialog"])
    removed = counts["leakage_removed"]
    assert removed["radialog_train_studies_with_ms_cxr_images"] == 1
    assert removed["radialog_train_records_with_images_in_mimic_test"] == 1
    assert [r["study_id"] for r in records if r["source"] == "radialog"] == ["radialog-conv0"]
    for k, im in enumerate(im for r in records for im in r["images"]):
        im["index"] = k
    with pytest.warns(UserWarning, match="official mixture"):
        ds = ConversationDataset(records, None, None, cfg, split="train")
    assert set(ds.weights) == {"vqa@radialog", "grounded_phrase@ms_cxr", "phrase_grounding@ms_cxr"}
    assert ds.weights["vqa@radialog"] == pytest.approx(70 / 74)


def test_radialog_missing_file_and_key(tmp_path):
    from cxrlib.data.sources.vqa import load_radialog

    mimic = write_mimic(tmp_path / "mimic-cxr-jpg")
    root = write_radialog(tmp_path / "radialog")
    items = json.loads((root / "mimic_cxr_instruct_llava_v2.json").read_text())
    del items[2]["conversations"]
    (root / "mimic_cxr_instruct_llava_v2.json").write_text(json.dumps(items))
    with pytest.raises(
        SourceError, match=r"(?s)RaDialog.*item 2 has no key\(s\) \['conversations'\]"
    ):
        load_radialog(root, mimic, smoke())
    (root / "mimic_cxr_instruct_llava_v2.json").unlink()
    with pytest.raises(
        SourceError, match="(?s)mimic_cxr_instruct_llava_v2.json.*data.roots.radialog"
    ):
        load_radialog(root, mimic, smoke())


# --- Chest ImaGenome --------------------------------------------------------------------------------------
REGIONS = {"right lung": [2, 4, 14, 36], "right lower lung zone": [2, 24, 14, 36],
           "left lung": [18, 4, 30, 36], "cardiac silhouette": [10, 18, 24, 34],
           "trachea": [15, 2, 15, 10]}  # an empty box (zero width)  # fmt: skip


def scene_graph(dicom: str) -> dict:
    objects = [{"object_id": f"{dicom}_{name}", "bbox_name": name, "name": name.title(),
                "original_x1": b[0], "original_y1": b[1], "original_x2": b[2],
                "original_y2": b[3], "original_width": 32, "original_height": 40,
                "x1": 0, "y1": 0, "x2": 1, "y2": 1, "width": 1, "height": 1}
               for name, b in REGIONS.items()]  # fmt: skip
    opacity = "Right lower lobe opacity."
    attributes = [
        {"bbox_name": "right lung", "phrases": [opacity],
         "attributes": [["anatomicalfinding|yes|lung opacity", "nlp|yes|abnormal"]]},
        {"bbox_name": "right lower lung zone", "phrases": [opacity],
         "attributes": [["anatomicalfinding|yes|lung opacity"]]},
        {"bbox_name": "left lung", "phrases": ["The left lung is clear."],
         "attributes": [["anatomicalfinding|no|lung opacity", "nlp|yes|normal"]]},
    ]  # fmt: skip
    return {"image_id": dicom, "viewpoint": "PA", "objects": objects, "attributes": attributes,
            "relationships": []}  # fmt: skip


def write_imagenome(root: Path) -> Path:
    splits = root / "silver_dataset" / "splits"
    graphs = root / "silver_dataset" / "scene_graph"
    graphs.mkdir(parents=True)
    splits.mkdir(parents=True)
    files = {"train": [("50000001", "10000032"), ("50000003", "10000032"),
                       ("50000010", "10000764"), ("50000002", "10000032")],
             "valid": [("50000001", "10000032", 1)],  # no scene graph
             "test": [("50000011", "10000764")]}  # fmt: skip
    for name, rows in files.items():
        frame = [dict(dicom_id=dicom_id(r[0], r[2] if len(r) > 2 else 0), subject_id=r[1],
                      study_id=r[0], path="") for r in rows]  # fmt: skip
        pd.DataFrame(frame).to_csv(splits / f"{name}.csv", index=False)
        for row in frame:
            if name != "valid":
                (graphs / f"{row['dicom_id']}_SceneGraph.json").write_text(
                    json.dumps(scene_graph(row["dicom_id"]))
                )
    pd.DataFrame([dict(dicom_id=dicom_id("50000002", 0), subject_id="10000032",
                       study_id="50000002")]).to_csv(splits / "images_to_avoid.csv", index=False)  # fmt: skip
    return root


def test_chest_imagenome_regions_phrases_tasks_and_leakage(tmp_path):
    from cxrlib.data.sources.imagenome import load_chest_imagenome

    mimic = write_mimic(tmp_path / "mimic-cxr-jpg")
    root = write_imagenome(tmp_path / "chest-imagenome")
    records, counts = load_chest_imagenome(root, mimic, smoke())
    assert counts["gold_images_left_out_of_training"] == 1
    assert counts["images_without_scene_graph"] == 1 and counts["regions_with_empty_box"] == 4
    assert len(records) == 4 and {r["split"] for r in records} == {"train", "test"}
    first = indexed(records[0])
    image = first["images"][0]
    assert set(image["region_boxes"]) == set(REGIONS) - {"trachea"} and image["hw"] == [40, 32]
    # one phrase, positive in two nested regions: only the specific one is kept; "clear": none
    assert image["phrase_boxes"] == [{"observation": "lung opacity",
                                      "phrase": "Right lower lobe opacity",
                                      "boxes": [[2.0, 24.0, 14.0, 36.0]]}]  # fmt: skip
    organs = {build_conversation("organ_grounding", first, s)["meta"]["organ"] for s in range(40)}
    assert organs == {"right lung", "right lower lung zone", "left lung", "cardiac silhouette"}
    conv = build_conversation("phrase_grounding", first, 0)
    assert conv["meta"]["phrase"] == "Right lower lobe opacity"
    assert conv["meta"]["boxes"] == [to_relative([2, 24, 14, 36], (40, 32))]
    assert build_conversation("grounded_organ", first, 0) is not None
    # + the synthetic view question every image supports (not in the official mixture)
    assert sorted(supported_tasks(first)) == ["grounded_organ", "grounded_phrase",
                                              "organ_grounding", "phrase_grounding", "vqa"]  # fmt: skip
    cfg = smoke(source="chest_imagenome+ms_cxr",
                roots={"mimic_cxr": str(mimic), "chest_imagenome": str(root),
                       "ms_cxr": str(write_ms_cxr(tmp_path / "ms"))})  # fmt: skip
    records, counts = load_sources(cfg, ["ms_cxr", "chest_imagenome"])
    removed = counts["leakage_removed"]
    assert removed["chest_imagenome_train_studies_with_ms_cxr_images"] == 1
    assert removed["chest_imagenome_train_records_with_images_in_mimic_test"] == 1
    for k, im in enumerate(im for r in records for im in r["images"]):
        im["index"] = k
    with pytest.warns(UserWarning, match="official mixture"):
        ds = ConversationDataset(records, None, None, cfg, split="train")
    mine = {k: w for k, w in ds.weights.items() if k.endswith("@chest_imagenome")}
    assert set(mine) == {"grounded_phrase@chest_imagenome", "phrase_grounding@chest_imagenome",
                         "organ_grounding@chest_imagenome", "grounded_organ@chest_imagenome"}  # fmt: skip
    assert mine["phrase_grounding@chest_imagenome"] / mine["organ_grounding@chest_imagenome"] == 2


def test_chest_imagenome_errors(tmp_path):
    from cxrlib.data.sources.imagenome import load_chest_imagenome

    mimic = write_mimic(tmp_path / "mimic-cxr-jpg")
    root = write_imagenome(tmp_path / "chest-imagenome")
    (root / "silver_dataset" / "splits" / "valid.csv").unlink()
    with pytest.raises(SourceError, match="(?s)Chest ImaGenome.*silver_dataset/splits/valid.csv"
                       ".*data.roots.chest_imagenome"):  # fmt: skip
        load_chest_imagenome(root, mimic, smoke())
    for p in (root / "silver_dataset" / "scene_graph").iterdir():
        p.unlink()
    (root / "silver_dataset" / "scene_graph").rmdir()
    with pytest.raises(SourceError, match="(?s)no folder .*scene_graph.*extract"):
        load_chest_imagenome(root, mimic, smoke())


# --- COVID-QU-Ex ------------------------------------------------------------------------------------------
def write_covid_qu_ex(root: Path) -> Path:
    base = root / "Infection Segmentation Data" / "Infection Segmentation Data"
    lungs = np.zeros((32, 32), np.uint8)
    lungs[4:28, 2:14] = 255  # image-left part = the patient's right lung
    lungs[4:28, 18:30] = 255
    infection = np.zeros((32, 32), np.uint8)
    infection[10:14, 4:8] = 255  # right lung
    infection[20:26, 20:28] = 255  # left lung
    for split in ("Train", "Val", "Test"):
        for cls in ("COVID-19", "Non-COVID", "Normal"):
            name = f"{cls.lower()}_{split.lower()}_1.png"
            save_png(base / split / cls / "images" / name, hw=(64, 64))  # masks are half the size
            (base / split / cls / "lung masks").mkdir()
            (base / split / cls / "infection masks").mkdir()
            Image.fromarray(lungs).save(base / split / cls / "lung masks" / name)
            Image.fromarray(infection if cls == "COVID-19" else 0 * infection).save(
                base / split / cls / "infection masks" / name
            )
    return root


def test_covid_qu_ex_lung_and_infection_boxes(tmp_path):
    from cxrlib.data.sources.masks import load_covid_qu_ex

    root = write_covid_qu_ex(tmp_path / "covidqu")
    records, counts = load_covid_qu_ex(root, smoke())
    assert len(records) == 9 and counts["boxes"] == 6 and not counts.get("images_without_two_lungs")
    by_id = {r["study_id"]: r for r in records}
    covid = by_id["covidqu-Train-COVID-19-covid-19_train_1"]
    image = covid["images"][0]
    assert covid["split"] == "train" and covid["labels"]["Pneumonia"] == 1
    assert image["organ_boxes"] == {"right lung": [4.0, 8.0, 28.0, 56.0],
                                    "left lung": [36.0, 8.0, 60.0, 56.0]}  # fmt: skip
    assert [b["box"] for b in image["finding_boxes"]] == [[8.0, 20.0, 16.0, 28.0],
                                                         [40.0, 40.0, 56.0, 52.0]]  # fmt: skip
    normal = indexed(by_id["covidqu-Test-Normal-normal_test_1"])
    other = indexed(by_id["covidqu-Val-Non-COVID-non-covid_val_1"])
    assert normal["split"] == "test" and other["label_space"] == []
    assert (
        build_conversation("finding_grounding", normal, 0)["turns"][0]["assistant"]
        == "Not present."
    )
    assert build_conversation("finding_grounding", other, 0) is None  # Non-COVID: unlabelled
    conv = build_conversation("abnormality_detection", indexed(covid), 0)
    assert conv["meta"]["boxes"] == sorted(to_relative(b["box"], (64, 64))
                                           for b in image["finding_boxes"])  # fmt: skip
    assert build_conversation("grounded_organ", other, 0) is not None
    for k, im in enumerate(im for r in records for im in r["images"]):
        im["index"] = k
    with pytest.warns(UserWarning, match="official mixture: 45 of 50"):
        ds = ConversationDataset(records, None, None, smoke(), split="train")
    assert set(ds.weights) == {f"{t}@covid_qu_ex" for t in (
        "finding_grounding", "grounded_finding", "abnormality_detection", "organ_grounding",
        "grounded_organ")}  # fmt: skip


def test_covid_qu_ex_missing_folders(tmp_path):
    from cxrlib.data.sources.masks import load_covid_qu_ex

    with pytest.raises(SourceError, match="(?s)COVID-QU-Ex.*Infection Segmentation Data/Train"
                       ".*data.roots.covid_qu_ex"):  # fmt: skip
        load_covid_qu_ex(tmp_path, smoke())
    root = write_covid_qu_ex(tmp_path / "covidqu")
    folder = root / "Infection Segmentation Data" / "Infection Segmentation Data" / "Val" / "Normal"
    for p in (folder / "images").iterdir():
        p.unlink()
    with pytest.raises(SourceError, match="(?s)no images in .*Val/Normal/images"):
        load_covid_qu_ex(root, smoke())
