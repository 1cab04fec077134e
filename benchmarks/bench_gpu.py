"""The paper-scale training and generation speed of M4CXR on one GPU (random weights, no download).

    python benchmarks/bench_gpu.py                        # paper architecture, bf16, on CUDA
    python benchmarks/bench_gpu.py --preset smoke --device cpu --steps 1   # CPU check, seconds

Builds the ``paper`` preset's architecture (Rad-DINO-sized encoder, C-Abstractor, Mistral-7B-sized
LLM with LoRA) from its config with random weights directly on the device, then times:

* phase-1 and phase-2 training steps (forward, backward, clipping, AdamW) at the card's micro-batch
  sizes (2 and 1 per GPU) and sequence lengths, with and without gradient checkpointing;
* chain-of-thought generation: a batch of single-image studies, turn 1 then turn 2 continued from
  the turn-1 KV cache, greedy, up to the preset's ``inference.max_new_tokens``.

Precision is what cxrlib trains with: on CUDA the model is bf16 with the trainable parts (LoRA,
projector, encoder) in fp32 under bf16 autocast; on CPU everything is fp32.

Model FLOPs per step are counted by ``torch.utils.flop_counter`` on one step without gradient
checkpointing (matmuls, convolutions, attention; causal attention is counted in full, as the
counter does; recomputation is not model FLOPs). MFU = model FLOPs per second / the GPU's dense
bf16 peak from ``BF16_PEAK_TFLOPS`` (or ``--peak-tflops``). Sequence lengths: image tokens
(361 per image in ``paper``) plus the median text length of the IU X-ray conversations measured
with Mistral's tokenizer (``tests/test_mistral_tokenizer.py`` builds the same conversations).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import resource
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from cxrlib.config import load_preset
from cxrlib.constants import BOS_TOKEN, EOS_TOKEN, IGNORE_INDEX, IMAGE_TOKEN
from cxrlib.model import add_lora, build_model, count_parameters, set_trainable
from cxrlib.utils import resolve_device

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s; the first name
# found in torch.cuda.get_device_name() wins, so the more specific names come first.
BF16_PEAK_TFLOPS = {
    "GH200": 989.4,
    "H200": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,  # SXM
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
}

# Text tokens (images excluded) of the card's conversations: medians over the IU reports with
# Mistral's tokenizer (report_only 87, cot_single 201, cot_multi_image 202, multi-study with 5 + 5
# images 292; the turn-1 CoT prompt 118, the turn-2 question ~25).
PHASE1_SHAPES = [("report only, 1 image", 1, 87)]
PHASE2_SHAPES = [
    ("CoT single image", 1, 201),
    ("CoT multi-image, 2", 2, 202),
    ("CoT multi-study, 5+5", 10, 292),
]
COT_PROMPT_TEXT, COT_TURN2_TEXT, COT_TURN1_NEW = 118, 25, 16


def _cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward(grad_shape, query_shape, key_shape, value_shape, *args, **kwargs):
    return sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


# PyTorch's CPU attention kernel is not in the counter's table; it computes what the CUDA ones
# do, so it gets the counter's own attention formulas.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


class RandomWeightsVocabulary:
    """What ``build_model`` reads from a tokenizer (``TokenIds``), for a random-weight build:
    Mistral's ``<unk>``=0, ``<s>``=1, ``</s>``=2 and ``<image>`` right after the vocabulary. A
    real tokenizer is not needed to time random weights."""

    unk_token_id, bos_token_id, eos_token_id, pad_token_id = 0, 1, 2, 0

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size + 1

    def convert_tokens_to_ids(self, token: str) -> int:
        return {IMAGE_TOKEN: self.vocab_size, BOS_TOKEN: 1, EOS_TOKEN: 2}.get(token, 0)


@dataclass
class Row:
    phase: str
    shape: str
    micro_batch: int
    seq_len: int
    checkpointing: bool
    step_s: float = float("nan")
    flops: float = float("nan")
    peak_gib: float = float("nan")
    note: str = ""


def bf16_peak(gpu_name: str) -> float | None:
    """The dense bf16 peak (TFLOP/s) of a GPU named like ``torch.cuda.get_device_name()``."""
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in gpu_name), None)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    return bf16_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


@contextlib.contextmanager
def default_dtype_and_device(dtype: torch.dtype, device: torch.device):
    """Create parameters directly on the device in the target dtype (no fp32 copy of 7B on CPU)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(before)


