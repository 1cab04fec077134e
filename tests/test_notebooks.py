"""Notebooks: committed clean, parameterised, and runnable end to end under the `smoke` preset.

The smoke runs execute every notebook in order (each reads what the previous one wrote) into one
temporary output folder, then assert on the metrics each notebook stored.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from cxrlib import run_notebook
from cxrlib.config import load_preset
from cxrlib.constants import CHEXPERT_LABELS
from cxrlib.data.mixture import GROUP_SHARES
from cxrlib.utils import REPO_ROOT

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]-*.ipynb"))
NAMES = [p.stem for p in NOTEBOOKS]
PARAMETERS = ("PRESET", "SEED", "DEVICE", "OUTPUT_DIR", "FIGURE_DIR")


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def test_there_are_notebooks():
    assert NAMES and NAMES[0] == "00-overview"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_committed_without_outputs(path):
    for cell in _read(path).cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} has outputs committed"
            assert cell.execution_count is None, f"{path.name} has execution counts"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_follows_the_template(path):
    nb = _read(path)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    for name in PARAMETERS:
        assert f"{name}:" in tagged[0].source, f"{path.name}: parameters cell lacks {name}"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "## Summary" in markdown and "## Exercises" in markdown
    assert nb.metadata["kernelspec"]["name"] == run_notebook.KERNEL


# --- smoke runs ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smoke_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("smoke")


_status: dict[str, str] = {}


def _execute_upto(name: str, root: Path) -> None:
    """Run every notebook up to ``name`` once per session, in order."""
    for path in NOTEBOOKS:
        stem = path.stem
        if stem not in _status:
            if any(v != "ok" for v in _status.values()):
                _status[stem] = "skipped: an earlier notebook failed"
            else:
                try:
                    run_notebook.run(
                        path,
                        root / "notebooks" / path.name,
                        preset="smoke",
                        output_dir=str(root),
                        figure_dir=str(root / "figures"),
                    )
                    _status[stem] = "ok"
                except SystemExit as err:  # run() reports failures as one line
                    _status[stem] = str(err)
        if stem == name:
            return


def _metrics(root: Path, name: str) -> dict:
    path = root / "metrics" / f"{name}.json"
    assert path.exists(), f"{name} stored no metrics at {path}"
    return json.loads(path.read_text())


def _data_prep_ok(m: dict) -> bool:
    """Notebook 01 built what the smoke preset asks for, and its counts agree with each other."""
    data = load_preset("smoke")["data"]
    sources = {"iu": data["max_studies"], "longitudinal": data["longitudinal_patients"]}
    shares = m["mixture_paper_group_shares"]
    return (
        m["studies_per_source"] == sources
        and m["num_studies"] == sum(sources.values()) == sum(m["split_sizes"].values())
        and m["num_images"] >= m["num_studies"]
        and 0 < m["task_sizes_train"]["cot_single"] <= m["split_sizes"]["train"]
        and set(m["label_prevalence"]) == set(CHEXPERT_LABELS)
        and all(0 <= p <= 1 for p in m["label_prevalence"].values())
        and all(abs(shares[g] - GROUP_SHARES[g] / 100) < 0.01 for g in GROUP_SHARES)
        and 0 <= m["truncated_fraction"] <= 1
        and m["token_length_median"] <= m["token_length_max"]
    )


# What each notebook must have measured; a notebook without an entry must still store metrics.
CHECKS = {
    "00-overview": lambda m: m["tokens_per_image"] == 4 and m["patches_per_image"] == 16,
    "01-data-prep": _data_prep_ok,
    "02-backbones": lambda m: {"tokenizer", "lm_pretrain", "encoder_pretrain"} <= set(m),
    "03-projector-pretraining": lambda m: m["steps"] == 4 and m["trainable_parameters"] > 0,
    "04-instruction-tuning-lora": lambda m: (
        m["steps"] == 4 and 0 < m["trainable_parameters"] < m["total_parameters"]
    ),
    "05-cot-inference": lambda m: m["test_studies"] > 0 and len(m["reports"]) == 4,
    "06-evaluation": lambda m: (
        bool(m["labeler"])
        and "mF1-14" in m["reports"]["CoT, single image, frontal"]["clinical"]
        and all(r["degenerate"]["n"] == r["n"] for r in m["reports"].values())
    ),
    "07-explorer": lambda m: m["studies"] > 0 and 0 <= m["exact_label_agreement"] <= 1,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_runs_under_smoke_and_stores_metrics(name, smoke_dir):
    _execute_upto(name, smoke_dir)
    assert _status[name] == "ok", _status[name]
    metrics = _metrics(smoke_dir, name)
    assert metrics, f"{name} stored an empty metrics file"
    check = CHECKS.get(name)
    if check:
        assert check(metrics), f"{name} metrics failed their check: {metrics}"
    assert any((smoke_dir / "figures").glob(f"{name[:2]}-*.png")), f"{name} wrote no figure"
