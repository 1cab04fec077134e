"""Training speed per stage: a few steps of each, then the time the full preset would take.

    python benchmarks/bench_train.py --data-dir build/tiny/data            # tiny, 5 steps/stage
    python benchmarks/bench_train.py --data-dir /tmp/d --steps 3 --set train.phase2.micro_batch=4

Runs every stage of ``cxrlib.train.run_stage`` in a temporary output folder that links the given
``data/`` (built by notebook 01 for the same preset), ``max_steps`` steps each, and prints seconds
per step, samples/s, the fixed cost of the stage (data, feature cache, validation) and the
extrapolated seconds of the full stage with the preset's step counts. The first step is left out
of the per-step time (warm-up). The machine is shared: run it twice and look at the spread.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from cxrlib.config import load_preset, parse_overrides
from cxrlib.engine import read_metrics
from cxrlib.phases import stage_dir
from cxrlib.train import STAGES, run_stage
from cxrlib.utils import seed_everything


def bench(preset: str, data_dir: Path, steps: int, overrides: list[str], device: str) -> list[dict]:
    cfg = load_preset(preset, parse_overrides(overrides))
    out = Path(tempfile.mkdtemp(prefix="bench_train_"))
    (out / "data").symlink_to(data_dir.resolve(), target_is_directory=True)
    rows = []
    try:
        for stage in STAGES:
            seed_everything(cfg["seed"])
            t0 = time.perf_counter()
            summary = run_stage(stage, cfg, out, resume=False, max_steps=steps, device=device)
            wall = time.perf_counter() - t0
            row = {"stage": stage, "wall_s": wall}
            log = read_metrics(stage_dir(stage, out))
            if log:
                per_step = [b["elapsed"] - a["elapsed"] for a, b in zip(log, log[1:])]
                s_step = float(np.median(per_step)) if per_step else log[0]["elapsed"]
                total = cfg["train"][stage]["steps"]
                batch = cfg["train"][stage].get("global_batch") or cfg["train"][stage]["batch_size"]
                fixed = wall - log[-1]["elapsed"]
                row.update(
                    s_per_step=s_step,
                    samples_per_s=batch / s_step,
                    fixed_s=fixed,
                    steps=total,
                    full_stage_s=fixed + total * s_step,
                    peak_memory_gb=summary.get("peak_memory_gb"),
                )
            else:
                row.update(full_stage_s=wall)
            rows.append(row)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--data-dir", type=Path, required=True, help="data/ of notebook 01")
    parser.add_argument("--steps", type=int, default=5, help="steps measured per stage")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = bench(args.preset, args.data_dir, args.steps, args.set, args.device)
    print(f"\n{args.preset}, {args.steps} steps per stage, device {args.device}")
    print(f"{'stage':<18}{'s/step':>8}{'samples/s':>11}{'fixed s':>9}{'steps':>7}{'full s':>9}")
    for r in rows:
        if "s_per_step" in r:
            print(
                f"{r['stage']:<18}{r['s_per_step']:>8.3f}{r['samples_per_s']:>11.1f}"
                f"{r['fixed_s']:>9.1f}{r['steps']:>7}{r['full_stage_s']:>9.0f}"
            )
        else:
            print(
                f"{r['stage']:<18}{'':>8}{'':>11}{r['wall_s']:>9.1f}{'':>7}{r['full_stage_s']:>9.0f}"
            )
    total = sum(r["full_stage_s"] for r in rows)
    peak = max((r.get("peak_memory_gb") or 0) for r in rows)
    print(f"extrapolated training total: {total / 60:.1f} min; peak memory {peak:.2f} GB")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
