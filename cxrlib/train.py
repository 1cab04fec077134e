"""The one training loop of the project, for every stage, on Hugging Face Accelerate.

The same code runs on one CPU, one GPU or many GPUs (``accelerate launch``; DDP, FSDP or DeepSpeed
through Accelerate's config). Notebooks 02-04 and the command line call the same ``run_stage``:

    python -m cxrlib.train --stage phase1 --preset tiny [--output-dir build/tiny]
        [--set train.phase1.steps=10] [--no-resume] [--max-steps 5]
    accelerate launch -m cxrlib.train --stage phase2 --preset paper

What one optimiser step does (``train``):

* reads ``global_batch = micro_batch x accumulation x num_processes`` samples from a seeded order
  that depends only on (seed, epoch), so a resumed run sees exactly the samples it would have seen;
* averages the loss over every target token (or image) of the global batch, the way one big batch
  would, whatever the split into micro-batches and processes;
* bf16 autocast on GPU (fp32 on CPU), gradient clipping, AdamW, warmup + cosine or linear decay;
* stops with ``TrainingDivergedError`` naming the step when the loss is NaN/inf or explodes;
* appends one JSON line per step to ``<stage dir>/metrics.jsonl`` (step, loss, lr, grad_norm,
  samples_per_s, elapsed) and checkpoints every ``train.checkpoint_every`` steps and at the end
  (``accelerator.save_state`` + ``trainer_state.json`` with the step and data position).

Introduced in notebook 02; notebooks 03 and 04 train the two M4CXR phases with it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import platform
import resource
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from cxrlib.config import PRESETS, ConfigError, load_preset, save_config
from cxrlib.constants import IGNORE_INDEX

STAGES = ("tokenizer", "lm_pretrain", "encoder_pretrain", "phase1", "phase2")
NOTEBOOK_OF_STAGE = {  # the notebook that runs each stage (named in missing-artifact messages)
    "tokenizer": "02-backbones",
    "lm_pretrain": "02-backbones",
    "encoder_pretrain": "02-backbones",
    "phase1": "03-projector-pretraining",
    "phase2": "04-instruction-tuning-lora",
}
EXPLODE_FACTOR = 10.0  # a loss this many times the first step's loss means the run diverged
KEEP_CHECKPOINTS = 2  # older checkpoints of a stage are deleted
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
STATE_FILE = "trainer_state.json"
VERSIONS_FILE = "versions.json"


class TrainingDivergedError(RuntimeError):
    """The loss or gradient became NaN/inf, or the loss exploded; the message names the step."""


# --- hyper-parameters -----------------------------------------------------------------------


@dataclass(frozen=True)
class HParams:
    """The optimisation settings of one stage (one ``train.<stage>`` section of a preset)."""

    steps: int
    global_batch: int
    micro_batch: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # any transformers.get_scheduler name: cosine | linear | constant...
    grad_clip: float | None = 1.0
    lr_scale: dict | None = None  # issue 14: part -> multiple of lr (cxrlib.optim_groups)

    @classmethod
    def from_section(cls, section: dict, name: str = "stage") -> HParams:
        """Read ``train.<name>``; ``batch_size`` (pre-training stages) means one micro-batch."""
        global_batch = section.get("global_batch", section.get("batch_size"))
        if global_batch is None or "steps" not in section or "lr" not in section:
            raise ConfigError(f"train.{name} needs steps, lr and global_batch (or batch_size)")
        hp = cls(
            steps=int(section["steps"]),
            global_batch=int(global_batch),
            micro_batch=int(section.get("micro_batch", global_batch)),
            lr=float(section["lr"]),
            weight_decay=float(section.get("weight_decay", 0.0)),
            warmup_steps=int(section.get("warmup_steps", 0)),
            schedule=str(section.get("schedule", "cosine")),
            grad_clip=section.get("grad_clip", 1.0),
            lr_scale=dict(section.get("lr_scale") or {}),  # issue 14
        )
        if hp.steps < 1 or hp.micro_batch < 1 or hp.global_batch < 1:
            raise ConfigError(f"train.{name}: steps and batch sizes must be positive, got {hp}")
        return hp

    def accumulation(self, num_processes: int = 1) -> int:
        """Micro-batches per process per optimiser step."""
        per_step = self.micro_batch * num_processes
        if self.global_batch % per_step:
            raise ConfigError(
                f"global_batch {self.global_batch} is not a multiple of micro_batch "
                f"{self.micro_batch} x {num_processes} processes; change train.<stage>.micro_batch"
            )
        return self.global_batch // per_step


# --- seeded data order ----------------------------------------------------------------------


class SeededOrder:
    """An endless stream of dataset indices: one seeded permutation per epoch.

    Position ``p`` of the stream is sample ``perm(p // n)[p % n]``, so the samples of any step
    depend only on (seed, step), which is what makes a resumed run see the same data.
    """

    def __init__(self, size: int, seed: int):
        if size < 1:
            raise ValueError("cannot train on an empty dataset: check the stage's data")
        self.size, self.seed = size, seed
        self._cache: dict[int, list[int]] = {}

    def permutation(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = {epoch: torch.randperm(self.size, generator=gen).tolist()}
        return self._cache[epoch]

    def take(self, start: int, count: int) -> list[int]:
        """Indices at stream positions ``start .. start + count - 1``."""
        out = []
        for pos in range(start, start + count):
            out.append(self.permutation(pos // self.size)[pos % self.size])
        return out


class StepBatchSampler(Sampler[list[int]]):
    """Yields this process's micro-batches for optimiser steps ``start_step .. end_step - 1``.

    Step ``s`` covers stream positions ``[s * G, (s + 1) * G)``; its ``accumulation x processes``
    micro-batches are dealt out so that micro-batch ``k`` of process ``r`` is chunk ``k * P + r``.
    """

    def __init__(
        self,
        order: SeededOrder,
        hp: HParams,
        start_step: int,
        end_step: int,
        num_processes: int = 1,
        rank: int = 0,
    ):
        self.order, self.hp = order, hp
        self.start_step, self.end_step = start_step, end_step
        self.num_processes, self.rank = num_processes, rank
        self.accum = hp.accumulation(num_processes)

    def __len__(self) -> int:
        return (self.end_step - self.start_step) * self.accum

    def __iter__(self):
        g, m = self.hp.global_batch, self.hp.micro_batch
        for step in range(self.start_step, self.end_step):
            indices = self.order.take(step * g, g)
            for k in range(self.accum):
                chunk = k * self.num_processes + self.rank
                yield indices[chunk * m : (chunk + 1) * m]


# --- losses ---------------------------------------------------------------------------------


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of target tokens.

    Position ``t`` predicts ``labels[t + 1]``; ``IGNORE_INDEX`` targets are skipped. The sum (not
    the mean) lets ``train`` average over the whole global batch.
    """
    targets = labels[:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, (targets != IGNORE_INDEX).sum()


def count_target_tokens(batch: dict) -> int:
    """How many tokens ``causal_lm_loss`` averages over in ``batch`` (known before the forward)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def count_rows(batch: Any) -> int:
    """Default item count: the first dimension of the first tensor in the batch."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    values = batch.values() if isinstance(batch, dict) else batch
    for value in values:
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise TypeError("cannot count the items of this batch: pass count_fn to train()")


# --- the loop -------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What one ``train`` call did (stored as the stage's ``summary.json``)."""

    steps: int  # optimiser steps completed
    total_steps: int  # steps of the schedule (the preset's)
    completed: bool  # steps == total_steps
    final_loss: float  # mean loss of the last (up to) 10 steps
    first_loss: float
    seconds: float  # training time, summed over resumed segments
    samples_per_s: float
    peak_memory_gb: float
    metrics_path: str
    model: torch.nn.Module | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("model")
        return d


def build_accelerator(device: str | torch.device = "auto", accumulation: int = 1):
    """An ``Accelerator``: bf16 autocast on CUDA, fp32 on CPU, ``accumulation`` micro-batches."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    device = str(device)
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    kwargs = dict(
        cpu=cpu,
        mixed_precision="no" if cpu else "bf16",
        gradient_accumulation_steps=accumulation,
        step_scheduler_with_optimizer=False,  # we step the schedule once per optimiser step
    )
    try:
        return Accelerator(**kwargs)
    except ValueError:
        # A notebook that switched device in one process: the global state can only be reset when
        # not distributed (under `accelerate launch` the first setting stands).
        if PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state()
        return Accelerator(**kwargs)


def peak_memory_gb() -> float:
    """Peak GPU memory allocated (CUDA), else the process's peak resident memory, in GB."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 1e9
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1e9 if platform.system() == "Darwin" else 1e6)  # macOS reports bytes


def versions() -> dict[str, str]:
    """Versions of the libraries a checkpoint depends on (saved beside it)."""
    import accelerate
    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "numpy": np.__version__,
    }


