"""The training loop of the project, for every stage, on Hugging Face Accelerate.

No recipe knowledge lives here: a stage (``cxrlib.phases``) hands ``train`` a model, a dataset, a
collate function, a loss and its hyper-parameters. The same code runs on one CPU, one GPU or many
processes (``accelerate launch`` / ``torchrun``; DDP, FSDP or DeepSpeed through Accelerate's config).

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

import contextlib
import hashlib
import json
import math
import platform
import resource
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import accelerate
import numpy as np
import pandas as pd
import peft
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm
from transformers import get_scheduler

from cxrlib.config import ConfigError, save_config
from cxrlib.constants import IGNORE_INDEX
from cxrlib.optim_groups import param_groups, part_param_groups

EXPLODE_FACTOR = 10.0  # a loss this many times the first step's loss means the run diverged
KEEP_CHECKPOINTS = 2  # older checkpoints of a stage are deleted
PREVIOUS_CHECKPOINTS = "checkpoints.previous"  # where a run of another identity is set aside
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
    lr_scale: dict | None = None  # model part -> multiple of lr (cxrlib.optim_groups)

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
            lr_scale=dict(section.get("lr_scale") or {}),
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
    identity: dict | None = None  # what the run was made of (settings, upstream artifacts)
    model: torch.nn.Module | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("model")
        return d


def use_cpu(device: str | torch.device = "auto") -> bool:
    """True when ``device`` (``auto`` | ``cpu`` | ``cuda``) means training on the CPU."""
    device = str(device)
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def process_count(device: str | torch.device = "auto") -> int:
    """Processes of this run (1, or ``torchrun`` / ``accelerate launch``'s world size).

    Creates Accelerate's process state with the final ``cpu`` flag, which also sets up the process
    group (gloo on CPU, nccl on GPU). Created without it on a machine without CUDA, the state would
    never join a process group and every process would train alone into the same folder.
    """
    return PartialState(cpu=use_cpu(device)).num_processes


def build_accelerator(device: str | torch.device = "auto", accumulation: int = 1):
    """An ``Accelerator``: bf16 autocast on CUDA, fp32 on CPU, ``accumulation`` micro-batches."""
    cpu = use_cpu(device)
    process_count(device)  # the process group first, with the right backend
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


def config_hash(cfg: dict, stage: str) -> str:
    """A hash of the settings a stage's result depends on (model, data and its ``train`` section)."""
    keys = ("seed", "data", "encoder", "projector", "llm", "lora")
    relevant = {k: cfg.get(k) for k in keys}
    relevant["train"] = cfg.get("train", {}).get(stage)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def file_hash(path: str | Path) -> str:
    """sha256 (first 16 hex digits) of a file's bytes; ``"absent"`` when there is no such file."""
    path = Path(path)
    if not path.is_file():
        return "absent"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def identity_changes(saved: dict | None, current: dict | None) -> list[str]:
    """The top-level (and ``inputs``) entries in which two run identities differ."""
    if saved == current:
        return []
    if not isinstance(saved, dict) or not isinstance(current, dict):
        return ["the run's identity (the checkpoint predates identities or has none)"]
    changed = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            changed.append(key)
    return changed


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
    frame = pd.DataFrame(read_metrics(path))
    if len(frame):
        frame["loss_smooth"] = frame["loss"].rolling(max(1, smooth), min_periods=1).mean()
    return frame


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a stage (its ``trainer_state.json`` is written last)."""
    done = sorted((Path(out_dir) / "checkpoints").glob(f"step-*/{STATE_FILE}"))
    return done[-1].parent if done else None


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
    identity: dict | None = None,
    rerun_hint: str = "",
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
        identity: what the run is made of (e.g. ``{"config": ..., "inputs": {...}}``), stored
            with every checkpoint. A checkpoint of another identity is never resumed: it is moved
            to ``checkpoints.previous`` (with a warning naming what changed) and training starts
            afresh, so a changed setting or upstream artifact cannot return stale weights.
        rerun_hint: how to run the stage again with another learning rate (in error messages).
        explode_factor: stop when the loss exceeds this multiple of the first step's loss.
        num_workers: DataLoader workers.

    Returns:
        A ``TrainResult``; ``.model`` is the trained, unwrapped model.
    """
    out_dir = Path(out_dir)
    ckpt_root, metrics_path = out_dir / "checkpoints", out_dir / METRICS_FILE
    if accelerator is None:
        accelerator = build_accelerator(device, hp.accumulation(process_count(device)))
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

    if hp.lr_scale:  # a learning rate per model part (train.<stage>.lr_scale)
        groups = part_param_groups(named, hp.weight_decay, hp.lr, hp.lr_scale)
    else:
        groups = param_groups(named, hp.weight_decay)
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
        changed = identity_changes(saved.get("identity"), identity)
        if changed:
            previous = out_dir / PREVIOUS_CHECKPOINTS
            warnings.warn(
                f"{desc}: not resuming {ckpt.name}: {', '.join(changed)} changed since it was "
                f"made; training afresh (the old checkpoints are kept in {previous})",
                stacklevel=2,
            )
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                shutil.rmtree(previous, ignore_errors=True)
                ckpt_root.rename(previous)
                if metrics_path.exists():
                    metrics_path.rename(previous / METRICS_FILE)
            ckpt = None
    if ckpt is not None:
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
    records = read_metrics(metrics_path)  # every process keeps them (its TrainResult); main writes
    for step in range(start, end):
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(accum)]
        rows = torch.tensor([sum(count_rows(b) for b in micro)], device=accelerator.device)
        n_items = torch.tensor(float(sum(count_fn(b) for b in micro)), device=accelerator.device)
        n_items = accelerator.reduce(n_items, "sum").clamp(min=1.0)
        # backward() divides by `accum` and DDP averages over processes: undo both so that the
        # gradient is d(sum of losses)/d(theta) / (items in the global batch).
        scale = world * accum / n_items
        loss_sum = torch.zeros((), device=accelerator.device)
        grad_norm = None
        for batch in micro:
            batch = send_to_device(batch, accelerator.device, non_blocking=True)
            with accelerator.accumulate(model):
                loss, _ = loss_fn(model, batch)
                accelerator.backward(loss * scale)
                loss_sum += loss.detach().float()
                if accelerator.sync_gradients:
                    clip = hp.grad_clip if hp.grad_clip else float("inf")
                    grad_norm = accelerator.clip_grad_norm_(trainable, clip)
                    step_loss = float(accelerator.reduce(loss_sum, "sum") / n_items)
                    _check_finite(
                        step_loss, grad_norm, step + 1, state, explode_factor, desc, rerun_hint
                    )
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
            "samples_per_process": accelerator.gather(rows).tolist(),
        }
        records.append(record)
        if accelerator.is_main_process:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        progress.update(1)
        if (step + 1) % max(1, log_every) == 0 or step + 1 == end:
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{record['lr']:.2e}")
        last = step + 1 == end
        if last or (checkpoint_every and (step + 1) % checkpoint_every == 0):
            _save_checkpoint(accelerator, ckpt_root, state, identity, seed, hp)
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
        identity=identity,
        model=accelerator.unwrap_model(model),
    )
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # drop the accelerator's references to model and optimiser
    return result


