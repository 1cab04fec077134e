"""The first cell every notebook runs after its ``parameters`` cell.

``run = setup(PRESET, SEED, DEVICE, OUTPUT_DIR, FIGURE_DIR)`` resolves the preset and gives
``run.cfg``, ``run.out``, ``run.figures`` and ``run.device``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cxrlib.config import load_preset
from cxrlib.plotting import FIGURE_DIR
from cxrlib.utils import output_dir, resolve_device, seed_everything


@dataclass
class Run:
    """What a notebook needs: the resolved preset and where to read and write."""

    cfg: dict
    out: Path  # artifacts of this preset (data/, phase1/, metrics/, ...)
    figures: Path  # where savefig writes
    device: torch.device


def setup(
    preset: str, seed: int = 0, device: str = "auto", out_dir: str = "", figure_dir: str = ""
) -> Run:
    """Resolve the preset, seed everything, create the output folders.

    Args:
        preset: ``smoke``, ``tiny``, ``paper`` or the path of a YAML file inheriting one.
        seed: global seed (overrides the preset's).
        device: ``auto`` (cuda if present, else cpu), ``cpu`` or ``cuda[:N]``.
        out_dir: artifact folder; empty = ``build/<name>`` (the preset's ``name``).
        figure_dir: figure folder; empty = the repository's ``figures/``.
    """
    cfg = load_preset(preset)
    cfg["seed"] = seed
    seed_everything(seed)
    out = Path(out_dir) if out_dir else output_dir(cfg["name"])
    out.mkdir(parents=True, exist_ok=True)
    figures = Path(figure_dir) if figure_dir else FIGURE_DIR
    figures.mkdir(parents=True, exist_ok=True)
    return Run(cfg=cfg, out=out, figures=figures, device=resolve_device(device))
