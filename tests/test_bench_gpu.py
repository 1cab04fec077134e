"""benchmarks/bench_gpu.py runs on CPU with the scaled-down (smoke) architecture and prints its
table: every phase x shape x checkpointing row, counted FLOPs, and the CoT generation line."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_prints_its_table_on_cpu(capsys):
    bench = load_bench()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bench.main(["--preset", "smoke", "--device", "cpu", "--steps", "1", "--warmup", "0"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "device CPU" in out and "MFU not shown" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("phase1 ", "phase2 "))]
    shapes = len(bench.PHASE1_SHAPES) + len(bench.PHASE2_SHAPES)
    assert len(rows) == 2 * shapes  # checkpointing off and on
    assert sum(" on " in " ".join(r) for r in rows) == shapes
    for line in out.splitlines():
        if line.startswith(("phase1 ", "phase2 ")):
            numbers = re.findall(r"\s(\d+\.\d+)\s", line)
            step_s, samples_s, gflop = float(numbers[0]), float(numbers[1]), float(numbers[2])
            assert step_s > 0 and samples_s > 0 and gflop > 0, line
    gen = re.search(
        r"CoT generation, batch 4, .*: (\d+) tokens in ([\d.]+) s = (\d+) tokens/s", out
    )
    assert gen and int(gen.group(1)) > 0, out


def test_peak_table_matches_gpu_names():
    bench = load_bench()
    lookup = {
        "NVIDIA H200": 989.4,
        "NVIDIA H100 80GB HBM3": 989.4,
        "NVIDIA H100 PCIe": 756.0,
        "NVIDIA A100-SXM4-80GB": 312.0,
        "NVIDIA GH200 480GB": 989.4,
    }
    for name, tflops in lookup.items():
        assert bench.bf16_peak(name) == tflops, name
    assert bench.bf16_peak("NVIDIA Quadro K1200") is None


def test_cpu_attention_is_counted():
    """PyTorch's CPU attention kernel is missing from the flop counter's table (it counts 0);
    the benchmark's mapping counts it with the formulas the counter uses for the CUDA kernels."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    bench = load_bench()
    shape = (1, 2, 16, 8)
    counted = {}
    for name, mapping in (("plain", {}), ("bench", bench.CPU_ATTENTION_FLOPS)):
        q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
        counter = bench.FlopCounterMode(display=False, custom_mapping=mapping)
        with counter:
            torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
        counted[name] = counter.get_total_flops()
    expected = sdpa_flop_count(shape, shape, shape) + sdpa_backward_flop_count(
        shape, shape, shape, shape
    )
    assert counted == {"plain": 0, "bench": expected} and expected > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_gpu_on_cuda_prints_mfu_and_memory(capsys):
    """The bf16 path (weights built on the GPU, autocast, peak memory, MFU when the GPU is in the
    table), with the small architecture so that it takes seconds."""
    bench = load_bench()
    bench.main(["--preset", "smoke", "--device", "cuda", "--steps", "1", "--warmup", "1"])
    out = capsys.readouterr().out
    assert "weights bfloat16" in out
    rows = [line for line in out.splitlines() if line.startswith(("phase1 ", "phase2 "))]
    assert len(rows) == 2 * (len(bench.PHASE1_SHAPES) + len(bench.PHASE2_SHAPES))
    assert all(float(r.split()[-1]) > 0 for r in rows)  # peak GPU memory, GiB
    peak = bench.bf16_peak(torch.cuda.get_device_name())
    assert all(("%" in r) == (peak is not None) for r in rows)