def build(cfg: dict, device: torch.device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vocab = RandomWeightsVocabulary(cfg["llm"]["vocab_size"])
    torch.manual_seed(0)
    with default_dtype_and_device(dtype, device):
        model = build_model(cfg, vocab, device=device, dtype=dtype, load_pretrained=False)
    return model, dtype


def set_checkpointing(model, on: bool) -> None:
    for part in (model.encoder, model.llm):
        if on:
            part.activation_checkpointing_enable({"use_reentrant": False})
        else:
            part.activation_checkpointing_disable()


def fp32_trainable(model) -> None:
    """Trainable weights in fp32 as cxrlib's training keeps them (AdamW updates of ~1e-4
    relative size vanish in bf16); frozen ones stay bf16."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def make_batch(model, micro_batch: int, images: int, text: int, device: torch.device):
    m = model.num_image_tokens
    length = min(images * m + text, model.max_length)
    text = length - images * m
    vocab = model.image_token_id  # ids below <image>; >= 10 avoids the special ids
    ids = torch.randint(10, vocab, (micro_batch, length), device=device)
    start = min(40, text)  # images after the system text, as in the card's prompts
    ids[:, start : start + images * m] = model.image_token_id
    labels = ids.clone()
    labels[:, : length - max(1, text // 2)] = IGNORE_INDEX  # loss on the answer only
    labels[labels == model.image_token_id] = IGNORE_INDEX
    s = model.image_size
    pixel_values = torch.randn(micro_batch * images, 3, s, s, device=device)
    return ids, torch.ones_like(ids), pixel_values, labels


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_row(model, row: Row, images: int, text: int, parts, steps, warmup, device) -> Row:
    set_trainable(model, parts)
    fp32_trainable(model)
    set_checkpointing(model, row.checkpointing)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    batch = make_batch(model, row.micro_batch, images, text, device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )

    def step(count_flops: bool = False) -> float:
        counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
        with counter if count_flops else contextlib.nullcontext():
            with autocast:
                loss = model(*batch[:3], labels=batch[3]).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return counter.get_total_flops() if count_flops else float("nan")

    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if not row.checkpointing:  # model FLOPs: without the recomputation
            row.flops = step(count_flops=True)
        for _ in range(warmup):
            step()
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        row.step_s = (time.perf_counter() - start) / steps
        if device.type == "cuda":
            row.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    except torch.OutOfMemoryError:
        row.note = "out of memory"
    finally:
        opt.state.clear()  # free the AdamW state before the next row
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":  # (a full gc takes ~1 s with transformers loaded: GPU only)
            gc.collect()
            torch.cuda.empty_cache()
    model.eval()
    return row


def cot_generation(model, batch_size: int, max_new_tokens: int, device) -> tuple[int, float]:
    """Turn 1 (image + CoT question) then turn 2 from the turn-1 cache; (new tokens, seconds)."""
    set_checkpointing(model, False)
    ids, mask, pixel_values, _ = make_batch(model, batch_size, 1, COT_PROMPT_TEXT, device)
    turn2 = torch.randint(10, model.image_token_id, (batch_size, COT_TURN2_TEXT), device=device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    with autocast:
        model.generate(ids[:, :8], mask[:, :8], max_new_tokens=2)  # warm-up
        sync(device)
        start = time.perf_counter()
        first = model.generate(ids, mask, pixel_values, max_new_tokens=COT_TURN1_NEW)
        second = model.generate(
            turn2, torch.ones_like(turn2), max_new_tokens=max_new_tokens, past=first
        )
        sync(device)
    elapsed = time.perf_counter() - start
    # random weights may emit </s> early: count the tokens really generated
    new = sum(len(t) for t in first.token_lists()) + sum(len(t) for t in second.token_lists())
    return new, elapsed


def fmt(x: float, spec: str) -> str:
    return "-" if x != x else format(x, spec)  # NaN -> "-"


def print_table(rows: list[Row], peak: float | None) -> None:
    head = (
        f"{'phase':<7} {'shape':<22} {'mb':>2} {'seq':>5} {'ckpt':>4} {'step s':>8} "
        f"{'samples/s':>9} {'tokens/s':>9} {'GFLOP/step':>12} {'MFU':>6} {'peak GiB':>8}"
    )
    print(head)
    print("-" * len(head))
    flops_of = {(r.phase, r.shape): r.flops for r in rows if not r.checkpointing}
    for r in rows:
        flops = flops_of.get((r.phase, r.shape), float("nan"))
        sps = r.micro_batch / r.step_s
        mfu = flops / r.step_s / (peak * 1e12) if peak else float("nan")
        print(
            f"{r.phase:<7} {r.shape:<22} {r.micro_batch:>2} {r.seq_len:>5} "
            f"{'on' if r.checkpointing else 'off':>4} {fmt(r.step_s, '8.3f')} "
            f"{fmt(sps, '9.2f')} {fmt(sps * r.seq_len, '9.0f')} {fmt(flops / 1e9, '12.2f')} "
            f"{fmt(mfu * 100, '5.1f') + ('%' if mfu == mfu else ''):>6} "
            f"{fmt(r.peak_gib, '8.1f')} {r.note}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", help="architecture (smoke = scaled down)")
    parser.add_argument("--device", default="auto", help="auto (cuda if any), cuda or cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--gen-batch", type=int, default=None, help="default inference.batch_size")
    parser.add_argument("--gen-tokens", type=int, default=None, help="default max_new_tokens")
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU bf16 peak override")
    parser.add_argument("--no-checkpointing-rows", action="store_true", help="skip 'ckpt on'")
    args = parser.parse_args(argv)

    device = torch.device(resolve_device(args.device))
    cfg = load_preset(args.preset)
    model, dtype = build(cfg, device)
    peak = peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"preset {args.preset} (random weights), device {name}, weights {dtype}".replace(
            "torch.", ""
        )
    )
    print(f"bf16 peak used for MFU: {f'{peak:.0f} TFLOP/s' if peak else 'unknown (MFU not shown)'}")
    print(
        f"parameters: encoder {count_parameters(model.encoder):,}, projector "
        f"{count_parameters(model.projector):,}, LLM {count_parameters(model.llm):,}; "
        f"{model.num_image_tokens} tokens per image, max length {model.max_length}"
    )
    p1, p2 = cfg["train"]["phase1"], cfg["train"]["phase2"]
    ckpt_options = (False,) if args.no_checkpointing_rows else (False, True)
    rows = []
    for phase, shapes, hp in (("phase1", PHASE1_SHAPES, p1), ("phase2", PHASE2_SHAPES, p2)):
        if phase == "phase2":
            add_lora(model, cfg)
        for shape, images, text in shapes:
            seq = min(images * model.num_image_tokens + text, model.max_length)
            for ckpt in ckpt_options:
                row = Row(phase, shape, hp["micro_batch"], seq, ckpt)
                rows.append(
                    train_row(
                        model, row, images, text, hp["trainable"], args.steps, args.warmup, device
                    )
                )
    print()
    print_table(rows, peak)
    batch = args.gen_batch or cfg["inference"]["batch_size"]
    max_new = args.gen_tokens or cfg["inference"]["max_new_tokens"]
    model.requires_grad_(False)
    new, seconds = cot_generation(model, batch, max_new, device)
    print()
    print(
        f"CoT generation, batch {batch}, 1 image each, turn 1 up to {COT_TURN1_NEW} + turn 2 up "
        f"to {max_new} new tokens (turn-1 cache reused): {new} tokens in {seconds:.2f} s = "
        f"{new / seconds:.0f} tokens/s, {seconds / batch:.2f} s per study"
    )
    if device.type == "cuda":
        print(
            f"peak GPU memory of the process: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"peak resident CPU memory: {rss:.0f} MiB")


if __name__ == "__main__":
    main()
