"""Run one notebook with papermill, the way ``make all`` does, and fail with one clear line.

    python -m cxrlib.run_notebook notebooks/01-data-prep.ipynb build/tiny/notebooks/01-data-prep.ipynb \
        --preset tiny --output-dir build/tiny --figure-dir figures

A failing cell (a missing stage artifact, missing weights, ...) ends with the notebook's own error
message on one line and the path of the executed copy to inspect, not papermill's traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

KERNEL = "m4cxr"


def check_kernel(name: str = KERNEL) -> None:
    """Exit with a one-line fix when the project's Jupyter kernel is not installed."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        sys.exit(
            f"error: Jupyter kernel '{name}' is not installed; run `make install` (or "
            f"`python -m ipykernel install --sys-prefix --name {name}` inside the project's venv)."
        )


def run(
    source: Path,
    target: Path,
    preset: str,
    output_dir: str,
    figure_dir: str,
    seed: int = 0,
    device: str = "auto",
) -> float:
    """Execute ``source`` into ``target`` with the given parameters; return seconds taken."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    from cxrlib.config import PRESETS, is_preset_file

    if preset not in PRESETS and not (is_preset_file(preset) and Path(preset).is_file()):
        sys.exit(
            f"error: unknown PRESET '{preset}': use one of {', '.join(PRESETS)} "
            "or the path of a YAML file that inherits one"
        )
    if preset not in PRESETS:  # the kernel runs in notebooks/: pass the file's absolute path
        preset = str(Path(preset).resolve())
    check_kernel()
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        pm.execute_notebook(
            str(source),
            str(target),
            parameters={
                "PRESET": preset,
                "SEED": seed,
                "DEVICE": device,
                "OUTPUT_DIR": output_dir,
                "FIGURE_DIR": figure_dir,
            },
            kernel_name=KERNEL,
            cwd=str(source.parent),
            progress_bar=False,
        )
    except PapermillExecutionError as err:
        # Keep the half-run notebook for inspection but out of make's way (it would look up to date).
        failed = target.with_suffix(".failed.ipynb")
        if target.exists():
            target.replace(failed)
        sys.exit(
            f"error: {source.name} failed in cell {err.exec_count}: {err.ename}: {err.evalue} "
            f"(executed copy: {failed})"
        )
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--output-dir", default="")
    parser.add_argument("--figure-dir", default="")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    output_dir = str(Path(args.output_dir).resolve()) if args.output_dir else ""
    figure_dir = str(Path(args.figure_dir).resolve()) if args.figure_dir else ""
    seconds = run(
        args.source, args.target, args.preset, output_dir, figure_dir, args.seed, args.device
    )
    print(f"{args.source.name}: {seconds:.0f} s ({args.preset})")
    record_timing(args.target.parent / "timings.json", args.source.stem, seconds)


def record_timing(path: Path, notebook: str, seconds: float) -> None:
    """Keep each notebook's last run time (the README's notebook map quotes these)."""
    import json

    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[notebook] = round(seconds, 1)
    path.write_text(json.dumps(dict(sorted(timings.items())), indent=2))


if __name__ == "__main__":
    main()
