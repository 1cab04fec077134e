"""`make all PRESET=path/to/my.yaml`: a user's preset file through make and the notebook runner."""

from __future__ import annotations

import os
import time

import pytest
from conftest import run_make

from cxrlib import run_notebook
from cxrlib.utils import REPO_ROOT

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]-*.ipynb"))


@pytest.fixture
def my_preset(tmp_path):
    path = tmp_path / "my_run.yaml"
    path.write_text("inherits: smoke\ntrain:\n  phase2: {steps: 3}\n")
    return path


def test_make_runs_every_notebook_with_the_file_into_build_of_its_name(my_preset):
    result = run_make("-n", "all", f"PRESET={my_preset}")
    assert result.returncode == 0, result.stderr
    runs = [line for line in result.stdout.splitlines() if "cxrlib.run_notebook" in line]
    assert len(runs) == len(NOTEBOOKS)
    for line, path in zip(runs, NOTEBOOKS):
        assert f"--preset {my_preset} " in line
        assert line.endswith(f" build/my_run/notebooks/{path.name}"), line
        assert "--output-dir build/my_run " in line


def test_build_can_still_be_chosen(my_preset, tmp_path):
    result = run_make("-n", "all", f"PRESET={my_preset}", f"BUILD={tmp_path}/elsewhere")
    assert result.returncode == 0, result.stderr
    assert f"{tmp_path}/elsewhere/notebooks/00-overview.ipynb" in result.stdout
    assert "build/my_run" not in result.stdout


def test_editing_the_file_reruns_the_notebooks(my_preset, tmp_path):
    """The notebook rule depends on the YAML file: up to date until the file changes."""
    build, venv = tmp_path / "b", tmp_path / "venv"
    venv.mkdir()
    stamp = venv / ".installed"  # `make install` done (newer than pyproject.toml)
    executed = [build / "notebooks" / p.name for p in NOTEBOOKS]
    executed[0].parent.mkdir(parents=True)
    now = time.time()
    for path, when in [(my_preset, now), (stamp, now + 10)] + [(p, now + 20) for p in executed]:
        path.touch()
        os.utime(path, (when, when))
    args = ("-n", "all", f"PRESET={my_preset}", f"BUILD={build}", f"VENV={venv}")
    result = run_make(*args)
    assert result.returncode == 0, result.stderr
    assert "cxrlib.run_notebook" not in result.stdout, "nothing changed, yet notebooks would run"
    os.utime(my_preset, (now + 30, now + 30))
    result = run_make(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("cxrlib.run_notebook") == len(NOTEBOOKS)


def test_a_missing_file_stops_with_one_line(tmp_path):
    missing = tmp_path / "nope.yaml"
    result = run_make("-n", "all", f"PRESET={missing}")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert f"preset file '{missing}' does not exist" in lines[0]
    assert "cp cxrlib/presets/tiny.yaml" in lines[0]


def test_a_name_that_is_no_preset_names_the_file_route():
    result = run_make("-n", "all", "PRESET=huge")
    assert result.returncode != 0 and "PRESET=path/to/my.yaml" in result.stderr


def test_the_runner_passes_the_file_as_an_absolute_path(tmp_path, monkeypatch):
    import papermill

    with pytest.raises(SystemExit, match=r"preset file 'nope\.yaml' does not exist"):
        run_notebook.run(tmp_path / "x.ipynb", tmp_path / "y.ipynb", "nope.yaml", "", "")
    seen = {}
    monkeypatch.setattr(run_notebook, "check_kernel", lambda: None)
    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **kw: seen.update(kw))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("inherits: smoke\n")
    run_notebook.run(tmp_path / "x.ipynb", tmp_path / "out" / "y.ipynb", "mine.yaml", "", "")
    # the kernel runs in the notebook's folder: a relative path would not resolve there
    assert seen["parameters"]["PRESET"] == str(tmp_path / "mine.yaml")


def test_overrides_reach_every_notebook(tmp_path):
    """`make all OVERRIDES="data.source=mimic_cxr data.roots.mimic_cxr=DIR"` (README, the paper's
    datasets): each notebook run gets the same --overrides, which setup() reads as the preset."""
    from cxrlib.notebook import read_overrides

    overrides = f"data.source=mimic_cxr data.roots.mimic_cxr={tmp_path}/mimic-cxr-jpg/2.1.0"
    result = run_make("-n", "all", "BUILD=build/tiny-mimic", f"OVERRIDES={overrides}")
    assert result.returncode == 0, result.stderr
    runs = [line for line in result.stdout.splitlines() if "cxrlib.run_notebook" in line]
    assert len(runs) == len(NOTEBOOKS)
    assert all(f'--overrides "{overrides}"' in line for line in runs)
    assert read_overrides(overrides) == {
        "data": {"source": "mimic_cxr", "roots": {"mimic_cxr": f"{tmp_path}/mimic-cxr-jpg/2.1.0"}}
    }
