"""The first cell every notebook runs after its ``parameters`` cell, and small notebook helpers.

``run = setup(PRESET, SEED, DEVICE, OUTPUT_DIR, FIGURE_DIR, OVERRIDES)`` resolves the preset (with
the ``OVERRIDES`` experiments applied) and gives ``run.cfg``, ``run.out``, ``run.figures`` and
``run.device``. ``run.check(name, passed)`` records a mechanism cell's check; the notebook stores
``run.checks`` with its metrics, so a test can assert that every check ran and held.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cxrlib.config import load_preset, parse_overrides
from cxrlib.plotting import FIGURE_DIR
from cxrlib.utils import REPO_ROOT, output_dir, resolve_device, seed_everything

# Each notebook's run time under `tiny` on the 2-core development machine, copied from the
# `build/tiny/notebooks/timings.json` that `make all` writes (refresh it after a full run).
TIMINGS_FILE = REPO_ROOT / "notebooks" / "timings.json"


class MechanismCheckError(AssertionError):
    """A notebook's hand-written mechanism disagrees with the library call it re-derives."""


@dataclass
class Run:
    """What a notebook needs: the resolved preset and where to read and write."""

    cfg: dict
    out: Path  # artifacts of this preset (data/, phase1/, metrics/, ...)
    figures: Path  # where savefig writes
    device: torch.device
    overrides: dict = field(default_factory=dict)  # what OVERRIDES changed in the preset
    checks: dict = field(default_factory=dict)  # mechanism cell -> True once its check held

    def check(self, name: str, passed: bool, detail: str = "") -> None:
        """Record that the mechanism cell ``name`` agrees with ``cxrlib``; raise if it does not."""
        self.checks[name] = bool(passed)
        if not passed:
            raise MechanismCheckError(f"mechanism check '{name}' failed {detail}".strip())
        print(f"check '{name}': the hand-written version equals the cxrlib call")


def read_overrides(text: str | list[str] | None) -> dict:
    """``"train.phase1.steps=10 lora.r=16"`` -> nested dict, parsed like ``--set`` of ``cxrlib.train``."""
    if not text:
        return {}
    items = shlex.split(text) if isinstance(text, str) else list(text)
    return parse_overrides(items)


def setup(
    preset: str,
    seed: int = 0,
    device: str = "auto",
    out_dir: str = "",
    figure_dir: str = "",
    overrides: str = "",
) -> Run:
    """Resolve the preset, seed everything, create the output folders.

    Args:
        preset: ``smoke``, ``tiny``, ``paper`` or the path of a YAML file inheriting one.
        seed: global seed (overrides the preset's).
        device: ``auto`` (cuda if present, else cpu), ``cpu`` or ``cuda[:N]``.
        out_dir: artifact folder; empty = ``build/<name>`` (the preset's ``name``).
        figure_dir: figure folder; empty = the repository's ``figures/``.
        overrides: space-separated ``key.path=value`` pairs (YAML values), e.g.
            ``"lora.r=16 train.phase2.steps=50"``; unknown keys are an error naming the known ones.
    """
    changes = read_overrides(overrides)
    cfg = load_preset(preset, overrides=changes)
    cfg["seed"] = seed
    seed_everything(seed)
    out = Path(out_dir) if out_dir else output_dir(cfg["name"])
    out.mkdir(parents=True, exist_ok=True)
    figures = Path(figure_dir) if figure_dir else FIGURE_DIR
    figures.mkdir(parents=True, exist_ok=True)
    if changes:
        print(f"preset '{preset}' with overrides {json.dumps(changes)}")
    return Run(cfg=cfg, out=out, figures=figures, device=resolve_device(device), overrides=changes)


def runtime_line(notebook: str, path: Path = TIMINGS_FILE) -> str:
    """``"runtime: about 3 min on 2 cores (tiny preset, measured)"`` from the timings file."""
    timings = json.loads(path.read_text()) if path.exists() else {}
    if notebook not in timings:
        return f"runtime: not measured yet (no entry for {notebook} in {path.name})"
    seconds = timings[notebook]
    amount = f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
    return f"runtime: about {amount} on 2 cores without a GPU (tiny preset, last measured run)"


def rounded(value, digits: int = 4):
    """``value`` with every float rounded (for displaying summaries without 17-digit noise)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(rounded(v, digits) for v in value)
    return value
