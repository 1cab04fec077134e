"""The real-dataset adapters (cxrlib.data.sources) on fixture trees with the real file and column
names, the label files torchxrayvision ships parsed in full, leakage guards, errors, images."""

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torchxrayvision
from conftest import dicom_bytes
from PIL import Image

from cxrlib.config import load_preset
from cxrlib.constants import CHEXPERT_LABELS
from cxrlib.data.__main__ import main as data_main
from cxrlib.data.boxes import format_box, to_relative
from cxrlib.data.conversations import build_conversation
from cxrlib.data.datasets import ConversationDataset, build_datasets, load_datasets
from cxrlib.data.sources import (
    SourceError,
    check_data_roots,
    guard_leakage,
    load_sources,
)
from cxrlib.data.sources.chexpert import load_chexpert
from cxrlib.data.sources.detection import (
    load_rsna,
    load_siim,
    load_vindr,
    merge_reader_boxes,
    rle_box,
)
from cxrlib.data.sources.images import ImageStore, read_image
from cxrlib.data.sources.mimic import load_mimic, study_order_key
from cxrlib.data.sources.nih import load_nih

XRV = Path(torchxrayvision.__file__).parent / "data"


def smoke(**data) -> dict:
    return load_preset("smoke", {"data": data})


# --- a MIMIC-CXR-JPG + MS-CXR fixture tree ---------------------------------------------------------
# subject 10000032 (train): 3 studies; s50000001 has 6 images (PA, LATERAL, AP, LL, PA, PA) + one
# with a blank view; s50000002 has no Findings; s50000003 is the latest (StudyTime lost its zeros).
# subject 10000764 (test): 2 studies. MS-CXR marks one image of s50000003 (train) and one test image.
STUDIES = [  # subject, study, split, date, time, views, findings
    ("10000032", "50000001", "train", 21800506, 213014.531, ["PA", "LATERAL", "AP", "LL", "PA", "PA", ""],
     "The heart is enlarged. Small left pleural effusion."),
    ("10000032", "50000002", "train", 21800507, 93015.0, ["PA"], ""),
    ("10000032", "50000003", "train", 21800507, 101500.0, ["PA", "LATERAL"],
     "Heart size is normal. Right lower lobe opacity."),
    ("10000764", "50000010", "test", 21320101, 80000.0, ["AP"], "No acute process. Lungs are clear."),
    ("10000764", "50000011", "test", 21320102, 80000.0, ["AP", "LATERAL"],
     "Interval development of a left pneumothorax."),
]  # fmt: skip


def dicom_id(study: str, k: int) -> str:
    return f"{study[-4:]}{k:04d}-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd"


def write_mimic(root: Path, with_txt_reports: bool = False) -> Path:
    split_rows, meta_rows, label_rows, sections = [], [], [], []
    for subject, study, split, date, time, views, findings in STUDIES:
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        folder.mkdir(parents=True, exist_ok=True)
        for k, view in enumerate(views):
            did = dicom_id(study, k)
            Image.fromarray(np.full((40, 32), 50 + 10 * k, np.uint8)).save(folder / f"{did}.jpg")
            split_rows.append(
                dict(
                    dicom_id=did,
                    study_id=study,
                    subject_id=subject,
                    split=split.replace("val", "validate"),
                )
            )
            meta_rows.append(dict(dicom_id=did, subject_id=subject, study_id=study,
                                  PerformedProcedureStepDescription="CHEST (PA AND LAT)",
                                  ViewPosition=view, Rows=40, Columns=32, StudyDate=date,
                                  StudyTime=time, ProcedureCodeSequence_CodeMeaning="",
                                  ViewCodeSequence_CodeMeaning="", PatientOrientationCodeSequence_CodeMeaning=""))  # fmt: skip
        labels = dict.fromkeys(CHEXPERT_LABELS, np.nan)
        labels.update({"Cardiomegaly": 1.0, "Pleural Effusion": -1.0} if "enlarged" in findings
                      else {"No Finding": 1.0})  # fmt: skip
        label_rows.append(dict(subject_id=subject, study_id=study, **labels))
        text = f"FINAL REPORT\n EXAMINATION: CHEST\n\n FINDINGS:\n {findings}\n\n IMPRESSION: ok\n"
        if not findings:
            text = "FINAL REPORT\n IMPRESSION: portable film, no findings section.\n"
        if with_txt_reports:
            (folder.parent / f"s{study}.txt").write_text(text)
        sections.append(dict(study=f"s{study}", impression="ok", findings=findings,
                             last_paragraph="", comparison=""))  # fmt: skip
    pd.DataFrame(split_rows).to_csv(root / "mimic-cxr-2.0.0-split.csv.gz", index=False)
    pd.DataFrame(meta_rows).to_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", index=False)
    pd.DataFrame(label_rows).to_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", index=False)
    if not with_txt_reports:
        pd.DataFrame(sections).to_csv(root / "mimic_cxr_sectioned.csv", index=False)
    return root


