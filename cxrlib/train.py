"""Train one stage of a preset: the command line and the registry of stages.

    python -m cxrlib.train --stage phase1 --preset tiny [--output-dir build/tiny]
        [--set train.phase1.steps=10] [--no-resume] [--max-steps 5]
    accelerate launch -m cxrlib.train --stage phase2 --preset paper
    torchrun --nproc_per_node 2 -m cxrlib.train --stage phase2 --preset smoke --device cpu

Notebooks 02-04 call the same ``run_stage``. The stages are in ``cxrlib.phases``, the training
loop they share in ``cxrlib.engine``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate.state import PartialState

from cxrlib import phases
from cxrlib.config import PRESETS, ConfigError, load_preset, parse_overrides
from cxrlib.utils import output_dir, seed_everything

STAGE_FUNCTIONS = {
    "tokenizer": phases.tokenizer_stage,
    "lm_pretrain": phases.lm_pretrain_stage,
    "encoder_pretrain": phases.encoder_pretrain_stage,
    "phase1": phases.phase1_stage,
    "phase2": phases.phase2_stage,
}
STAGES = tuple(STAGE_FUNCTIONS)  # in the order they run


def run_stage(
    stage: str,
    cfg: dict,
    out_dir: str | Path,
    resume: bool = True,
    max_steps: int | None = None,
    device: str | torch.device = "auto",
) -> dict:
    """Run one training stage of a preset and return its summary.

    Args:
        stage: ``tokenizer``, ``lm_pretrain``, ``encoder_pretrain``, ``phase1`` or ``phase2``.
        cfg: the resolved preset (``load_preset`` / ``run.cfg``).
        out_dir: the preset's output folder (``run.out``), holding ``data/`` from notebook 01.
        resume: continue from the stage's newest checkpoint (a finished stage returns at once).
        max_steps: stop early after this many steps (tests, benchmarks); the schedule is the preset's.
        device: ``auto`` | ``cpu`` | ``cuda``.

    Returns:
        The stage's summary dict (also saved as ``<stage dir>/summary.json``).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage '{stage}': choose one of {', '.join(STAGES)}")
    runner = STAGE_FUNCTIONS[stage]
    return runner(cfg, Path(out_dir), resume=resume, max_steps=max_steps, device=device)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Train one stage of a cxrlib preset.")
    parser.add_argument("--stage", required=True, choices=[*STAGES, "all"])
    parser.add_argument(
        "--preset",
        default="tiny",
        help=f"{', '.join(PRESETS)}, or a YAML file that inherits one (e.g. a copy of tiny.yaml)",
    )
    parser.add_argument("--output-dir", default="", help="default: build/<preset>")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a preset value, e.g. train.phase1.steps=10 (repeatable)",
    )
    parser.add_argument("--seed", type=int, default=None, help="default: the preset's seed")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--no-resume", action="store_true", help="start the stage afresh")
    parser.add_argument(
        "--max-steps", type=int, default=None, help="stop early (the schedule stays)"
    )
    args = parser.parse_args(argv)

    try:
        cfg = load_preset(args.preset, parse_overrides(args.set))
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    if args.seed is not None:
        cfg["seed"] = args.seed
    seed_everything(cfg["seed"])  # what cxrlib.notebook.setup does, so CLI == notebook
    out = Path(args.output_dir) if args.output_dir else output_dir(cfg["name"])
    summary = {}
    for stage in STAGES if args.stage == "all" else [args.stage]:
        summary = run_stage(stage, cfg, out, not args.no_resume, args.max_steps, args.device)
        shown = {k: v for k, v in summary.items() if not isinstance(v, dict | list)}
        if PartialState().is_main_process:  # one line per stage, not one per process
            print(f"{stage}: {json.dumps(shown)}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
