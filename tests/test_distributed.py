"""Two CPU processes (torchrun, gloo) train as one run: one process group, each process its own
shard of every global batch, one metrics stream, the same weights as one process accumulating the
same global batch, and an interrupted run resumes to the same result.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import copy_inputs, smoke_cfg
from safetensors.torch import load_file

from cxrlib.engine import read_metrics
from cxrlib.train import run_stage

STEPS = 3
# LoRA dropout off: with it, the two runs would draw different masks (one RNG per process).
SETTINGS = ["--set", "lora.dropout=0", "--set", f"train.phase2.steps={STEPS}"]


@pytest.fixture(scope="module")
def phase1_out(smoke_out, tmp_path_factory):
    out = copy_inputs(smoke_out, tmp_path_factory.mktemp("dist_inputs"))
    run_stage("phase1", smoke_cfg(), out, device="cpu")
    return out


def _phase2(src, dst, processes: int, *extra: str):
    """Phase 2 of the smoke preset in ``processes`` processes, from ``src``'s phase 1."""
    if not (dst / "phase1").exists():
        copy_inputs(src, dst, ("data", "tokenizer", "backbones", "phase1"))
    launcher = [sys.executable, "-m", "cxrlib.train"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={processes}", "-m", "cxrlib.train"]  # fmt: skip
    args = ["--stage", "phase2", "--preset", "smoke", "--device", "cpu", "--output-dir", str(dst)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*launcher, *args, *SETTINGS, *extra], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _weights(out):
    return load_file(str(out / "phase2" / "trained.safetensors"))


@pytest.mark.slow
def test_two_processes_train_as_one_run(phase1_out, tmp_path):
    two = tmp_path / "two"
    done = _phase2(phase1_out, two, 2)
    log = read_metrics(two / "phase2")
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))  # one line per step, not two
    global_batch = smoke_cfg()["train"]["phase2"]["global_batch"]
    assert all(r["samples_per_process"] == [global_batch // 2] * 2 for r in log)
    assert done.stderr.count("phase2: {") == 1  # one summary line, from the main process

    one = tmp_path / "one"
    _phase2(phase1_out, one, 1)  # the same global batch, accumulated in one process
    one_log = read_metrics(one / "phase2")
    assert all(r["samples_per_process"] == [global_batch] for r in one_log)
    torch.testing.assert_close([r["loss"] for r in log], [r["loss"] for r in one_log])
    a, b = _weights(two), _weights(one)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=name)

    # An interrupted two-process run, resumed with two processes, ends where the whole run did.
    part = tmp_path / "part"
    _phase2(phase1_out, part, 2, "--max-steps", "1")
    assert [r["step"] for r in read_metrics(part / "phase2")] == [1]
    _phase2(phase1_out, part, 2)
    assert [r["step"] for r in read_metrics(part / "phase2")] == list(range(1, STEPS + 1))
    c = _weights(part)
    for name in a:
        torch.testing.assert_close(a[name], c[name], atol=1e-6, rtol=1e-5, msg=name)
