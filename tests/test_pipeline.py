"""The commands of the README: make targets, the notebook runner's one-line errors."""

from __future__ import annotations

import nbformat
import pytest
from conftest import run_make

from cxrlib import run_notebook
from cxrlib.utils import REPO_ROOT


def test_make_help_lists_the_targets():
    result = run_make("help")
    assert result.returncode == 0
    for target in ("all", "smoke", "test", "lab", "lint", "clean", "help"):
        assert f"make {target} " in result.stdout


def test_wrong_preset_stops_with_one_line():
    result = run_make("all", "PRESET=huge")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown PRESET 'huge'" in lines[0]


def test_make_all_knows_every_notebook():
    result = run_make("-n", "all", "PRESET=smoke", "BUILD=/tmp/cxr-dry-run")
    assert result.returncode == 0, result.stderr
    for path in sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]-*.ipynb")):
        assert f"/tmp/cxr-dry-run/notebooks/{path.name}" in result.stdout


def test_missing_kernel_is_one_line():
    with pytest.raises(SystemExit, match="kernel 'no-such-kernel' is not installed"):
        run_notebook.check_kernel("no-such-kernel")


def test_unknown_preset_in_runner(tmp_path):
    with pytest.raises(SystemExit, match="unknown PRESET 'huge'"):
        run_notebook.run(tmp_path / "x.ipynb", tmp_path / "y.ipynb", "huge", "", "")


def test_missing_artifact_is_one_line_naming_the_notebook(tmp_path):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('PRESET = "tiny"\nOUTPUT_DIR = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [
        params,
        nbformat.v4.new_code_cell(
            "from pathlib import Path\n"
            "from cxrlib.utils import require_artifact\n"
            "require_artifact(Path(OUTPUT_DIR) / 'phase1', made_by='03-projector-pretraining')"
        ),
    ]
    nb.metadata["kernelspec"] = {
        "name": run_notebook.KERNEL,
        "display_name": "m4cxr",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    source = tmp_path / "needs-phase1.ipynb"
    nbformat.write(nb, source)
    target = tmp_path / "out" / "needs-phase1.ipynb"
    with pytest.raises(SystemExit) as err:
        run_notebook.run(source, target, "smoke", str(tmp_path), str(tmp_path / "fig"))
    message = str(err.value)
    assert "\n" not in message
    assert "MissingArtifactError" in message and "run notebook 03-projector-pretraining" in message
    assert not target.exists(), "a failed run must not leave a target that make takes as done"
    assert target.with_suffix(".failed.ipynb").exists()