def save_run_info(cfg: dict, directory: str | Path) -> None:
    """Write the resolved config and library versions into ``directory``."""
    directory = Path(directory)
    save_config(cfg, directory)
    (directory / VERSIONS_FILE).write_text(json.dumps(versions(), indent=2))


def fingerprint(cfg: dict, stage: str) -> str:
    """A hash of what a stage's result depends on; a checkpoint made with another one is refused."""
    keys = ("seed", "data", "encoder", "projector", "llm", "lora")
    relevant = {k: cfg.get(k) for k in keys}
    relevant["train"] = cfg.get("train", {}).get(stage)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def read_metrics(path: str | Path) -> list[dict]:
    """The per-step records of ``metrics.jsonl`` (a file or a stage directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metrics_frame(path: str | Path, smooth: int = 10):
    """``metrics.jsonl`` as a pandas DataFrame with a ``loss_smooth`` column (rolling mean).

    Notebooks 02-04 plot ``step`` against ``loss`` / ``loss_smooth`` from it.
    """
    import pandas as pd

    frame = pd.DataFrame(read_metrics(path))
    if len(frame):
        frame["loss_smooth"] = frame["loss"].rolling(max(1, smooth), min_periods=1).mean()
    return frame


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a stage (its ``trainer_state.json`` is written last)."""
    done = sorted((Path(out_dir) / "checkpoints").glob(f"step-*/{STATE_FILE}"))
    return done[-1].parent if done else None


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _param_groups(params: Sequence[tuple[str, torch.nn.Parameter]], weight_decay: float):
    """Weight decay on matrices only (not on biases, norms or positional vectors), as HF does."""
    decay = [p for n, p in params if p.ndim >= 2 and "norm" not in n.lower()]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "norm" not in n.lower())]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records after ``step`` (a run interrupted after its last checkpoint logged them)."""
    if path.exists():
        keep = [r for r in read_metrics(path) if r["step"] <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def train(
    model: torch.nn.Module,
    dataset: Dataset,
    collate_fn: Callable[[list], Any],
    loss_fn: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, torch.Tensor]],
    hp: HParams,
    out_dir: str | Path,
    *,
    seed: int = 0,
    count_fn: Callable[[Any], int] = count_rows,
    accelerator=None,
    device: str | torch.device = "auto",
    resume: bool = True,
    max_steps: int | None = None,
    checkpoint_every: int | None = None,
    log_every: int = 10,
    desc: str = "train",
    fingerprint_value: str = "",
    explode_factor: float = EXPLODE_FACTOR,
    num_workers: int = 0,
) -> TrainResult:
    """Train the parameters of ``model`` that require grad; checkpoint, log and resume.

    Args:
        model: the module; its trainable parameters are those with ``requires_grad``.
        dataset: indexable training samples.
        collate_fn: list of samples -> batch (tensors or dicts of tensors).
        loss_fn: ``(model, batch) -> (summed loss, item count)``, e.g. ``causal_lm_loss``.
        hp: the stage's hyper-parameters (``HParams.from_section(cfg["train"][stage])``).
        out_dir: stage directory: ``checkpoints/``, ``metrics.jsonl`` go here.
        seed: seeds the data order (initialisation is the caller's business).
        count_fn: items the loss averages over in a batch, known before the forward
            (``count_target_tokens`` for language losses; default: the batch size).
        accelerator: an existing ``Accelerator`` (its accumulation must match ``hp``).
        device: ``auto`` | ``cpu`` | ``cuda`` when ``accelerator`` is None.
        resume: continue from the newest checkpoint in ``out_dir``; False starts afresh.
        max_steps: stop (with a checkpoint) after this many steps; the schedule keeps ``hp.steps``.
        checkpoint_every: steps between checkpoints (None: only at the end).
        log_every: steps between progress-bar updates (every step is logged to the file).
        desc: progress bar label and the name used in error messages.
        fingerprint_value: stored with checkpoints; resuming with another value is an error.
        explode_factor: stop when the loss exceeds this multiple of the first step's loss.
        num_workers: DataLoader workers.

    Returns:
        A ``TrainResult``; ``.model`` is the trained, unwrapped model.
    """
    from transformers import get_scheduler

    out_dir = Path(out_dir)
    ckpt_root, metrics_path = out_dir / "checkpoints", out_dir / METRICS_FILE
    if accelerator is None:
        from accelerate.state import PartialState

        accelerator = build_accelerator(device, hp.accumulation(PartialState().num_processes))
    world, rank = accelerator.num_processes, accelerator.process_index
    accum = hp.accumulation(world)
    if accelerator.gradient_accumulation_steps != accum:
        raise ValueError(
            f"accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches but "
            f"{desc} needs {accum}: build it with build_accelerator(device, {accum})"
        )
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{desc}: the model has no trainable parameters (check set_trainable)")

    if hp.lr_scale:  # issue 14: a learning rate per model part (train.<stage>.lr_scale)
        from cxrlib.optim_groups import part_param_groups

        groups = part_param_groups(named, hp.weight_decay, hp.lr, hp.lr_scale)
    else:
        groups = _param_groups(named, hp.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=hp.lr)
    scheduler = get_scheduler(
        hp.schedule, optimizer, num_warmup_steps=hp.warmup_steps, num_training_steps=hp.steps
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    trainable = [p for p in model.parameters() if p.requires_grad]

    # --- resume or start afresh
    state = {"step": 0, "first_loss": None, "elapsed": 0.0}
    ckpt = latest_checkpoint(out_dir) if resume else None
    if ckpt is not None:
        saved = json.loads((ckpt / STATE_FILE).read_text())
        if saved.get("fingerprint") != fingerprint_value:
            raise ValueError(
                f"{ckpt} was made with another configuration than this {desc} run; delete "
                f"{ckpt_root} or pass resume=False (--no-resume) to start again"
            )
        accelerator.load_state(str(ckpt))  # weights, optimiser, schedule, RNG states
        state = saved
    elif accelerator.is_main_process:
        shutil.rmtree(ckpt_root, ignore_errors=True)
        metrics_path.unlink(missing_ok=True)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_path, state["step"])
    accelerator.wait_for_everyone()

    start = state["step"]
    end = min(hp.steps, max_steps if max_steps is not None else hp.steps)
    sampler = StepBatchSampler(
        SeededOrder(len(dataset), seed), hp, start, max(start, end), world, rank
    )
    # A private generator: creating the loader must not draw from the global RNG (resume exactness).
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
    batches = iter(loader)
    model.train()
    progress = tqdm(
        total=hp.steps, initial=start, desc=desc, disable=not accelerator.is_main_process
    )
    records = read_metrics(metrics_path) if accelerator.is_main_process else []
    for step in range(start, end):
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(accum)]
        n_items = torch.tensor(float(sum(count_fn(b) for b in micro)), device=accelerator.device)
        n_items = accelerator.reduce(n_items, "sum").clamp(min=1.0)
        # backward() divides by `accum` and DDP averages over processes: undo both so that the
        # gradient is d(sum of losses)/d(theta) / (items in the global batch).
        scale = world * accum / n_items
        loss_sum = torch.zeros((), device=accelerator.device)
        grad_norm = None
        for batch in micro:
            batch = _to_device(batch, accelerator.device)
            with accelerator.accumulate(model):
                loss, _ = loss_fn(model, batch)
                accelerator.backward(loss * scale)
                loss_sum += loss.detach().float()
                if accelerator.sync_gradients:
                    clip = hp.grad_clip if hp.grad_clip else float("inf")
                    grad_norm = accelerator.clip_grad_norm_(trainable, clip)
                    step_loss = float(accelerator.reduce(loss_sum, "sum") / n_items)
                    _check_finite(step_loss, grad_norm, step + 1, state, explode_factor, desc)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        state["elapsed"] += dt
        state["step"] = step + 1
        if state["first_loss"] is None:
            state["first_loss"] = step_loss
        record = {
            "step": step + 1,
            "loss": step_loss,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "samples_per_s": hp.global_batch / dt,
            "elapsed": state["elapsed"],
        }
        if accelerator.is_main_process:
            records.append(record)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        progress.update(1)
        if (step + 1) % max(1, log_every) == 0 or step + 1 == end:
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{record['lr']:.2e}")
        last = step + 1 == end
        if last or (checkpoint_every and (step + 1) % checkpoint_every == 0):
            _save_checkpoint(accelerator, ckpt_root, state, fingerprint_value, seed, hp)
    progress.close()

    losses = [r["loss"] for r in records[-10:]]
    result = TrainResult(
        steps=state["step"],
        total_steps=hp.steps,
        completed=state["step"] >= hp.steps,
        final_loss=float(np.mean(losses)) if losses else float("nan"),
        first_loss=state["first_loss"] if state["first_loss"] is not None else float("nan"),
        seconds=state["elapsed"],
        samples_per_s=state["step"] * hp.global_batch / max(state["elapsed"], 1e-9),
        peak_memory_gb=peak_memory_gb(),
        metrics_path=str(metrics_path),
        model=accelerator.unwrap_model(model),
    )
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # drop the accelerator's references to model and optimiser
    return result


def _check_finite(loss: float, grad_norm, step: int, state: dict, factor: float, desc: str):
    """Raise before the optimiser step when the loss or the gradient has gone wrong."""
    norm = float(grad_norm) if grad_norm is not None else 0.0
    if not math.isfinite(loss) or not math.isfinite(norm):
        raise TrainingDivergedError(
            f"{desc}: at step {step} the loss is {loss} and the gradient norm {norm}; lower "
            f"train.<stage>.lr, check the data of this step, or resume from the last checkpoint"
        )
    first = state["first_loss"]
    if first is not None and first > 0 and loss > factor * first:
        raise TrainingDivergedError(
            f"{desc}: the loss exploded at step {step} ({loss:.4g}, more than {factor:g}x the "
            f"first step's {first:.4g}); lower train.<stage>.lr or raise warmup_steps"
        )


def _save_checkpoint(accelerator, root: Path, state: dict, fp: str, seed: int, hp: HParams):
    path = root / f"step-{state['step']:06d}"
    accelerator.save_state(str(path))  # every process takes part (FSDP / DeepSpeed shards)
    if accelerator.is_main_process:
        data_position = state["step"] * hp.global_batch
        extra = {"fingerprint": fp, "seed": seed, "samples_seen": data_position}
        (path / STATE_FILE).write_text(json.dumps({**state, **extra}, indent=2))
        for old in sorted(root.glob("step-*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    dataset: Dataset,
    collate_fn: Callable[[list], Any],
    loss_fn: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
    group_of: Callable[[int], str] | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Mean loss over ``dataset`` per group (e.g. per task) and overall (``"all"``).

    Args:
        group_of: index -> group name; batches never mix groups. None: only ``"all"``.
        device: where the model is; under bf16 on CUDA the forward runs in autocast.

    Returns:
        ``{group: token-weighted mean loss, ..., "all": ...}``, groups sorted by name.
    """
    device = torch.device(device)
    groups: dict[str, list[int]] = {}
    for i in range(len(dataset)):
        groups.setdefault(group_of(i) if group_of else "all", []).append(i)
    was_training = model.training
    model.eval()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for name in sorted(groups):
        idx = groups[name]
        for k in range(0, len(idx), batch_size):
            batch = _to_device(collate_fn([dataset[i] for i in idx[k : k + batch_size]]), device)
            with autocast:
                loss, n = loss_fn(model, batch)
            sums[name] = sums.get(name, 0.0) + float(loss)
            counts[name] = counts.get(name, 0.0) + float(n)
    model.train(was_training)
    out = {name: sums[name] / max(counts[name], 1.0) for name in sorted(sums)}
    if group_of:
        out["all"] = sum(sums.values()) / max(sum(counts.values()), 1.0)
    return out


# --- stages ---------------------------------------------------------------------------------


def stage_dir(stage: str, out_dir: str | Path) -> Path:
    """Where a stage writes: ``tokenizer/``, ``backbones/llm``, ``backbones/encoder``, ``phase1``..."""
    out_dir = Path(out_dir)
    return {
        "tokenizer": out_dir / "tokenizer",
        "lm_pretrain": out_dir / "backbones" / "llm",
        "encoder_pretrain": out_dir / "backbones" / "encoder",
        "phase1": out_dir / "phase1",
        "phase2": out_dir / "phase2",
    }[stage]


def run_stage(
    stage: str,
    cfg: dict,
    out_dir: str | Path,
    resume: bool = True,
    max_steps: int | None = None,
    device: str | torch.device = "auto",
) -> dict:
    """Run one training stage of a preset and return its summary.

    Args:
        stage: ``tokenizer``, ``lm_pretrain``, ``encoder_pretrain``, ``phase1`` or ``phase2``.
        cfg: the resolved preset (``load_preset`` / ``run.cfg``).
        out_dir: the preset's output folder (``run.out``), holding ``data/`` from notebook 01.
        resume: continue from the stage's newest checkpoint (a finished stage returns at once).
        max_steps: stop early after this many steps (tests, benchmarks); the schedule is the preset's.
        device: ``auto`` | ``cpu`` | ``cuda``.

    Returns:
        The stage's summary dict (also saved as ``<stage dir>/summary.json``).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage '{stage}': choose one of {', '.join(STAGES)}")
    from cxrlib import backbones

    runner = {
        "tokenizer": backbones.tokenizer_stage,
        "lm_pretrain": backbones.lm_pretrain_stage,
        "encoder_pretrain": backbones.encoder_pretrain_stage,
        "phase1": phase1_stage,
        "phase2": phase2_stage,
    }[stage]
    return runner(cfg, Path(out_dir), resume=resume, max_steps=max_steps, device=device)


def _stage_setup(cfg: dict, stage: str, device, num_processes: int | None = None):
    """The stage's hyper-parameters and an Accelerator with the matching accumulation."""
    from accelerate.state import PartialState

    hp = HParams.from_section(cfg["train"][stage], stage)
    world = num_processes or PartialState().num_processes
    return hp, build_accelerator(device, hp.accumulation(world))


def _backbones_dir(cfg: dict, out_dir: Path) -> Path | None:
    """``<out>/backbones`` for presets that pre-train their own; None when both come from the hub."""
    if cfg["encoder"]["hf_id"] and cfg["llm"]["hf_id"]:
        return None
    return out_dir / "backbones"


class FromFeatures(torch.nn.Module):
    """Phase-1 forward from cached encoder features: projector -> image slots -> LLM.

    Equal to ``M4CXR.forward`` with the encoder's output precomputed (``test_train`` checks it);
    used only while the encoder is frozen, so its features never change.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, features):
        from cxrlib.model import positions_from_mask

        m = self.model
        embeds = m.llm.get_input_embeddings()(input_ids)
        tokens = m.projector(features.to(embeds.dtype)).to(embeds.dtype)
        slots = (input_ids == m.image_token_id).unsqueeze(-1).expand_as(embeds)
        if int(slots[..., 0].sum()) != tokens.shape[0] * tokens.shape[1]:
            raise ValueError("image placeholders and cached features do not match one to one")
        embeds = embeds.masked_scatter(slots, tokens.reshape(-1, embeds.shape[-1]))
        out = m.llm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask),
            use_cache=False,
        )
        return out.logits


@torch.no_grad()
def encoder_features(
    model, images: np.ndarray, indices: Sequence[int], cfg: dict, batch_size: int = 32
) -> torch.Tensor:
    """Patch features (before the final norm, CLS dropped) of ``images[indices]``: (N, P, D)."""
    from cxrlib.model import ImageProcessor

    processor = ImageProcessor(cfg)
    device = next(model.encoder.parameters()).device
    dtype = next(model.encoder.parameters()).dtype
    out = []
    for k in tqdm(range(0, len(indices), batch_size), desc="encoder features", leave=False):
        pixels = processor([np.asarray(images[i]) for i in indices[k : k + batch_size]])
        hidden = model.encoder(pixel_values=pixels.to(device, dtype), output_hidden_states=True)
        out.append(hidden.hidden_states[-1][:, 1:].cpu())
    return torch.cat(out)


def cached_features(
    model, images, indices: list[int], cfg: dict, path: Path, accelerator=None
) -> torch.Tensor:
    """Encoder features of ``indices``, computed once and kept in ``path`` (``.pt``).

    The cache is keyed by the image indices and a hash of the encoder weights, so a changed
    dataset or encoder recomputes it instead of silently using stale features.
    """
    weights = torch.cat(
        [p.detach().flatten()[:64].float().cpu() for p in model.encoder.parameters()]
    )
    key = hashlib.sha256(weights.numpy().tobytes() + str(list(indices)).encode()).hexdigest()[:16]
    ctx = accelerator.main_process_first() if accelerator else contextlib.nullcontext()
    with ctx:
        if path.exists():
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if saved.get("key") == key:
                return saved["features"]
        features = encoder_features(model, images, indices, cfg)
        if accelerator is None or accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"key": key, "features": features}, path)
    return features


class Phase1Pairs(Dataset):
    """Phase-1 "report only" pairs: every frontal image of the training split's IU studies.

    Items are encoded conversations (``<image>`` -> Findings) plus the row of the image's cached
    features (or the raw image when the encoder trains and features cannot be cached).
    """

    def __init__(
        self,
        studies,
        tokenizer,
        cfg: dict,
        split: str = "train",
        source: str | None = "iu",
        allow_empty: bool = False,
    ):
        from cxrlib.constants import FRONTAL_VIEWS
        from cxrlib.data.conversations import build_conversation
        from cxrlib.data.tokenize import encode_conversation

        self.items, self.image_indices = [], []
        for s in studies:
            if s["split"] != split or (source and s["source"] != source):
                continue
            for im in s["images"]:
                if im["view"] not in FRONTAL_VIEWS:
                    continue
                conv = build_conversation("report_only", {**s, "images": [im]}, 0)
                if conv is None:
                    continue
                enc = encode_conversation(
                    conv, tokenizer, cfg["projector"]["num_queries"], cfg["llm"]["max_length"]
                )
                enc.update(image_index=im["index"], study_id=s["study_id"], row=len(self.items))
                self.items.append(enc)
                self.image_indices.append(im["index"])
        if not self.items and not allow_empty:
            raise ValueError(f"no frontal images with Findings in split '{split}' (notebook 01)")
        self.features = None  # set to the (N, P, D) cache, row-aligned with items
        self.images = None  # or the images.npy array when features are not cached

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.items[i])
        if self.features is not None:
            item["features"] = self.features[i]
        else:
            item["images"] = [np.asarray(self.images[item["image_index"]])]
        return item


class ConversationCollate:
    """C's ``collate`` plus what the model needs: cached ``features`` or ``pixel_values``."""

    def __init__(self, pad_id: int, cfg: dict):
        from cxrlib.model import ImageProcessor

        self.pad_id = pad_id
        self.processor = ImageProcessor(cfg)

    def __call__(self, items: list[dict]) -> dict:
        from cxrlib.data.tokenize import collate

        batch = collate(items, self.pad_id, padding_side="right")
        out = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        if "features" in items[0]:
            out["features"] = torch.stack([it["features"] for it in items])
        else:
            images = batch.get("images") or []
            out["pixel_values"] = self.processor(images) if images else None
        if "tasks" in batch:
            out["tasks"] = batch["tasks"]
        return out


def multimodal_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss on assistant tokens for M4CXR (or ``FromFeatures``) batches."""
    if "features" in batch:
        logits = model(batch["input_ids"], batch["attention_mask"], batch["features"])
    else:
        logits = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
    return causal_lm_loss(logits, batch["labels"])


def upcast_trainable(model: torch.nn.Module) -> None:
    """Keep trainable weights in fp32 (frozen ones may stay bf16): autocast computes in bf16,
    but AdamW updates of ~1e-4 relative size would vanish in bf16 weights."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


@torch.no_grad()
def match_image_token_scale(model, features: torch.Tensor) -> float:
    """Scale the projector's last linear layer so image tokens start at the word embeddings' norm.

    A freshly initialised C-Abstractor emits vectors ~30x longer than the embeddings of a small
    LLM trained here. The LLM's RMSNorm then divides the gradient reaching them by that factor
    and image-to-image differences drown in a large common part: the model learns to ignore the
    image (measured: a held-out yes/no cardiomegaly question stayed at chance). Scaling weight
    and bias of the readout's last ``Linear`` by one factor scales every image token by it.

    Args:
        model: the ``M4CXR`` model.
        features: a few images' encoder patch features ``(N, P, D)``.

    Returns:
        The factor applied.
    """
    last = [m for m in model.projector.modules() if isinstance(m, torch.nn.Linear)][-1]
    weight = last.weight
    tokens = model.projector(features.to(weight.device, weight.dtype))
    target = model.llm.get_input_embeddings().weight.float().norm(dim=-1).mean()
    factor = float(target / tokens.float().norm(dim=-1).mean())
    last.weight.mul_(factor)
    if last.bias is not None:
        last.bias.mul_(factor)
    return factor


def _phase_setup(cfg: dict, phase: str, out_dir: Path, device, default_trainable: list[str]):
    """What phases 1 and 2 both start from: the trainable parts, hyper-parameters, Accelerator,
    tokenizer, datasets, backbones folder and the freshly built (seeded) model."""
    from cxrlib.backbones import stage_tokenizer
    from cxrlib.data.datasets import load_datasets
    from cxrlib.model import build_model
    from cxrlib.utils import seed_everything

    trainable = list(cfg["train"][phase].get("trainable", default_trainable))
    hp, accelerator = _stage_setup(cfg, phase, device)
    tokenizer = stage_tokenizer(cfg, out_dir)
    data = load_datasets(out_dir / "data")
    seed_everything(cfg["seed"])
    backbones = _backbones_dir(cfg, out_dir)
    model = build_model(
        cfg, tokenizer, device=accelerator.device, backbones_dir=backbones, lora="lora" in trainable
    )
    return trainable, hp, accelerator, tokenizer, data, backbones, model


def phase1_stage(cfg, out_dir: Path, resume=True, max_steps=None, device="auto") -> dict:
    """Phase 1: train the C-Abstractor alone on report-only pairs; saves ``<out>/phase1``."""
    from cxrlib.model import count_parameters, save_trained, set_trainable

    t_start = time.perf_counter()
    timings = {}
    target = stage_dir("phase1", out_dir)
    trainable, hp, accelerator, tokenizer, data, backbones, model = _phase_setup(
        cfg, "phase1", out_dir, device, default_trainable=["projector"]
    )
    set_trainable(model, trainable)
    upcast_trainable(model)
    train_pairs = Phase1Pairs(data.studies, tokenizer, cfg, "train")
    val_pairs = Phase1Pairs(data.studies, tokenizer, cfg, "val", allow_empty=True)
    if "encoder" in trainable:  # features change while training: no cache
        train_pairs.images = val_pairs.images = data.images
        net = model
    else:
        timings["setup"] = time.perf_counter() - t_start
        indices = train_pairs.image_indices + val_pairs.image_indices
        features = cached_features(
            model, data.images, indices, cfg, target / "encoder_features.pt", accelerator
        )
        train_pairs.features = features[: len(train_pairs)]
        val_pairs.features = features[len(train_pairs) :]
        net = FromFeatures(model)
        timings["feature_cache"] = time.perf_counter() - t_start - timings["setup"]
    scale = None
    if not cfg["llm"]["hf_id"]:  # an LLM trained here; `paper` keeps the official initialisation
        probe = train_pairs.features[:64] if train_pairs.features is not None else None
        if probe is None:
            probe = encoder_features(model, data.images, train_pairs.image_indices[:64], cfg)
        scale = match_image_token_scale(model, probe)
    collate = ConversationCollate(tokenizer.pad_token_id, cfg)
    save_run_info(cfg, target)

    def val_loss() -> float | None:
        if not len(val_pairs):
            return None
        loss = evaluate_loss(
            net,
            val_pairs,
            collate,
            multimodal_loss,
            cfg["inference"]["batch_size"],
            device=accelerator.device,
        )
        return loss["all"]

    t0 = time.perf_counter()
    before = val_loss()
    timings["validation"] = time.perf_counter() - t0
    result = train(
        net, train_pairs, collate, multimodal_loss, hp, target,
        seed=cfg["seed"], count_fn=count_target_tokens, accelerator=accelerator, resume=resume,
        max_steps=max_steps, checkpoint_every=cfg["train"]["checkpoint_every"],
        log_every=cfg["train"]["log_every"], desc="phase1",
        fingerprint_value=fingerprint(cfg, "phase1"),
    )  # fmt: skip
    t0 = time.perf_counter()
    after = val_loss()
    shuffled = None
    if val_pairs.features is not None and len(val_pairs) > 1:
        # The same validation pairs with every image swapped for another one: if the loss does not
        # rise, the projector has not (yet) learnt anything image-specific.
        real = val_pairs.features
        order = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))
        val_pairs.features = real[order]
        shuffled = val_loss()
        val_pairs.features = real
    timings["validation"] += time.perf_counter() - t0
    if accelerator.is_main_process:
        save_trained(model, target, cfg, parts=trainable, backbones_dir=backbones)
    summary = {
        "stage": "phase1",
        **result.to_dict(),
        "pairs": len(train_pairs),
        "val_pairs": len(val_pairs),
        "val_loss_before": before,
        "val_loss": after,
        "val_loss_shuffled_images": shuffled,
        "features_cached": "encoder" not in trainable,
        "image_token_scale": scale,
        "trainable_parameters": count_parameters(model, trainable_only=True),
        "total_parameters": count_parameters(model),
        "timings": timings,
        "stage_seconds": time.perf_counter() - t_start,
    }
    return _write_summary(target, summary)


