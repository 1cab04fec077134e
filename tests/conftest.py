"""What several test files share: a hand-written study record, one-thread torch, small images,
smoke artifacts (trained stages, the notebooks run in order)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from cxrlib.constants import CHEXPERT_LABELS
from cxrlib.data.phantom import render
from cxrlib.utils import REPO_ROOT


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (worker threads spin-wait on a busy CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def phantom_image(seed: int = 0, hw: tuple[int, int] = (72, 64)) -> np.ndarray:
    """A PhantomCXR render without findings: inference refuses pure noise as not a radiograph."""
    return render([], "PA", hw, patient_seed=seed, acquisition_seed=seed).image


def example_study(with_prior: bool = True) -> dict:
    """A small hand-written study record (frontal + lateral, two positive findings with boxes, an
    uncertain one, a prior study and its changes)."""
    effusion = {
        "observation": "Pleural Effusion",
        "side": "left",
        "zone": "lower",
        "severity": "moderate",
        "status": 1,
    }
    cardiomegaly = {
        "observation": "Cardiomegaly",
        "side": None,
        "zone": None,
        "severity": "mild",
        "status": 1,
    }
    atelectasis = {
        "observation": "Atelectasis",
        "side": "right",
        "zone": "lower",
        "severity": None,
        "status": -1,
    }
    organs = {
        "left lung": [66, 20, 118, 120],
        "right lung": [10, 20, 62, 120],
        "heart": [40, 70, 100, 115],
    }
    labels = {name: None for name in CHEXPERT_LABELS}
    labels.update(
        {
            "No Finding": 0,
            "Pleural Effusion": 1,
            "Cardiomegaly": 1,
            "Atelectasis": -1,
            "Pneumothorax": 0,
        }
    )
    study = {
        "study_id": "EX1",
        "patient_id": "P1",
        "split": "train",
        "source": "longitudinal",
        "findings_text": "The heart is mildly enlarged. There is a moderate left pleural effusion. "
        "Possible right basilar atelectasis. No pneumothorax.",
        "impression": "Cardiomegaly and left pleural effusion.",
        "labels": labels,
        "findings": [effusion, cardiomegaly, atelectasis],
        "images": [
            {
                "index": 0,
                "view": "PA",
                "hw": [144, 128],
                "organ_boxes": organs,
                "finding_boxes": [
                    {"finding": effusion, "box": [70, 95, 120, 135]},
                    {"finding": cardiomegaly, "box": [35, 65, 105, 118]},
                    {"finding": atelectasis, "box": [12, 95, 55, 120]},
                ],
            },
            {
                "index": 1,
                "view": "LATERAL",
                "hw": [144, 128],
                "organ_boxes": {},
                "finding_boxes": [{"finding": effusion, "box": [20, 100, 110, 136]}],
            },
        ],
        "prior": None,
        "changes": None,
    }
    if with_prior:
        prior_labels = {name: None for name in CHEXPERT_LABELS}
        prior_labels.update({"No Finding": 0, "Cardiomegaly": 1})
        study["prior"] = {
            "study_id": "EX0",
            "findings_text": "The heart is mildly enlarged. Lungs are clear.",
            "findings": [cardiomegaly],
            "labels": prior_labels,
            "images": [
                {
                    "index": 2,
                    "view": "PA",
                    "hw": [144, 128],
                    "organ_boxes": organs,
                    "finding_boxes": [{"finding": cardiomegaly, "box": [35, 65, 105, 118]}],
                },
                {
                    "index": 3,
                    "view": "LATERAL",
                    "hw": [144, 128],
                    "organ_boxes": {},
                    "finding_boxes": [],
                },
            ],
        }
        study["changes"] = {"Pleural Effusion": "new", "Cardiomegaly": "unchanged"}
    return study


# --- a smoke output folder with data and backbones (2 steps each), shared by the training tests ---
FAST = {"train": {k: {"steps": 2} for k in ("lm_pretrain", "encoder_pretrain", "phase1", "phase2")}}


def smoke_cfg() -> dict:
    """The smoke preset with 2 steps per stage."""
    from cxrlib.config import load_preset

    return load_preset("smoke", FAST)


@pytest.fixture(scope="session")
def smoke_out(tmp_path_factory):
    """``data``, ``tokenizer`` and ``backbones`` of the smoke preset, built once per session."""
    from cxrlib.data.datasets import build_datasets
    from cxrlib.train import run_stage
    from cxrlib.utils import seed_everything

    out = tmp_path_factory.mktemp("smoke_train")
    cfg = smoke_cfg()
    build_datasets(cfg, out / "data", workers=1)
    for stage in ("tokenizer", "lm_pretrain", "encoder_pretrain"):
        seed_everything(cfg["seed"])
        run_stage(stage, cfg, out, device="cpu")
    return out


# --- the notebooks run in order under `smoke`, shared by the notebook and the browser tests ---
class SmokeRuns:
    """Every notebook run under ``smoke`` into one folder (each reads what the previous wrote).

    ``overrides`` is passed to every notebook (``make all OVERRIDES=...``). ``upto(name)`` runs,
    in order, the notebooks up to ``name`` that have not run yet in this
    session, so whichever test asks first pays and the others reuse the artifacts. ``status[stem]``
    is ``"ok"`` or the runner's one-line error; ``stderr[stem]`` is what that notebook's kernel
    wrote to stderr (kept per notebook, since the asking test may not be the notebook's own).
    """

    def __init__(self, root, overrides: str = ""):
        from cxrlib.utils import REPO_ROOT

        self.root = root
        self.overrides = overrides  # e.g. "data.source=mimic_cxr data.roots.mimic_cxr=DIR"
        self.notebooks = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]-*.ipynb"))
        self.status: dict[str, str] = {}
        self.stderr: dict[str, str] = {}

    def upto(self, name: str) -> None:
        from cxrlib import run_notebook

        for path in self.notebooks:
            stem = path.stem
            if stem not in self.status:
                if any(v != "ok" for v in self.status.values()):
                    self.status[stem] = "skipped: an earlier notebook failed"
                else:
                    with _kernel_stderr() as noise:
                        try:
                            run_notebook.run(
                                path,
                                self.root / "notebooks" / path.name,
                                preset="smoke",
                                output_dir=str(self.root),
                                figure_dir=str(self.root / "figures"),
                                overrides=self.overrides,
                            )
                            self.status[stem] = "ok"
                        except SystemExit as err:  # run() reports failures as one line
                            self.status[stem] = str(err)
                    self.stderr[stem] = noise[0]
            if stem == name:
                return
        raise KeyError(f"no notebook {name!r}; known: {[p.stem for p in self.notebooks]}")


@contextmanager
def _kernel_stderr():
    """Collect what subprocesses (the kernels) write to file descriptor 2, then pass it on."""
    sink: list[str] = []
    sys.stderr.flush()
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield sink
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            sink.append(tmp.read().decode(errors="replace"))
            sys.stderr.write(sink[0])  # still shown (or captured by pytest) as before


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory):
    """The session's ``SmokeRuns``; ``smoke_runs.upto("05-cot-inference")`` gives a trained smoke
    model and its predictions under ``smoke_runs.root``."""
    return SmokeRuns(tmp_path_factory.mktemp("smoke"))


def copy_inputs(src, dst, names=("data", "tokenizer", "backbones")):
    """Copy a smoke folder's artifacts (without checkpoints) so a test can train on its own."""
    import shutil

    for name in names:
        shutil.copytree(src / name, dst / name, ignore=shutil.ignore_patterns("checkpoints"))
    return dst


def dicom_bytes(
    pixels: np.ndarray, photometric: str = "MONOCHROME2", slope: float = 1.0, intercept: float = 0.0
) -> bytes:
    """A one-frame 12-bit DICOM file (secondary capture, view PA) holding ``pixels``."""
    import io

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.ViewPosition = "PA"
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def run_make(*args) -> subprocess.CompletedProcess:
    """``make ARGS`` in the repository root, output captured (the Makefile tests)."""
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
