"""Building, saving, loading and serving a (very small) preset's datasets."""

import json
from collections import Counter

import numpy as np
import pytest

from cxrlib.config import load_preset
from cxrlib.constants import IGNORE_INDEX, SYSTEM_TEXT
from cxrlib.data.datasets import (
    ConversationDataset,
    build_datasets,
    load_datasets,
    reconcile_findings,
)
from cxrlib.data.labels import Finding
from cxrlib.data.phantom import render
from cxrlib.tokenizer import image_token_id, train_bpe_tokenizer
from cxrlib.utils import MissingArtifactError

SMALL = {"data": {"max_studies": 24, "longitudinal_patients": 10, "render_size": [40, 36]}}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = load_preset("smoke", SMALL)
    out = tmp_path_factory.mktemp("data")
    info = build_datasets(cfg, out, workers=1)
    return cfg, out, info, load_datasets(out)


@pytest.fixture(scope="module")
def tok(built):
    data = built[3]
    return train_bpe_tokenizer([s["findings_text"] for s in data.studies] + [SYSTEM_TEXT] * 3, 400)


def test_sizes_and_files(built):
    cfg, out, info, data = built
    for name in ("images.npy", "studies.jsonl", "splits.json", "config.json", "stats.json"):
        assert (out / name).exists()
    assert info.studies_per_source == {"iu": 24, "longitudinal": 10}
    # IU: frontal + lateral per study; longitudinal: 2 prior + 2 current
    assert info.num_images == 24 * 2 + 10 * 4 == len(data.images)
    assert data.images.dtype == np.uint8 and data.images.shape[1:] == (40, 36)
    assert sum(info.split_sizes.values()) == 34
    assert info.split_sizes_by_source["longitudinal"] == {"train": 8, "val": 1, "test": 1}
    assert json.loads((out / "stats.json").read_text())["num_images"] == info.num_images
    assert data.cfg["data"]["max_studies"] == 24


def test_records_follow_the_schema(built):
    data = built[3]
    for s in data.studies:
        assert s["split"] == data.splits[s["study_id"]]
        assert s["findings_text"] and len(s["labels"]) == 14
        views = [im["view"] for im in s["images"]]
        assert views[-1] == "LATERAL" and views[0] in ("PA", "AP")
        for im in s["images"]:
            assert im["hw"] == [40, 36]
            for fb in im["finding_boxes"]:
                assert fb["finding"] in s["findings"]  # boxes of this study's own findings
        if s["source"] == "longitudinal":
            assert s["prior"]["images"] and s["changes"]
            assert s["study_id"].endswith("-current")
        else:
            assert s["prior"] is None and s["patient_id"] == s["study_id"]


def test_images_are_rendered_from_the_studys_findings(built):
    cfg, _, _, data = built
    from cxrlib.data.datasets import _seed

    s = next(s for s in data.studies if s["source"] == "iu" and s["findings"])
    findings = [Finding.from_dict(f) for f in s["findings"]]
    im = s["images"][0]
    again = render(
        findings,
        im["view"],
        (40, 36),
        _seed(cfg["seed"], s["study_id"]),
        _seed(cfg["seed"], s["study_id"], 0),
    )
    assert np.array_equal(again.image, data.images[im["index"]])


def test_iu_splits_do_not_depend_on_the_cap(tmp_path, built):
    data = built[3]
    cfg = load_preset(
        "smoke", {"data": {"max_studies": 8, "longitudinal_patients": 0, "render_size": [32, 32]}}
    )
    build_datasets(cfg, tmp_path, workers=1)
    small = load_datasets(tmp_path)
    assert {s["source"] for s in small.studies} == {"iu"}
    common = set(small.splits) & set(data.splits)
    assert all(small.splits[k] == data.splits[k] for k in common)


def test_missing_and_corrupt_artifacts(tmp_path, built):
    with pytest.raises(MissingArtifactError, match="01-data-prep"):
        load_datasets(tmp_path)
    out = built[1]
    for name in ("studies.jsonl", "splits.json", "config.json", "stats.json"):
        (tmp_path / name).write_text((out / name).read_text())
    np.save(tmp_path / "images.npy", np.zeros((3, 40, 36), np.uint8))
    with pytest.raises(ValueError, match="interrupted"):
        load_datasets(tmp_path)


def test_bad_config(tmp_path):
    cfg = load_preset("smoke")
    cfg["data"]["max_studies"] = 0
    with pytest.raises(ValueError, match="max_studies"):
        build_datasets(cfg, tmp_path)