def write_ms_cxr(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for subject, study, k, split, phrase in [("10000032", "50000003", 0, "train", "right lower lobe opacity"),
                                             ("10000764", "50000011", 0, "test", "left pneumothorax")]:  # fmt: skip
        did = dicom_id(study, k)
        path = f"files/p{subject[:2]}/p{subject}/s{study}/{did}.jpg"
        cat = "Lung Opacity" if "opacity" in phrase else "Pneumothorax"
        for box in ([2, 20, 10, 12], [14, 22, 8, 10]):  # two boxes for one phrase
            rows.append(dict(dicom_id=did, category_name=cat, label_text=phrase, path=path,
                             x=box[0], y=box[1], w=box[2], h=box[3], image_width=32,
                             image_height=40, split=split))  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "MS_CXR_Local_Alignment_v1.1.0.csv", index=False)
    return root


@pytest.fixture
def mimic_root(tmp_path):
    return write_mimic(tmp_path / "mimic-cxr-jpg")


def test_mimic_records_views_cap_priors_and_counts(mimic_root):
    with pytest.warns(UserWarning, match="1 studies of mimic_cxr have more than 5 images"):
        records, counts = load_sources(smoke(source="mimic_cxr", max_images_per_study=5,
                                             roots={"mimic_cxr": str(mimic_root)}), ["mimic_cxr"])  # fmt: skip
    by_id = {r["study_id"]: r for r in records}
    assert set(by_id) == {"50000001", "50000003", "50000010", "50000011"}  # no Findings: dropped
    c = counts["mimic_cxr"]
    assert c["dropped_no_findings"] == 1 and c["images_dropped_other_view"] == 1
    assert c["studies_cut_to_max_images"] == 1 and c["images_cut"] == 1  # 6 usable -> 5
    first = by_id["50000001"]
    assert [im["view"] for im in first["images"]] == ["PA", "PA", "PA", "AP", "LATERAL"]
    assert first["labels"]["Cardiomegaly"] == 1 and first["labels"]["Pleural Effusion"] == -1
    assert first["labels"]["Edema"] is None and first["split"] == "train"
    assert first["findings_text"].startswith("The heart is enlarged")
    # consecutive pairs ordered by (date, zero-padded time): 093015 < 101500 on the same day
    assert by_id["50000003"]["prior"]["study_id"] == "50000001"
    assert (
        by_id["50000001"]["prior"] is None and by_id["50000011"]["prior"]["study_id"] == "50000010"
    )
    assert study_order_key(21800507, 93015.0) < study_order_key(21800507, 101500.0)


def test_mimic_reports_from_txt_files(tmp_path):
    root = write_mimic(tmp_path / "m", with_txt_reports=True)
    records, counts = load_mimic(root, smoke(max_images_per_study=2))
    assert len(records) == 4 and counts["dropped_no_findings"] == 1
    assert records[-1]["findings_text"] == "Interval development of a left pneumothorax."


