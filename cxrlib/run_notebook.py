"""Run one notebook with papermill, the way ``make all`` does, and fail with one clear line.

    python -m cxrlib.run_notebook notebooks/01-data-prep.ipynb build/tiny/notebooks/01-data-prep.ipynb \
        --preset tiny --output-dir build/tiny --figure-dir figures

A failing cell (a missing stage artifact, missing weights, ...) ends with the notebook's own error
message on one line and the path of the executed copy to inspect, not papermill's traceback.

``--preset`` is a built-in name or the path of your own YAML file (``make all PRESET=my.yaml``;
relative to the current folder, passed to the notebook as an absolute path).
``--overrides "lora.r=16 train.phase2.steps=50"`` is passed to every notebook as its ``OVERRIDES``
parameter (``make all OVERRIDES="..."``). The kernel talks to papermill over IPC sockets (no
"running over TCP without encryption" warning per notebook), is not sent a SIGINT at
shutdown (no "KeyboardInterrupt caught in kernel" line) and progress bars are off
(``QUIET_ENV``), so the saved notebooks hold final numbers, not bars frozen at 0%.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

import yaml
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.paths import jupyter_runtime_dir

KERNEL = "m4cxr"
# Progress bars off in papermill runs: a saved notebook would show each bar as its first frame
# (0%). tqdm reads TQDM_DISABLE for bars that do not set `disable` themselves; Hugging Face's
# bars ("Loading weights") read HF_HUB_DISABLE_PROGRESS_BARS.
# CXRLIB_HEADLESS: no frontend will ever draw a widget (notebook 07 then renders its first study
# without an Output widget: that path hung papermill's client, under ipykernel 6 and 7 alike)
QUIET_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "CXRLIB_HEADLESS": "1"}
# tqdm's notebook bars ignore TQDM_DISABLE (they always pass `disable` on), so the kernel also
# runs this line before the first cell.
KERNEL_STARTUP = "import cxrlib.run_notebook as _rn; _rn.quiet_progress_bars()"


def quiet_progress_bars() -> None:
    """Make ``tqdm.auto.tqdm`` a disabled bar (in a papermill kernel, before ``cxrlib`` imports it).

    A bar that ran in a saved notebook shows only its first frame ("0%"), which reads as a hang.
    """
    import tqdm.auto
    import tqdm.std

    class QuietTqdm(tqdm.std.tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    tqdm.auto.tqdm = QuietTqdm


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


class IpcKernelManager(AsyncKernelManager):
    """A local kernel on IPC (Unix socket) transport instead of TCP, shut down without SIGINT.

    ipykernel warns once per start that TCP without CurveZMQ keys is unencrypted; papermill's
    kernel only ever talks to this process, so sockets in Jupyter's private runtime folder
    (``0700``) are the transport that warning recommends.

    Each manager gets its own socket prefix there: jupyter_client's default, ``kernel-ipc`` in
    the working directory (``notebooks/``), picks ``-1``..``-5`` by checking which files exist,
    so two runs started together in one checkout could bind the same sockets, and a killed run
    left its socket files in ``notebooks/``.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.transport = "ipc"
        runtime = Path(jupyter_runtime_dir())
        runtime.mkdir(parents=True, exist_ok=True)
        self.ip = str(runtime / f"cxrlib-kernel-{os.getpid()}-{uuid.uuid4().hex[:8]}")

    async def _async_interrupt_kernel(self) -> None:
        # jupyter_client sends SIGINT before every shutdown; after the last cell the kernel is idle
        # and a SIGINT arriving mid-message only makes it log "KeyboardInterrupt caught in kernel".
        if self.shutting_down:
            return
        await super()._async_interrupt_kernel()


def run(
    source: Path,
    target: Path,
    preset: str,
    output_dir: str,
    figure_dir: str,
    seed: int = 0,
    device: str = "auto",
    overrides: str = "",
    extra: dict | None = None,
) -> float:
    """Execute ``source`` into ``target`` with the given parameters; return seconds taken.

    ``extra``: more parameters of this notebook's ``parameters`` cell (e.g. ``{"FULL": 1}``).
    """
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    from cxrlib.config import PRESETS, is_preset_file

    if is_preset_file(preset):
        if not Path(preset).is_file():
            sys.exit(
                f"error: preset file '{preset}' does not exist (relative to {Path.cwd()}): "
                "create it, e.g. `cp cxrlib/presets/tiny.yaml my.yaml`, or use one of "
                f"{', '.join(PRESETS)}"
            )
        preset = str(Path(preset).resolve())  # the kernel runs in notebooks/: an absolute path
    elif preset not in PRESETS:
        sys.exit(
            f"error: unknown PRESET '{preset}': use one of {', '.join(PRESETS)} "
            "or the path of a YAML file that inherits one"
        )
    check_kernel()
    target.parent.mkdir(parents=True, exist_ok=True)
    # The kernel inherits the environment: no progress bars frozen in the saved outputs.
    saved_env = {k: os.environ.get(k) for k in QUIET_ENV}
    os.environ.update(QUIET_ENV)
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
                "OVERRIDES": overrides,
                **(extra or {}),
            },
            kernel_name=KERNEL,
            kernel_manager_class=IpcKernelManager,
            extra_arguments=[f"--IPKernelApp.exec_lines={KERNEL_STARTUP}"],
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
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--preset", default="tiny", help="smoke | tiny | paper | path/to/my.yaml")
    parser.add_argument("--output-dir", default="")
    parser.add_argument("--figure-dir", default="")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--overrides", default="", help='preset changes, e.g. "lora.r=16 train.phase2.steps=50"'
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another parameter of the notebook, e.g. FULL=1 (notebook 08; repeatable)",
    )
    args = parser.parse_args(argv)
    extra = {}
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            parser.error(f"--param takes NAME=VALUE, got {item!r}")
        extra[name] = yaml.safe_load(value)
    output_dir = str(Path(args.output_dir).resolve()) if args.output_dir else ""
    figure_dir = str(Path(args.figure_dir).resolve()) if args.figure_dir else ""
    seconds = run(
        args.source,
        args.target,
        args.preset,
        output_dir,
        figure_dir,
        args.seed,
        args.device,
        args.overrides,
        extra,
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
