"""Speed of the M4CXR model on CPU: training samples/s, generation tokens/s, CoT cache reuse.

    .venv/bin/python benchmarks/bench_model.py            # tiny preset, a few steps each
    .venv/bin/python benchmarks/bench_model.py --preset smoke --steps 2

Random weights (speed does not depend on them); sequence lengths mimic the real data: phase 1
= system text + one image + a Findings section, phase 2 = a two-turn CoT conversation with two
images. Prints one line per figure and the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from cxrlib.constants import IGNORE_INDEX
from cxrlib.data.phantom import render
from cxrlib.inference import LocalBackend, report_chat
from cxrlib.model import add_lora, count_parameters, set_trainable
from cxrlib.model.toy import toy_model, toy_tokenizer

PHASE1_TEXT_TOKENS = 110  # system text + [INST] markers + an IU Findings section
PHASE2_TEXT_TOKENS = 190  # + the 13-finding question, its answer and the turn-2 question


def preset_sized_tokenizer(vocab_size: int):
    """The toy tokenizer padded with dummy tokens to the preset's vocabulary size, so the
    embedding and output layers cost what they cost in the real model."""
    tok = toy_tokenizer()
    tok.add_tokens([f"<dummy_{i}>" for i in range(max(0, vocab_size - len(tok)))])
    return tok


def batch(model, batch_size: int, text_tokens: int, images_per_sample: int):
    m, s = model.num_image_tokens, model.image_size
    length = text_tokens + m * images_per_sample
    ids = torch.randint(10, 300, (batch_size, length))
    for k in range(images_per_sample):  # image blocks after the first 40 text tokens
        ids[:, 40 + k * m : 40 + (k + 1) * m] = model.image_token_id
    labels = ids.clone()
    labels[:, : length - 60] = IGNORE_INDEX  # loss on the answer only
    pixel_values = torch.randn(batch_size * images_per_sample, 3, s, s)
    return ids, torch.ones_like(ids), pixel_values, labels


def train_speed(model, parts, micro_batch, text_tokens, images_per_sample, steps) -> float:
    set_trainable(model, parts)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    data = batch(model, micro_batch, text_tokens, images_per_sample)
    for step in range(steps + 1):  # step 0 warms up
        if step == 1:
            start = time.perf_counter()
        loss = model(data[0], data[1], data[2], labels=data[3]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return steps * micro_batch / (time.perf_counter() - start)


def generation_speed(model, batch_size: int, new_tokens: int) -> float:
    ids, mask, pixel_values, _ = batch(model, batch_size, PHASE1_TEXT_TOKENS, 1)
    model.generate(ids[:, :20], mask[:, :20], max_new_tokens=2)  # warm-up
    start = time.perf_counter()
    out = model.generate(ids, mask, pixel_values, max_new_tokens=new_tokens)
    elapsed = time.perf_counter() - start
    return out.sequences.numel() / elapsed


def cot_speedup(model, cfg, n_chats: int, new_tokens: int) -> tuple[float, float]:
    size = tuple(cfg["data"]["render_size"])  # PhantomCXR renders: chats refuse pure noise
    chats = [
        report_chat([render([], view, size, i, i).image for view in ("PA", "LATERAL")])
        for i in range(n_chats)
    ]
    times = []
    for reuse in (True, False):
        backend = LocalBackend(model, cfg, batch_size=n_chats, reuse_cache=reuse)
        backend.answer(chats[:2], 2)  # warm-up
        start = time.perf_counter()
        backend.answer(chats, new_tokens)
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per phase")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sample")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0 = PyTorch's default)"
    )
    args = parser.parse_args()
    if args.threads:
        # On a busy shared CPU, PyTorch's worker threads spin-wait for each other: one thread
        # can be several times faster for a model this small.
        torch.set_num_threads(args.threads)

    from cxrlib.config import load_preset

    cfg = load_preset(args.preset)
    tok = preset_sized_tokenizer(cfg["llm"]["vocab_size"])
    model, tok, cfg = toy_model(args.preset, tokenizer=tok)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"preset {args.preset}, torch threads {torch.get_num_threads()}, CPU, fp32")
    print(
        f"parameters: total {count_parameters(model):,} = encoder "
        f"{count_parameters(model.encoder):,} + projector {count_parameters(model.projector):,}"
        f" + LLM {count_parameters(model.llm):,}; {model.num_image_tokens} tokens per image"
    )
    p1, p2 = cfg["train"]["phase1"], cfg["train"]["phase2"]
    sps1 = train_speed(model, p1["trainable"], p1["micro_batch"], PHASE1_TEXT_TOKENS, 1, args.steps)
    print(f"phase 1 training: {sps1:.1f} samples/s (micro-batch {p1['micro_batch']}, 1 image)")
    add_lora(model, cfg)
    sps2 = train_speed(model, p2["trainable"], p2["micro_batch"], PHASE2_TEXT_TOKENS, 2, args.steps)
    print(f"phase 2 training: {sps2:.1f} samples/s (micro-batch {p2['micro_batch']}, 2 images)")
    for b in (1, 16):
        tps = generation_speed(model, b, args.new_tokens)
        print(f"generation, batch {b:2d}: {tps:.0f} new tokens/s ({args.new_tokens} per sample)")
    cached, reencoded = cot_speedup(model, cfg, 16, args.new_tokens)
    print(
        f"CoT, 16 two-image studies: {cached:.2f} s with turn-1 cache reuse, {reencoded:.2f} s "
        f"re-encoding -> speed-up x{reencoded / cached:.2f}"
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"peak resident memory: {peak:.0f} MiB ({baseline:.0f} MiB after imports + model build)")


if __name__ == "__main__":
    main()
