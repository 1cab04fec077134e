"""Benchmark: evaluation throughput (labeler, metrics) and CoT report generation on `tiny`.

    .venv/bin/python benchmarks/bench_eval.py                          # everything
    .venv/bin/python benchmarks/bench_eval.py --skip-generation        # labeler + metrics only
    .venv/bin/python benchmarks/bench_eval.py --checkpoint build/tiny/phase2 --studies 32

Prints:
* rule-based labeler: IU reports per second;
* clinical F1 with 1,000 bootstrap resamples, BLEU/ROUGE-L/CIDEr, METEOR (Java) on 500 pairs;
* CoT generation: studies per second (one image, two turns) with the turn-2 prompt continuing from
  the turn-1 KV cache, and without it (images and turn 1 encoded again), and the speed-up.
  Without ``--checkpoint`` the `tiny` architecture runs with random weights: every answer then
  runs to ``max_new_tokens`` (the slowest case).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cxrlib import metrics
from cxrlib.config import load_preset
from cxrlib.data.phantom import render
from cxrlib.labeler import label_reports


def timed(fn, *args, **kw):
    start = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - start


def bench_labeler_and_metrics(n_pairs: int) -> None:
    from cxrlib.data.iuxray import load_iu_reports

    reports, _ = load_iu_reports()
    texts = [(r.findings_raw + " " + r.impression).strip() for r in reports]
    labels, sec = timed(label_reports, texts)
    print(
        f"labeler      {len(texts):6d} IU reports  {sec:6.2f} s  {len(texts) / sec:8.0f} reports/s"
    )

    rng = np.random.default_rng(0)
    refs = [t for t in texts if t][:n_pairs]
    hyps = [refs[i] for i in rng.permutation(len(refs))]  # shuffled: a plausible, wrong report
    ref_l, hyp_l = label_reports(refs), label_reports(hyps)
    _, sec = timed(metrics.clinical_f1, ref_l, hyp_l)
    print(f"clinical F1  {len(refs):6d} pairs       {sec:6.3f} s")
    _, sec = timed(metrics.clinical_f1_ci, ref_l, hyp_l, samples=1000, seed=0)
    print(f"bootstrap    {len(refs):6d} pairs x1000 {sec:6.2f} s")
    _, sec = timed(metrics.language_metrics, refs, hyps, meteor="none")
    print(f"BLEU/ROUGE/CIDEr {len(refs):4d} pairs   {sec:6.2f} s")
    if metrics.meteor_backend("auto"):
        _, sec = timed(metrics.language_metrics, refs, hyps, meteor="auto")
        backend = metrics.meteor_backend("auto")
        print(f"+ METEOR     {len(refs):6d} pairs       {sec:6.2f} s  ({backend}, JVM start incl.)")


def bench_generation(
    checkpoint: str | None, n_studies: int, batch_size: int, threads: int, repeats: int
):
    from cxrlib.inference import LocalBackend, report_chat

    torch.set_num_threads(threads)
    if checkpoint:
        backend = LocalBackend.from_checkpoint(checkpoint, device="cpu", batch_size=batch_size)
        cfg, what = backend.cfg, checkpoint
    else:
        from cxrlib.model.toy import toy_model

        model, _, cfg = toy_model("tiny")
        model.eval()
        backend = LocalBackend(model, cfg, batch_size=batch_size)
        what = "tiny architecture, random weights"
    max_new = cfg["inference"]["max_new_tokens"]
    size = tuple(cfg["data"]["render_size"])  # PhantomCXR renders: chats refuse pure noise
    chats = [report_chat([render([], "PA", size, i, i).image], cot=True) for i in range(n_studies)]
    print(f"CoT generation: {what}; {n_studies} single-image studies, batch {batch_size}, "
          f"{max_new} new tokens max per turn, {threads} threads")  # fmt: skip
    # The machine is shared: alternate the two settings and keep each one's fastest run.
    best = {True: float("inf"), False: float("inf")}
    backend.answer(chats[:batch_size], max_new)  # warm-up
    for _ in range(repeats):
        for reuse in (True, False):
            backend.reuse_cache = reuse
            _, sec = timed(backend.answer, chats, max_new)
            best[reuse] = min(best[reuse], sec)
    for reuse in (True, False):
        label = "reuse turn-1 cache" if reuse else "re-encode turn 1  "
        print(f"  {label}  best of {repeats}: {best[reuse]:7.2f} s  "
              f"{n_studies / best[reuse]:6.2f} studies/s")  # fmt: skip
    print(f"  cache reuse speed-up: x{best[False] / best[True]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=500, help="report pairs for the metrics")
    parser.add_argument("--studies", type=int, default=16, help="studies for CoT generation")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (best)")
    parser.add_argument("--checkpoint", default=None, help="a phase2 folder; default random tiny")
    parser.add_argument("--skip-generation", action="store_true")
    args = parser.parse_args()
    bench_labeler_and_metrics(args.pairs)
    if not args.skip_generation:
        batch = args.batch_size or load_preset("tiny")["inference"]["batch_size"]
        bench_generation(args.checkpoint, args.studies, batch, args.threads, args.repeats)


if __name__ == "__main__":
    main()
