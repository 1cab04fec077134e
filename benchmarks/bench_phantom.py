"""Benchmark: PhantomCXR rendering speed (images per second on one core).

    .venv/bin/python benchmarks/bench_phantom.py            # (144, 128) and (582, 518)
    .venv/bin/python benchmarks/bench_phantom.py --n 400 --sizes 72x64 144x128

Prints, per size and view, images/s for three finding loads: none, a typical study (0-3 random
findings, like an IU report) and a heavy one (6 findings with devices and a fracture). "wall" is
elapsed time; "cpu" is this process's CPU time, steadier when other jobs share the machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cxrlib.data.labels import Finding
from cxrlib.data.phantom import OBSERVATIONS, SEVERITIES, SIDES, render

HEAVY = [
    Finding("Pleural Effusion", side="bilateral", severity="moderate"),
    Finding("Cardiomegaly", severity="moderate"),
    Finding("Lung Opacity", side="left", zone="lower"),
    Finding("Support Devices", severity="severe"),
    Finding("Fracture", side="right", zone="middle"),
    Finding("Edema", side="bilateral"),
]


def typical_findings(rng: np.random.Generator) -> list[Finding]:
    """0-3 random findings (IU reports list few; about 40% of studies list none)."""
    count = rng.choice([0, 1, 2, 3], p=[0.4, 0.3, 0.2, 0.1])
    return [
        Finding(
            str(rng.choice(OBSERVATIONS)),
            side=str(rng.choice(SIDES)),
            severity=str(rng.choice(SEVERITIES)),
        )
        for _ in range(count)
    ]


def measure(size, view, loads, n):
    """Images/s (wall, cpu) for rendering ``n`` images with findings from ``loads(i)``."""
    render([], view, size)  # warm-up: grids are cached per size
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        render(loads(i), view, size, patient_seed=i, acquisition_seed=i)
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["144x128", "582x518"], help="HxW")
    parser.add_argument("--views", nargs="+", default=["PA", "LATERAL"])
    parser.add_argument("--n", type=int, default=200, help="images per measurement at 144x128")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    typical = [typical_findings(rng) for _ in range(1000)]
    loads = {
        "none": lambda i: [],
        "typical": lambda i: typical[i % len(typical)],
        "heavy": lambda i: HEAVY,
    }
    print(f"{'size':>9} {'view':>8} {'findings':>9} {'img/s wall':>11} {'img/s cpu':>10}")
    for text in args.sizes:
        h, w = (int(x) for x in text.lower().split("x"))
        n = max(10, int(args.n * 144 * 128 / (h * w)))  # about the same time per size
        for view in args.views:
            for name, load in loads.items():
                wall, cpu = measure((h, w), view, load, n)
                print(f"{text:>9} {view:>8} {name:>9} {wall:11.1f} {cpu:10.1f}")


if __name__ == "__main__":
    main()
