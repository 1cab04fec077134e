"""What several test files share: a hand-written study record, one-thread torch, small images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrlib.constants import CHEXPERT_LABELS
from cxrlib.data.phantom import render


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
