"""Is the `tiny` recipe robust? Phases 1 and 2 with several seeds, each scored on issue 14's targets.

Every seed trains phase 1 and phase 2 afresh (``python -m cxrlib.train --seed S``) from the data,
tokenizer and backbones of one finished run (``--from``, e.g. ``build/tiny`` after ``make all``),
into ``<out>/seed-S``, then scores it with ``benchmarks/recipe_eval.py``. The seed changes the
projector's initialisation, the LoRA initialisation, the data order and the sampled conversations;
the data split and the backbones stay those of ``--from`` (they are not part of the recipe's
phases). Not part of ``make all``: about 12-15 minutes per seed on 2 cores.

    python benchmarks/recipe_seeds.py --from build/tiny --seeds 0 1 2 [--out build/seeds]
    python benchmarks/recipe_seeds.py --from build/tiny --seeds 0 1 2 --reuse-from

``--reuse-from`` scores ``--from``'s own phases for the preset's seed instead of training them
again (the pipeline is deterministic: `make all`'s phases 1-2 are what seed 0 would train).

Prints one row per seed: CoT frontal mF1-14 (and whether its 95% interval lies above the
most-common-report baseline), turn-1 findings macro F1, malformed grounding share, organ /
finding / phrase grounding mIoU against their constant-box baselines, VQA exact match.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from cxrlib.config import load_preset

SHARED = ("data", "tokenizer", "backbones")  # what every seed starts from


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})


def seed_row(seed: int, res: dict) -> dict:
    g, base = res["grounding"], res.get("grounding_constant_box", {})

    def miou(task: str, table: dict) -> float | None:
        return table.get(task, {}).get("mIoU")

    return {
        "seed": seed,
        "CoT mF1-14": res["cot_frontal_mF1_14"],
        "CI low": res["cot_frontal_mF1_14_ci"][0],
        "most common": res.get("most_common_mF1_14"),
        "nearest nb.": res.get("nearest_neighbour_mF1_14"),
        "turn-1 F1": res["cot_findings_frontal"]["macro_f1"],
        "distinct": res["distinct_reports_frontal"],
        "malformed %": 100 * g["overall"]["malformed"] / max(1, g["overall"]["n"]),
        **{f"{t} mIoU (const)": f"{miou(t, g) or 0:.2f} ({miou(t, base) or 0:.2f})"
           for t in ("organ_grounding", "finding_grounding", "phrase_grounding")},
        "VQA %": 100 * (res["vqa_accuracy"] or 0),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--from", dest="source", default="build/tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="build/seeds")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument(
        "--reuse-from",
        action="store_true",
        help="score --from's phase1/phase2 as the preset's seed (no retraining)",
    )
    args = parser.parse_args()
    preset_seed = load_preset(args.preset)["seed"]
    source = Path(args.source).resolve()
    missing = [d for d in SHARED if not (source / d).exists()]
    if missing:
        sys.exit(f"{source} has no {', '.join(missing)}: run `make all` (or notebooks 01-02) first")
    rows = []
    for seed in args.seeds:
        if args.reuse_from and seed == preset_seed:
            if not (source / "phase2").exists():
                sys.exit(f"--reuse-from: {source} has no phase2/: run `make all` first")
            out, result = source, Path(args.out) / f"seed-{seed}-from-{source.name}.json"
            result.parent.mkdir(parents=True, exist_ok=True)
        else:
            out = Path(args.out) / f"seed-{seed}"
            out.mkdir(parents=True, exist_ok=True)
            for d in SHARED:
                link = out / d
                if not link.exists():
                    link.symlink_to(source / d)
            for stage in ("phase1", "phase2"):
                run([sys.executable, "-m", "cxrlib.train", "--stage", stage, "--preset",
                     args.preset, "--output-dir", str(out), "--seed", str(seed)])  # fmt: skip
            result = out / "recipe_eval.json"
        run([sys.executable, "benchmarks/recipe_eval.py", "--out", str(out), "--json", str(result)])
        rows.append(seed_row(seed, json.loads(result.read_text())))
    print(pd.DataFrame(rows).round(3).to_string(index=False))


if __name__ == "__main__":
    main()