def test_mimic_build_command_and_every_task(mimic_root, tmp_path, capsys):
    ms = write_ms_cxr(tmp_path / "ms-cxr")
    out = tmp_path / "data"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = data_main(["--preset", "smoke", "--set", "data.source=mimic_cxr+ms_cxr",
                           "--set", "data.max_images_per_study=5",
                           "--set", f"data.roots.mimic_cxr={mimic_root}",
                           "--set", f"data.roots.ms_cxr={ms}", "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "mimic_cxr" in printed and "cot_multi_study" in printed
    # leakage: the train study holding an MS-CXR image is gone, and so is its link as a prior
    assert (
        stats["adapter_counts"]["leakage_removed"]["mimic_cxr_train_studies_with_ms_cxr_images"]
        == 1
    )
    data = load_datasets(out)
    assert isinstance(data.images, ImageStore) and len(data.images) == stats["num_images"]
    assert {s["source"] for s in data.studies} == {"mimic_cxr", "ms_cxr"}
    image = data.images[data.studies[0]["images"][0]["index"]]
    assert image.dtype == np.uint8 and image.shape == (40, 32)
    test = [s for s in data.studies if s["split"] == "test" and s["source"] == "mimic_cxr"]
    tasks = {t: build_conversation(t, test[-1], 0) for t in
             ("cot_single", "cot_multi_image", "cot_multi_study", "single_disease", "multi_label",
              "vqa", "direct_report")}  # fmt: skip
    assert all(tasks.values()), [t for t, c in tasks.items() if c is None]
    assert len(tasks["cot_multi_study"]["images"]) == 3  # prior (1) + current (2)
    ms_rec = next(s for s in data.studies if s["source"] == "ms_cxr" and s["split"] == "test")
    conv = build_conversation("phrase_grounding", ms_rec, 0)
    expected = sorted(to_relative(b, (40, 32)) for b in ([2, 20, 12, 32], [14, 22, 22, 32]))
    assert "left pneumothorax" in conv["turns"][0]["user"] and conv["meta"]["boxes"] == expected
    # MS-CXR labels only its own finding: no invented negatives
    assert build_conversation("multi_label", ms_rec, 0) is None
    ds = ConversationDataset(data.studies, data.images, None, data.cfg, split="test", length=8)
    assert all(item["images"][0].dtype == np.uint8 for item in (ds[i] for i in range(8)))


def test_image_cache_serves_resized_copies(mimic_root, tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.tile(np.arange(200, dtype=np.uint8), (300, 1))).save(big)
    store = ImageStore([str(big)], cache_dir=tmp_path / "cache", cache_short_side=56)
    first = store[0]
    assert first.shape == (84, 56) and len(list((tmp_path / "cache").rglob("*.png"))) == 1
    big.unlink()  # a second read comes from the cache
    assert np.array_equal(store[0], first)


# --- errors --------------------------------------------------------------------------------------
def test_missing_root_names_the_dataset_page_and_key(tmp_path):
    with pytest.raises(SourceError) as err:
        check_data_roots(smoke(source="mimic_cxr", roots={"mimic_cxr": str(tmp_path / "nope")}))
    text = str(err.value)
    assert "MIMIC-CXR-JPG" in text and "physionet.org/content/mimic-cxr-jpg" in text
    assert "data.roots.mimic_cxr" in text and "does not exist" in text


def test_paper_preset_stops_before_building_with_every_missing_root(tmp_path):
    cfg = load_preset("paper")
    with pytest.raises(SourceError, match="(?s)mimic_cxr.*ms_cxr"):
        build_datasets(cfg, tmp_path / "data")
    assert not (tmp_path / "data").exists()  # nothing was rendered or written


def test_missing_file_and_column(mimic_root):
    (mimic_root / "mimic-cxr-2.0.0-chexpert.csv.gz").unlink()
    with pytest.raises(
        SourceError, match="mimic-cxr-2.0.0-chexpert.csv.gz or mimic-cxr-2.0.0-chexpert.csv"
    ):
        load_mimic(mimic_root, smoke())
    meta = pd.read_csv(mimic_root / "mimic-cxr-2.0.0-metadata.csv.gz").drop(columns=["StudyTime"])
    meta.to_csv(mimic_root / "mimic-cxr-2.0.0-metadata.csv.gz", index=False)
    with pytest.raises(SourceError, match=r"no column\(s\) \['StudyTime'\]"):
        load_mimic(mimic_root, smoke())


def test_missing_image_files_are_an_error(mimic_root, tmp_path):
    next((mimic_root / "files").rglob(f"{dicom_id('50000011', 0)}.jpg")).unlink()
    with pytest.raises(SourceError, match="1 of .* image files are missing"):
        build_datasets(
            smoke(source="mimic_cxr", roots={"mimic_cxr": str(mimic_root)}), tmp_path / "d"
        )


def test_more_than_five_images_is_an_error(mimic_root):
    cfg = smoke(source="mimic_cxr", max_images_per_study=6, roots={"mimic_cxr": str(mimic_root)})
    with pytest.raises(ValueError, match="use 1 to 5"):
        check_data_roots(cfg)


def test_unknown_source_is_an_error():
    from cxrlib.config import ConfigError

    with pytest.raises(ConfigError, match=r"unknown source\(s\) \['jsrt'\]"):
        smoke(source="mimic_cxr+jsrt")
    cfg = smoke()
    cfg["data"]["source"] = "mimic_cxr+jsrt"  # a config that skipped the schema
    with pytest.raises(SourceError, match="jsrt: no adapter yet"):
        check_data_roots(cfg)


# --- leakage ---------------------------------------------------------------------------------------
def test_leakage_guard_removes_ms_cxr_images_and_mimic_test_images(mimic_root, tmp_path):
    ms = write_ms_cxr(tmp_path / "ms")
    df = pd.read_csv(ms / "MS_CXR_Local_Alignment_v1.1.0.csv")
    df.loc[df["split"] == "test", "split"] = "train"  # an MS-CXR train image from MIMIC's test set
    df.to_csv(ms / "MS_CXR_Local_Alignment_v1.1.0.csv", index=False)
    cfg = smoke(source="mimic_cxr+ms_cxr", roots={"mimic_cxr": str(mimic_root), "ms_cxr": str(ms)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records, counts = load_sources(cfg, ["mimic_cxr", "ms_cxr"])
    removed = counts["leakage_removed"]
    assert removed["mimic_cxr_train_studies_with_ms_cxr_images"] == 1
    assert removed["ms_cxr_train_images_in_mimic_test"] == 1
    ms_ids = {im["dicom_id"] for r in records if r["source"] == "ms_cxr" for im in r["images"]}
    mimic_train = {im["dicom_id"] for r in records if r["source"] == "mimic_cxr"
                   and r["split"] != "test" for im in r["images"]}  # fmt: skip
    mimic_test = {im["dicom_id"] for r in records if r["source"] == "mimic_cxr"
                  and r["split"] == "test" for im in r["images"]}  # fmt: skip
    ms_train = {r["images"][0]["dicom_id"] for r in records if r["source"] == "ms_cxr"
                and r["split"] != "test"}  # fmt: skip
    assert not mimic_train & ms_ids and not ms_train & mimic_test
    assert guard_leakage(records) == {}  # idempotent: nothing left to remove


# --- the real label files of torchxrayvision, parsed in full (images faked: none) ----------------------
def _link(src: str, root: Path, name: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(XRV / src, root / name)
    return root


@pytest.mark.slow  # 112k / 30k rows: several seconds on 2 shared cores
def test_nih_label_files_in_full(tmp_path):
    root = _link("Data_Entry_2017_v2020.csv.gz", tmp_path / "nih", "Data_Entry_2017_v2020.csv.gz")
    _link("BBox_List_2017.csv.gz", root, "BBox_List_2017.csv.gz")
    records, counts = load_nih(root, smoke())
    entries = pd.read_csv(XRV / "Data_Entry_2017_v2020.csv.gz")
    bbox = pd.read_csv(XRV / "BBox_List_2017.csv.gz")
    assert len(records) == len(entries) == 112120
    assert sum(len(r["images"][0]["finding_boxes"]) for r in records) == len(bbox) == 984
    assert counts["images_with_boxes"] == bbox["Image Index"].nunique()
    n_effusion = entries["Finding Labels"].str.contains("Effusion").sum()
    assert sum(r["labels"]["Pleural Effusion"] == 1 for r in records) == n_effusion
    assert all(r["labels"]["Fracture"] is None for r in records)  # NIH does not label it
    assert {r["split"] for r in records} == {"train", "val", "test"}


@pytest.mark.slow  # 223,414 rows: about 10-25 s on 2 shared cores
def test_chexpert_label_file_in_full(tmp_path):
    root = _link("chexpert_train.csv.gz", tmp_path / "CheXpert-v1.0-small", "train.csv.gz")
    records, counts = load_chexpert(root, smoke(max_images_per_study=5), files=("train.csv",))
    df = pd.read_csv(XRV / "chexpert_train.csv.gz")
    study = df["Path"].str.split("/").str[2:4].str.join("/")
    assert counts["rows_train.csv"] == len(df) == 223414
    assert len(records) + counts.get("dropped_no_usable_image", 0) == study.nunique()
    assert sum(len(r["images"]) for r in records) + counts.get("images_dropped_other_view", 0) \
        + counts.get("images_cut", 0) == len(df)  # fmt: skip


@pytest.mark.slow  # 112k / 30k rows: several seconds on 2 shared cores
def test_rsna_label_files_in_full(tmp_path):
    root = _link(
        "kaggle_stage_2_train_labels.csv.zip", tmp_path / "rsna", "stage_2_train_labels.csv.zip"
    )
    _link(
        "kaggle_stage_2_train_images_dicom_headers.csv.gz",
        root,
        "stage_2_train_images_dicom_headers.csv.gz",
    )
    records, counts = load_rsna(root, smoke())
    df = pd.read_csv(XRV / "kaggle_stage_2_train_labels.csv.zip")
    assert len(records) == df["patientId"].nunique() == 26684
    assert sum(len(r["images"][0]["finding_boxes"]) for r in records) == (df["Target"] == 1).sum()
    assert {r["images"][0]["view"] for r in records} == {"PA", "AP"}


def test_siim_rle_file_in_full(tmp_path):
    root = _link("siim-pneumothorax-train-rle.csv.gz", tmp_path / "siim", "train-rle.csv.gz")
    records, counts = load_siim(root, smoke())
    df = pd.read_csv(XRV / "siim-pneumothorax-train-rle.csv.gz")
    df.columns = ["ImageId", "EncodedPixels"]
    positive = df[df["EncodedPixels"].str.strip() != "-1"]
    assert len(records) == df["ImageId"].nunique()
    assert counts["boxes"] == len(positive)
    assert counts["positive_images"] == positive["ImageId"].nunique()
    for r in records:
        for fb in r["images"][0]["finding_boxes"]:
            x1, y1, x2, y2 = fb["box"]
            assert 0 <= x1 < x2 <= 1024 and 0 <= y1 < y2 <= 1024


def test_vindr_label_file_in_full(tmp_path):
    root = _link("vinbigdata-train.csv.gz", tmp_path / "vindr", "train.csv.gz")
    records, counts = load_vindr(root, smoke())
    df = pd.read_csv(XRV / "vinbigdata-train.csv.gz")
    assert counts["rows_train.csv.gz"] == len(df) == 67914
    assert len(records) == df["image_id"].nunique() == 15000
    boxed = df.dropna(subset=["x_min"])
    # merging the readers never invents a box and never loses a (image, class) pair
    assert counts["boxes"] <= len(boxed)
    pairs = {(r["study_id"][6:], fb["finding"]["observation"]) for r in records
             for fb in r["images"][0]["finding_boxes"]}  # fmt: skip
    assert len(pairs) <= boxed.groupby(["image_id", "class_name"]).ngroups


# --- boxes from masks, readers merged, pixels decoded -------------------------------------------------
def _siim_encode(mask: np.ndarray) -> str:
    flat = mask.T.flatten()  # column-major
    runs, pos, prev_end = [], 0, 0
    while pos < len(flat):
        if flat[pos]:
            start = pos
            while pos < len(flat) and flat[pos]:
                pos += 1
            runs += [start - prev_end, pos - start]
            prev_end = pos
        pos += 1
    return " ".join(map(str, runs))


def test_rle_box_matches_the_mask():
    mask = np.zeros((64, 64), bool)
    mask[10:30, 5:9] = True  # runs wrap across columns
    mask[40:42, 50:60] = True
    box = rle_box(_siim_encode(mask), (64, 64))
    ys, xs = np.nonzero(mask)
    assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_readers_boxes_are_merged():
    merged = merge_reader_boxes([[10, 10, 50, 50], [12, 11, 52, 49], [200, 200, 220, 230]])
    assert merged == [[11.0, 10.5, 51.0, 49.5], [200.0, 200.0, 220.0, 230.0]]


def _write_dicom(path: Path, pixels: np.ndarray, photometric: str, slope=1.0, intercept=0.0):
    path.write_bytes(dicom_bytes(pixels, photometric, slope, intercept))


def test_dicom_modality_lut_and_monochrome1(tmp_path):
    ramp = np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (48, 1))
    _write_dicom(tmp_path / "m2.dcm", ramp, "MONOCHROME2", slope=2.0, intercept=-100)
    _write_dicom(tmp_path / "m1.dcm", ramp, "MONOCHROME1")
    m2, m1 = read_image(tmp_path / "m2.dcm"), read_image(tmp_path / "m1.dcm")
    assert m2.dtype == np.uint8 and m2.shape == (48, 64)
    assert m2[:, 0].mean() < 5 and m2[:, -1].mean() > 250  # windowed 12-bit, not clipped
    assert m1[:, 0].mean() > 250 and m1[:, -1].mean() < 5  # MONOCHROME1: inverted
    assert np.unique(m2).size > 50  # the ramp keeps its grey levels


def test_sixteen_bit_png_is_windowed_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(tmp_path / "x.png")
    image = read_image(tmp_path / "x.png")
    assert image.dtype == np.uint8 and (image == 255).mean() < 0.05


# --- the official mixture -----------------------------------------------------------------------------
def test_official_mixture_over_the_sources_present(mimic_root):
    from cxrlib.data.mixture import group_shares
    from cxrlib.data.sources.mixture import OFFICIAL_WEIGHTS

    cfg = smoke(source="mimic_cxr", roots={"mimic_cxr": str(mimic_root)})
    records, _ = load_sources(cfg, ["mimic_cxr"])
    for k, im in enumerate(im for r in records for im in r["images"]):
        im["index"] = k
    with pytest.warns(UserWarning, match="official mixture: 47 of 50 training sets have no data"):
        ds = ConversationDataset(records, None, None, cfg, split="train")
    assert set(ds.weights) == {"cot_single@mimic_cxr", "cot_multi_image@mimic_cxr",
                               "cot_multi_study@mimic_cxr"}  # fmt: skip
    assert ds.weights["cot_single@mimic_cxr"] / ds.weights[
        "cot_multi_image@mimic_cxr"
    ] == pytest.approx(200 / 120)
    assert group_shares(ds.weights) == {"report": pytest.approx(1.0)}
    assert ds.conversation(0)["task"] in ("cot_single", "cot_multi_image", "cot_multi_study")
    assert sum(OFFICIAL_WEIGHTS.values()) == pytest.approx(
        380 + 62 + 21.1 + 11.1 + 10.6 + 14 + 3.2 + 84 + 40 + 78
    )


# --- ChestX-Det10 and COVID-19 Radiography fixture trees ------------------------------------------------
def test_chestx_det10_tree(tmp_path):
    from cxrlib.data.sources.masks import load_chestx_det10

    root = tmp_path / "det10"
    (root / "train_data").mkdir(parents=True)
    (root / "test_data").mkdir()
    items = {"train": [{"file_name": "36199.png", "syms": ["Effusion", "Calcification"],
                        "boxes": [[600, 700, 900, 950], [10, 10, 20, 20]]},
                       {"file_name": "36200.png", "syms": [], "boxes": []}],
             "test": [{"file_name": "40001.png", "syms": ["Nodule"], "boxes": [[100, 200, 150, 260]]}]}  # fmt: skip
    for split, rows in items.items():
        (root / f"{split}.json").write_text(json.dumps(rows))
        for row in rows:
            Image.fromarray(np.zeros((16, 16), np.uint8)).save(
                root / f"{split}_data" / row["file_name"]
            )
    records, counts = load_chestx_det10(root, smoke())
    by_id = {r["study_id"]: r for r in records}
    assert counts["unmapped_Calcification"] == 1 and len(records) == 3
    first = by_id["det10-36199"]
    assert first["labels"]["Pleural Effusion"] == 1 and first["labels"]["Lung Lesion"] == 0
    assert first["images"][0]["path"].endswith("train_data/36199.png")
    assert by_id["det10-40001"]["split"] == "test"
    conv = build_conversation(
        "abnormality_detection", dict(first, images=[dict(first["images"][0], index=0)]), 0
    )
    assert (
        conv["turns"][0]["assistant"]
        == f"{format_box(to_relative([600, 700, 900, 950], (1024, 1024)))}."
    )


def test_covid19_radiography_masks_give_lung_boxes(tmp_path):
    from cxrlib.data.sources.masks import load_covid19_radiography

    root = tmp_path / "covid"
    mask = np.zeros((256, 256), np.uint8)
    mask[40:200, 30:110] = 255  # image-left part = the patient's right lung
    mask[50:210, 150:230] = 255
    for folder in ("COVID", "Normal", "Lung_Opacity", "Viral Pneumonia"):
        (root / folder / "images").mkdir(parents=True)
        (root / folder / "masks").mkdir()
        name = f"{folder.replace(' ', '_')}-1.png"
        Image.fromarray(np.zeros((299, 299), np.uint8)).save(root / folder / "images" / name)
        Image.fromarray(mask).save(root / folder / "masks" / name)
    records, counts = load_covid19_radiography(root, smoke())
    assert len(records) == 4 and not counts.get("images_without_two_lungs")
    organs = records[0]["images"][0]["organ_boxes"]
    scale = 299 / 256
    assert organs["right lung"] == pytest.approx(
        [30 * scale, 40 * scale, 110 * scale, 200 * scale], abs=0.01
    )
    assert organs["left lung"][0] > organs["right lung"][2]
    labels = {r["study_id"]: r["labels"] for r in records}
    assert (
        labels["covid-Normal-1"]["No Finding"] == 1
        and labels["covid-Lung_Opacity-1"]["Lung Opacity"] == 1
    )
    study = dict(records[0], images=[dict(records[0]["images"][0], index=0)])
    assert build_conversation("organ_grounding", study, 0) is not None
