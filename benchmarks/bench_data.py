"""Benchmark: how long notebook 01 takes to build each preset's datasets.

    .venv/bin/python benchmarks/bench_data.py                     # smoke and tiny
    .venv/bin/python benchmarks/bench_data.py --presets smoke --workers 1

Prints, per preset: studies, images, build seconds (parse, longitudinal, render, save, stats),
rendering images/s, and how fast ConversationDataset serves un-tokenized items.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from cxrlib.config import load_preset
from cxrlib.data.datasets import ConversationDataset, build_datasets, load_datasets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["smoke", "tiny"])
    parser.add_argument("--workers", type=int, default=None, help="render processes")
    args = parser.parse_args()
    print(f"{'preset':8} {'studies':>8} {'images':>7} {'build s':>8} {'render s':>9} "
          f"{'img/s':>7} {'items/s':>8}  phases")  # fmt: skip
    for preset in args.presets:
        cfg = load_preset(preset)
        with tempfile.TemporaryDirectory() as tmp:
            info = build_datasets(cfg, tmp, workers=args.workers)
            data = load_datasets(tmp)
            t = time.perf_counter()
            ds = ConversationDataset(data.studies, data.images, None, cfg, split="train")
            n = min(len(ds), 2000)
            for i in range(n):
                ds[i]
            items_per_s = n / (time.perf_counter() - t)
        print(f"{preset:8} {info.num_studies:8d} {info.num_images:7d} {info.build_seconds:8.1f} "
              f"{info.render_seconds:9.1f} {info.images_per_second:7.1f} {items_per_s:8.0f}  "
              f"{info.phases}")  # fmt: skip


if __name__ == "__main__":
    main()