VAL_PER_TASK = 32  # validation conversations per task in phase 2


def validation_sets(data, tokenizer, cfg: dict, per_task: int = VAL_PER_TASK) -> dict:
    """One ``ConversationDataset`` per task of the val split (tasks the split cannot make are left out)."""
    import warnings

    from cxrlib.data.datasets import ConversationDataset
    from cxrlib.data.mixture import MIXTURE_TASKS

    sets = {}
    for task in MIXTURE_TASKS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no data for task": we skip it below
            try:
                ds = ConversationDataset(
                    data.studies,
                    data.images,
                    tokenizer,
                    cfg,
                    tasks=[task],
                    split="val",
                    seed=cfg["seed"] + 1,
                    length=per_task,
                )
            except ValueError:
                continue
        sets[task] = ds
    return sets


def validation_loss(model, sets: dict, collate, batch_size: int, device) -> dict[str, float]:
    """Mean assistant-token loss per task and over all tasks (``"all"``)."""
    from torch.utils.data import ConcatDataset

    names = list(sets)
    joined = ConcatDataset([sets[n] for n in names])
    offsets = np.cumsum([0] + [len(sets[n]) for n in names])

    def group_of(i: int) -> str:
        return names[int(np.searchsorted(offsets, i, side="right") - 1)]

    return evaluate_loss(model, joined, collate, multimodal_loss, batch_size, group_of, device)


