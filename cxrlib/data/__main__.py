"""Build a preset's data and print what it holds: ``python -m cxrlib.data``.

    python -m cxrlib.data --preset tiny --set data.source=mimic_cxr \\
        --set data.roots.mimic_cxr=/data/mimic-cxr-jpg --out build/tiny/data

Runs the same code as notebook 01 (``cxrlib.data.datasets.build_datasets``): the data roots are
checked first (``cxrlib.data.sources.check_data_roots``), then the records are built and saved in
``--out``. Prints, per source, studies and images per split, and per task the number of training
studies that can make a conversation of it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cxrlib.config import load_preset, parse_overrides
from cxrlib.data.datasets import build_datasets
from cxrlib.data.labels import SPLITS
from cxrlib.data.sources import SourceError, check_data_roots


def summary_table(stats: dict) -> str:
    """The per-source and per-task table of a build's ``stats`` (real sources or IU-Phantom)."""
    lines = [
        f"{'source':<14}" + "".join(f"{'studies ' + s:>15}{'images ' + s:>14}" for s in SPLITS)
    ]
    if "sources" in stats:  # real sources
        for name, st in stats["sources"].items():
            lines.append(f"{name:<14}" + "".join(f"{st['studies'][s]:>15}{st['images'][s]:>14}"
                                                  for s in SPLITS))  # fmt: skip
        tasks: dict[str, int] = {}
        for st in stats["sources"].values():
            for task, n in st["task_sizes"]["train"].items():
                tasks[task] = tasks.get(task, 0) + n
    else:  # IU-Phantom (DatasetInfo)
        for name, per_split in stats["split_sizes_by_source"].items():
            lines.append(f"{name:<14}" + "".join(f"{per_split[s]:>15}{'':>14}" for s in SPLITS))
        tasks = stats["task_sizes"]["train"]
    lines += ["", f"{'task':<26}{'train studies that can make it':>32}"]
    lines += [f"{task:<26}{n:>32}" for task, n in tasks.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Build a preset's datasets and print a summary.")
    parser.add_argument("--preset", default="tiny", help="smoke, tiny, paper or a preset YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a preset value, e.g. data.roots.mimic_cxr=/data/mimic")  # fmt: skip
    parser.add_argument("--out", required=True, help="folder to write the records into")
    args = parser.parse_args(argv)
    cfg = load_preset(args.preset, parse_overrides(args.set))
    try:
        check_data_roots(cfg)
    except SourceError as e:
        sys.exit(f"error: {e}")
    info = build_datasets(cfg, args.out)
    stats = info if isinstance(info, dict) else info.to_dict()
    print(summary_table(stats))
    if "adapter_counts" in stats:
        print("\nleft out by the adapters:", stats["adapter_counts"])
    return stats


if __name__ == "__main__":
    main()
