"""Every notebook under `smoke` on a MIMIC-CXR-JPG-shaped tree (``data.source=mimic_cxr``).

One small tree (tests/mimic_tree.py: 40 studies of real JPGs, the release's file and column
names) and one run of the notebooks in order, shared by the tests below; each asserts on what a
notebook stored against what the tree holds.
"""

from __future__ import annotations

import json
from collections import Counter

import nbformat
import pytest
from conftest import SmokeRuns
from mimic_tree import write_mimic_tree

from cxrlib.config import load_preset
from cxrlib.labeler import RULE_BASED_NAME

# a notebook run that stops answering (papermill waiting on a kernel gone idle, seen in 07's widget
# cell under ipykernel 7) fails the module instead of hanging the suite; the 8 notebooks took just
# over 600 s in a clean-clone CI run (2 cores), hence the margin
pytestmark = pytest.mark.timeout(1800)
SMOKE = load_preset("smoke")
MAX_IMAGES = SMOKE["data"]["max_images_per_study"]
NOTEBOOKS = [p.stem for p in SmokeRuns(None).notebooks]


@pytest.fixture(scope="module")
def mimic_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimic-cxr-jpg")
    tree = write_mimic_tree(root, studies=40)
    runs = SmokeRuns(
        tmp_path_factory.mktemp("mimic_smoke"),
        overrides=f"data.source=mimic_cxr data.roots.mimic_cxr={root}",
    )
    runs.upto(NOTEBOOKS[-1])
    return runs, tree


def _metrics(runs, name: str) -> dict:
    return json.loads((runs.root / "metrics" / f"{name}.json").read_text())


def _outputs(runs, name: str) -> str:
    nb = nbformat.read(runs.root / "notebooks" / f"{name}.ipynb", as_version=4)
    return "\n".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_on_mimic(name, mimic_runs):
    runs, _ = mimic_runs
    assert runs.status[name] == "ok", runs.status[name]
    assert (runs.root / "metrics" / f"{name}.json").exists()


@pytest.mark.slow
def test_data_prep_counts_match_the_tree(mimic_runs):
    runs, tree = mimic_runs
    kept = [s for s in tree["per_study"] if s["findings"]]
    m = _metrics(runs, "01-data-prep")
    assert m["data_source"] == "mimic_cxr" and m["studies_per_source"] == {"mimic_cxr": len(kept)}
    splits = Counter(s["split"].replace("validate", "val") for s in kept)
    assert m["split_sizes"] == {k: splits[k] for k in ("train", "val", "test")}
    assert m["num_images"] == sum(min(MAX_IMAGES, s["images"]) for s in kept)
    per_subject = Counter(s["subject"] for s in kept)
    assert m["studies_with_prior"] == sum(n - 1 for n in per_subject.values()) > 0
    counts = m["adapter_counts"]["mimic_cxr"]
    assert counts["dropped_no_findings"] == len(tree["per_study"]) - len(kept)
    assert m["task_sizes_train"]["cot_multi_study"] > 0
    # MIMIC-CXR-JPG alone: the release's mixture has only its three report-generation sets
    assert m["mixture_paper_group_shares"]["report"] == 1.0
    shown = _outputs(runs, "01-data-prep")
    assert "skipped: data.source=mimic_cxr (sections 1-3 describe IU-Phantom)" in shown
    assert "has a finding box" in shown  # the box cell says why it has nothing to draw
    figures = {p.stem for p in (runs.root / "figures").glob("01-*.png")}
    assert {"01-frontal-lateral", "01-longitudinal"} <= figures
    assert "01-phantom-gallery" not in figures  # nothing rendered on a real source


@pytest.mark.slow
def test_evaluation_names_source_scorers_and_skipped_box_tasks(mimic_runs):
    runs, tree = mimic_runs
    test_studies = sum(s["findings"] and s["split"] == "test" for s in tree["per_study"])
    m05 = _metrics(runs, "05-cot-inference")
    assert m05["data_source"] == "mimic_cxr"
    assert m05["test_studies"] == min(test_studies, SMOKE["eval"]["max_test_studies"])
    assert m05["grounding"] == {}  # MIMIC-CXR-JPG alone has no boxes: no box task is asked
    assert set(m05["skipped_tasks"]) == {"finding_grounding", "multi_finding_grounding"}
    assert all("no test image has a finding box" in r for r in m05["skipped_tasks"].values())
    m06 = _metrics(runs, "06-evaluation")
    assert m06["data_source"] == "mimic_cxr" and m06["skipped_tasks"] == m05["skipped_tasks"]
    assert m06["scorers"]["clinical_f1"]["scorer"] == RULE_BASED_NAME
    assert "cxrlib" in m06["scorers"]["clinical_f1"]["version"]
    assert "RadGraph F1 not computed" in m06["scorers"]["radgraph_f1"]["note"]
    assert "CoT, multi-study, frontal" in m06["reports"]
    for name in ("04-instruction-tuning-lora", "05-cot-inference", "07-explorer"):
        assert "parse_findings" in _metrics(runs, name)["scorers"]["turn1_findings_f1"]