def phase2_stage(cfg, out_dir: Path, resume=True, max_steps=None, device="auto") -> dict:
    """Phase 2: LoRA + the preset's trainable parts on the task mixture; saves ``<out>/phase2``."""
    from cxrlib.data.datasets import ConversationDataset
    from cxrlib.model import (
        count_parameters,
        load_trained_weights,
        save_trained,
        set_trainable,
    )
    from cxrlib.utils import require_artifact

    t_start = time.perf_counter()
    target = stage_dir("phase2", out_dir)
    phase1 = stage_dir("phase1", out_dir)
    require_artifact(phase1 / "trained.safetensors", made_by="03-projector-pretraining")
    trainable, hp, accelerator, tokenizer, data, backbones, model = _phase_setup(
        cfg, "phase2", out_dir, device, default_trainable=["lora", "projector", "encoder"]
    )
    loaded = load_trained_weights(model, phase1)  # phase 1's projector
    scale = None
    if not cfg["llm"]["hf_id"]:
        # Phase 1 on report text alone grows a large image-independent part in the projector's
        # output; bring the tokens back to the embeddings' length (see match_image_token_scale).
        frontal = [im["index"] for s in data.split("train") for im in s["images"]
                   if im["view"] in ("PA", "AP")][:64]  # fmt: skip
        scale = match_image_token_scale(model, encoder_features(model, data.images, frontal, cfg))
    set_trainable(model, trainable)
    upcast_trainable(model)
    train_set = ConversationDataset(
        data.studies, data.images, tokenizer, cfg, split="train", seed=cfg["seed"]
    )
    collate = ConversationCollate(tokenizer.pad_token_id, cfg)
    val_sets = validation_sets(
        data, tokenizer, cfg, cfg["train"]["phase2"].get("val_per_task", VAL_PER_TASK)
    )
    eval_batch = cfg["inference"]["batch_size"]
    save_run_info(cfg, target)
    t0 = time.perf_counter()
    val_before = validation_loss(model, val_sets, collate, eval_batch, accelerator.device)
    val_seconds = time.perf_counter() - t0
    result = train(
        model, train_set, collate, multimodal_loss, hp, target,
        seed=cfg["seed"], count_fn=count_target_tokens, accelerator=accelerator, resume=resume,
        max_steps=max_steps, checkpoint_every=cfg["train"]["checkpoint_every"],
        log_every=cfg["train"]["log_every"], desc="phase2",
        fingerprint_value=fingerprint(cfg, "phase2"),
    )  # fmt: skip
    model = result.model
    t0 = time.perf_counter()
    val_after = validation_loss(model, val_sets, collate, eval_batch, accelerator.device)
    val_seconds += time.perf_counter() - t0
    if accelerator.is_main_process:
        save_trained(model, target, cfg, parts=trainable, backbones_dir=backbones)
    summary = {
        "stage": "phase2",
        **result.to_dict(),
        "started_from": {"phase1": str(phase1), "parts": loaded},
        "image_token_scale": scale,
        "train_conversations": len(train_set),
        "task_weights": train_set.weights,
        "val_loss_before": val_before,
        "val_loss": val_after,
        "trainable_parameters": count_parameters(model, trainable_only=True),
        "total_parameters": count_parameters(model),
        "timings": {"validation": val_seconds},
        "stage_seconds": time.perf_counter() - t_start,
    }
    return _write_summary(target, summary)