@pytest.mark.filterwarnings("ignore:conversation of task")  # smoke's 384 tokens cut a few
def test_conversation_dataset_items(built, tok):
    cfg, _, _, data = built
    ds = ConversationDataset(data.studies, data.images, tok, cfg, split="train", seed=1)
    assert len(ds) == cfg["data"]["samples_per_study"] * len(data.split("train"))
    ids_of = {s["study_id"]: s for s in data.studies}
    for i in range(len(ds)):
        item = ds[i]
        assert ids_of[item["meta"]["study_id"]]["split"] == "train"
        assert [im.dtype for im in item["images"]] == [np.uint8] * len(item["image_indices"])
        n_img = item["input_ids"].count(image_token_id(tok))
        assert n_img == cfg["projector"]["num_queries"] * len(item["image_indices"])
        assert any(lab != IGNORE_INDEX for lab in item["labels"]) or item["truncated"]
    again = ConversationDataset(data.studies, data.images, tok, cfg, split="train", seed=1)
    assert again[5]["input_ids"] == ds[5]["input_ids"]
    batch = ds.collate([ds[0], ds[1]])
    assert batch["input_ids"].shape[0] == 2 and len(batch["images"]) == sum(
        len(ds[i]["image_indices"]) for i in (0, 1)
    )


def test_task_lists_and_shares(built):
    cfg, _, _, data = built
    ds = ConversationDataset(
        data.studies, data.images, None, cfg, tasks=["report_only"], split="val"
    )
    assert len(ds) == len(data.split("val"))
    assert {ds[i]["task"] for i in range(len(ds))} == {"report_only"}
    ds = ConversationDataset(data.studies, data.images, None, cfg, split="train", length=600)
    counts = Counter(ds[i]["task"] for i in range(600))
    report = sum(counts[t] for t in ("cot_single", "cot_multi_image", "cot_multi_study"))
    assert report / 600 == pytest.approx(0.54, abs=0.07)
    with pytest.raises(ValueError, match="unknown split"):
        ConversationDataset(data.studies, data.images, None, cfg, split="dev")


def test_abnormal_repeats_balances_the_report_pools(built):
    from cxrlib.data.conversations import NOT_FOUND, cot_answer

    cfg, _, _, data = built
    plain = ConversationDataset(data.studies, data.images, None, cfg, tasks=["cot_single"])
    balanced = ConversationDataset(
        data.studies, data.images, None, cfg, tasks=["cot_single"], abnormal_repeats=3
    )

    def abnormal_share(ds):
        pool = ds.pools["cot_single"]
        return sum(cot_answer(ds.studies[i]["labels"]) != NOT_FOUND for i in pool) / len(pool)

    p, q = abnormal_share(plain), abnormal_share(balanced)
    assert 0 < p < 1 and q == pytest.approx(3 * p / (3 * p + 1 - p))
    assert balanced.pools["cot_single"].count(0) in (1, 3)  # a study appears once or 3 times
    with pytest.raises(ValueError, match="abnormal_repeats"):
        ConversationDataset(data.studies, data.images, None, cfg, abnormal_repeats=0)


def test_boxed_repeats_balances_the_finding_box_pools(built):
    from cxrlib.data.conversations import has_finding_box

    cfg, _, _, data = built
    tasks = ["finding_grounding", "cot_single"]
    plain = ConversationDataset(data.studies, data.images, None, cfg, tasks=tasks)
    balanced = ConversationDataset(
        data.studies, data.images, None, cfg, tasks=tasks, boxed_repeats=4
    )

    def boxed_share(ds, task):
        pool = ds.pools[task]
        return sum(has_finding_box(ds.studies[i]) for i in pool) / len(pool)

    p, q = boxed_share(plain, "finding_grounding"), boxed_share(balanced, "finding_grounding")
    assert 0 < p < 1 and q == pytest.approx(4 * p / (4 * p + 1 - p))
    assert balanced.pools["cot_single"] == plain.pools["cot_single"]  # report pools untouched
    with pytest.raises(ValueError, match="boxed_repeats"):
        ConversationDataset(data.studies, data.images, None, cfg, boxed_repeats=0)


def test_rare_finding_power_weights_only_the_abnormal_report_pools(built):
    cfg, _, _, data = built
    tasks = ["cot_single", "multi_label"]
    plain = ConversationDataset(data.studies, data.images, None, cfg, tasks=tasks)
    balanced = ConversationDataset(
        data.studies, data.images, None, cfg, tasks=tasks, rare_finding_power=1.0
    )
    assert len(balanced.pools["cot_single"]) > len(plain.pools["cot_single"])
    assert balanced.pools["multi_label"] == plain.pools["multi_label"]
    with pytest.raises(ValueError, match="rare_finding_power"):
        ConversationDataset(data.studies, data.images, None, cfg, rare_finding_power=-1)


def test_reconcile_keeps_what_the_findings_text_states():
    mesh = [Finding("Pleural Effusion", side="left"), Finding("Atelectasis"), Finding("Edema")]
    text = "Small left pleural effusion. Possible atelectasis. No pneumothorax."
    findings, labels, counts = reconcile_findings(mesh, text)
    assert findings == [Finding("Pleural Effusion", side="left"), Finding("Atelectasis", status=-1)]
    assert counts == {"kept": 1, "uncertain": 1, "dropped": 1}  # edema: not in the text
    assert labels["Pleural Effusion"] == 1 and labels["Atelectasis"] == -1
    assert labels["Edema"] is None and labels["Pneumothorax"] == 0  # stated negative
    assert labels["No Finding"] is None
