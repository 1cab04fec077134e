"""Small helpers every notebook uses: seeding, device choice, output folders, stage hand-off."""

from __future__ import annotations

import json
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


STAGE_SUMMARY_FILE = "summary.json"  # what cxrlib.train writes into every stage folder
STAGE_NOTEBOOKS = {"phase1": "03-projector-pretraining", "phase2": "04-instruction-tuning-lora"}


class MissingArtifactError(FileNotFoundError):
    """A stage's input does not exist yet; the message names the notebook that makes it."""


class IncompleteArtifactError(RuntimeError):
    """A stage folder holds a run that stopped before its planned steps (``--max-steps``)."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; otherwise the named device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (the project's default precision)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def output_dir(preset: str, root: str | Path | None = None) -> Path:
    """The folder a preset's artifacts go to: ``$CXR_OUTPUT_ROOT/<preset>`` or ``build/<preset>``."""
    root = Path(root or os.environ.get("CXR_OUTPUT_ROOT", REPO_ROOT / "build"))
    path = root / preset
    path.mkdir(parents=True, exist_ok=True)
    return path


def require_artifact(path: str | Path, made_by: str) -> Path:
    """Return ``path`` if it exists, else raise an error naming the notebook that makes it.

    Args:
        path: the file or folder a stage needs.
        made_by: the notebook that writes it, e.g. ``"03-projector-pretraining"``.
    """
    path = Path(path)
    if not path.exists():
        raise MissingArtifactError(
            f"{path} does not exist: run notebook {made_by} first "
            f"(`make all PRESET=<preset>`, or only that stage: "
            f"`make build/<preset>/notebooks/{made_by}.ipynb PRESET=<preset>`)."
        )
    return path


def check_stage_complete(directory: str | Path, allow_incomplete: bool = False) -> dict | None:
    """Refuse a stage folder whose training stopped before the planned steps.

    ``cxrlib.train`` writes ``summary.json`` with ``steps`` (done), ``total_steps`` (planned) and
    ``completed``; a run stopped with ``--max-steps`` still saves its weights, which would
    otherwise be used as if trained. Folders without a summary (hand-saved checkpoints) pass.
    ``cxrlib.model.load_trained`` calls it, so notebooks 05-07 and ``LocalBackend`` refuse an
    early-stopped phase 2.

    Returns:
        The summary, or None when the folder has none.

    Raises:
        IncompleteArtifactError: ``completed`` is false (a warning instead with
            ``allow_incomplete=True``).
    """
    path = Path(directory) / STAGE_SUMMARY_FILE
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    if summary.get("completed", True):
        return summary
    stage = summary.get("stage", Path(directory).name)
    config = Path(directory) / "config.json"
    preset = json.loads(config.read_text()).get("name") if config.is_file() else None
    notebook = STAGE_NOTEBOOKS.get(stage)
    rerun = f"re-run notebook {notebook}, or " if notebook else ""
    message = (
        f"{directory} holds an unfinished {stage} run: {summary.get('steps')} of "
        f"{summary.get('total_steps')} planned steps (stopped early with --max-steps or "
        f"interrupted). Finish it ({rerun}`python -m cxrlib.train --stage {stage} --preset "
        f"{preset or '<preset>'}`; it resumes from the last checkpoint), or pass allow_incomplete=True to use "
        "the partly trained weights anyway."
    )
    if not allow_incomplete:
        raise IncompleteArtifactError(message)
    warnings.warn(message, stacklevel=2)
    return summary


def save_metrics(metrics: dict[str, Any], path: str | Path) -> Path:
    """Store a notebook's metrics as JSON (tests and later notebooks read them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, default=_to_builtin))
    return path


def load_metrics(path: str | Path) -> dict[str, Any]:
    """A metrics file that ``save_metrics`` wrote (an earlier notebook's numbers)."""
    return json.loads(Path(path).read_text())


def _to_builtin(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray | torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in a metrics file")