# --- does the phase-2 model use the image? ------------------------------------------------------


def findings_labels(findings: Sequence[str] | None) -> dict[str, int]:
    """A CoT turn-1 answer (parsed list of findings) as the 14 CheXpert labels.

    ``No Finding`` is 1 exactly when nothing is named; a malformed answer (None) names nothing.
    """
    from cxrlib.constants import CHEXPERT_LABELS
    from cxrlib.data.conversations import LABEL_OF

    named = {LABEL_OF[f] for f in (findings or [])}
    labels = {name: int(name in named) for name in CHEXPERT_LABELS}
    labels["No Finding"] = int(not named)
    return labels


def findings_answer_check(
    backend,
    studies: Sequence[dict],
    images: np.ndarray,
    train_studies: Sequence[dict],
    max_studies: int | None = None,
    max_new_tokens: int = 48,
    candidates: int = 20,
) -> dict:
    """Does the model read the image? Its CoT turn-1 answer vs the best image-blind answers.

    One frontal image per held-out study is asked the card's turn-1 question; the answer is
    parsed (``cxrlib.inference.parse_findings``, lenient) and scored as 14 CheXpert labels against
    the study's own labels (macro F1 over the 14, ``cxrlib.metrics.clinical_f1``). Image-blind
    answers give every study the same reply: the most common label set of the training split
    (the issue's baseline) and, stricter, the best of the ``candidates`` most common sets and
    "all 13 findings" chosen on these very studies (an oracle choice, so an upper bound for
    any constant answer we tried).

    Args:
        backend: ``cxrlib.inference.LocalBackend`` around the trained model.
        studies: held-out study records (e.g. the val split).
        images: the ``images.npy`` array.
        train_studies: the training split (for the most common label set).
        max_studies: score at most this many studies (the first ones), None = all.
        max_new_tokens: generation budget of the turn-1 answer (13 findings fit in ~40 tokens).

    Returns:
        ``{"n", "model_mF1_14", "model_uF1_14", "malformed", "most_common_answer",
        "most_common_mF1_14", "best_constant_answer", "best_constant_mF1_14", "per_label",
        "examples"}``.
    """
    from collections import Counter

    from cxrlib.constants import COT_FINDINGS, FRONTAL_VIEWS
    from cxrlib.data.conversations import NOT_FOUND, positive_findings, report_user_turns
    from cxrlib.inference import Chat, parse_findings, run_chats
    from cxrlib.metrics import clinical_f1

    chosen = []
    for s in studies:
        frontal = [im for im in s["images"] if im["view"] in FRONTAL_VIEWS]
        if frontal:
            chosen.append((s, frontal[0]["index"]))
    chosen = chosen[:max_studies] if max_studies else chosen
    if not chosen:
        raise ValueError("no held-out study with a frontal image to ask")
    question = report_user_turns("single", 1, cot=True)[0]
    chats = [
        Chat([question], [np.asarray(images[i])], {"study_id": s["study_id"]}) for s, i in chosen
    ]
    answers = [a[0] for a in run_chats(backend, chats, max_new_tokens, desc="turn-1 answers")]
    parsed = [parse_findings(a, strict=False) for a in answers]
    reference = [s["labels"] for s, _ in chosen]
    model = clinical_f1(reference, [findings_labels(p) for p in parsed])

    def text(findings) -> str:
        return ", ".join(findings) + "." if findings else NOT_FOUND

    sets = Counter(tuple(positive_findings(s["labels"])) for s in train_studies)
    most_common = list(sets.most_common(1)[0][0])
    options = [list(f) for f, _ in sets.most_common(candidates)] + [list(COT_FINDINGS)]
    scored = [
        (clinical_f1(reference, [findings_labels(o)] * len(chosen))["mF1-14"], o) for o in options
    ]
    best_score, best = max(scored, key=lambda x: x[0])
    return {
        "n": len(chosen),
        "model_mF1_14": model["mF1-14"],
        "model_uF1_14": model["uF1-14"],
        "malformed": sum(p is None for p in parsed),
        "most_common_answer": text(most_common),
        "most_common_mF1_14": clinical_f1(reference, [findings_labels(most_common)] * len(chosen))[
            "mF1-14"
        ],
        "best_constant_answer": text(best),
        "best_constant_mF1_14": best_score,
        "per_label": model["per_label"],
        "examples": [
            {
                "study_id": s["study_id"],
                "answer": a,
                "reference": text(positive_findings(s["labels"])),
            }
            for (s, _), a in list(zip(chosen, answers))[:8]
        ],
    }