def _check_finite(
    loss: float, grad_norm, step: int, state: dict, factor: float, desc: str, hint: str = ""
):
    """Raise before the optimiser step when the loss or the gradient has gone wrong."""
    norm = float(grad_norm) if grad_norm is not None else 0.0
    # Resuming would replay the same data with the same weights and diverge at the same step:
    # the advice is a lower learning rate, which changes the run's identity and starts afresh.
    fix = (
        "lower the learning rate and run the stage again"
        + (f", e.g. {hint}" if hint else " (train.<stage>.lr)")
        + "; the changed rate starts the stage afresh (resuming would diverge at the same step)"
    )
    if not math.isfinite(loss) or not math.isfinite(norm):
        raise TrainingDivergedError(
            f"{desc}: at step {step} the loss is {loss} and the gradient norm {norm}: {fix}"
        )
    first = state["first_loss"]
    if first is not None and first > 0 and loss > factor * first:
        raise TrainingDivergedError(
            f"{desc}: the loss exploded at step {step} ({loss:.4g}, more than {factor:g}x the "
            f"first step's {first:.4g}): {fix}, or raise warmup_steps"
        )


def _save_checkpoint(accelerator, root: Path, state: dict, identity, seed: int, hp: HParams):
    # Rotation by hand rather than Accelerate's ProjectConfiguration(total_limit=...): that names
    # folders by save count and deletes before the new save is complete, while here a checkpoint
    # is named by its optimiser step and counts only once trainer_state.json is written, so an
    # interrupted save never costs the last complete checkpoint; and the Accelerator is created
    # (and shared by notebooks) before the stage knows its folder.
    path = root / f"step-{state['step']:06d}"
    accelerator.save_state(str(path))  # every process takes part (FSDP / DeepSpeed shards)
    if accelerator.is_main_process:
        data_position = state["step"] * hp.global_batch
        extra = {"identity": identity, "seed": seed, "samples_seen": data_position}
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
            batch = collate_fn([dataset[i] for i in idx[k : k + batch_size]])
            batch = send_to_device(batch, device, non_blocking=True)
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


def write_summary(directory: Path, summary: dict) -> dict:
    """Write a stage's ``summary.json`` (main process only) and return ``summary``."""
    if not PartialState().is_main_process:
        return summary
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    return summary


# --- command line ---------------------------------------------------------------------------