def _write_summary(directory: Path, summary: dict) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    return summary


# --- command line ---------------------------------------------------------------------------


def parse_overrides(items: Sequence[str]) -> dict:
    """``["train.phase1.steps=10", ...]`` -> ``{"train": {"phase1": {"steps": 10}}}`` (YAML values)."""
    import yaml

    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key.path=value, got '{item}'")
        key, value = item.split("=", 1)
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Train one stage of a cxrlib preset.")
    parser.add_argument("--stage", required=True, choices=[*STAGES, "all"])
    parser.add_argument("--preset", default="tiny", choices=PRESETS)
    parser.add_argument("--output-dir", default="", help="default: build/<preset>")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a preset value, e.g. train.phase1.steps=10 (repeatable)",
    )
    parser.add_argument("--seed", type=int, default=None, help="default: the preset's seed")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--no-resume", action="store_true", help="start the stage afresh")
    parser.add_argument(
        "--max-steps", type=int, default=None, help="stop early (the schedule stays)"
    )
    args = parser.parse_args(argv)

    from cxrlib.utils import output_dir, seed_everything

    try:
        cfg = load_preset(args.preset, parse_overrides(args.set))
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    if args.seed is not None:
        cfg["seed"] = args.seed
    seed_everything(cfg["seed"])  # what cxrlib.notebook.setup does, so CLI == notebook
    out = Path(args.output_dir) if args.output_dir else output_dir(args.preset)
    summary = {}
    for stage in STAGES if args.stage == "all" else [args.stage]:
        summary = run_stage(stage, cfg, out, not args.no_resume, args.max_steps, args.device)
        shown = {k: v for k, v in summary.items() if not isinstance(v, dict | list)}
        print(f"{stage}: {json.dumps(shown)}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
