"""The phase-2 task mixture: per-task sampling weights and a seeded sampler.

The card's shares: report generation 54% (single image : multi-image : multi-study =
200 : 120 : 60), image understanding 35% (classification 9% + localisation 26%), VQA 11%.

    weights = mixture_weights("paper", sizes)       # sizes: task -> number of usable studies
    sampler = TaskSampler(weights, seed=0)
    sampler.sample()          # 'cot_single'
    sampler.sample(5)         # ['vqa', 'finding_grounding', ...]

Named mixtures (``MIXTURES``; ``cfg["data"]["mixture"]``):
- ``paper``: the card's shares. The card does not split the groups into our tasks, so within
  classification the two tasks get equal halves (4.5% each); within localisation the 8 grounding
  tasks get equal shares (3.25% each; the paper mixes several data sets per task and gives no
  per-task numbers); within VQA, plain VQA gets 8% and difference VQA 3% (Medical-Diff-VQA has
  one "difference" question type among seven, and MIMIC-CXR-VQA adds only plain questions).
- ``uniform``: every task the same weight (the paper's "uniform per dataset"; here one data set
  per task).
- ``equal_groups``: thirds for report / image understanding / VQA, keeping the ``paper``
  proportions inside each third (so only the group shares change, as in the ablation).
- ``proportional``: weight proportional to each task's size (``sizes``).

A task of a named mixture with no data (size 0 or missing from ``sizes``) is dropped and the rest
renormalised, with a warning (e.g. ``cot_multi_study`` when a dataset has no longitudinal
studies); a task given by name in a dict of weights with no data is an error. Introduced in
notebook 01; the training engine (``cxrlib.train``) samples tasks through ``ConversationDataset``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from cxrlib.constants import DIRECT_REPORT_TASKS, MIXTURE_TASKS, TASK_GROUPS

# The card's group shares (percent) and the within-report weights.
GROUP_SHARES = {"report": 54.0, "classification": 9.0, "localization": 26.0, "vqa": 11.0}
REPORT_WEIGHTS = {"cot_single": 200, "cot_multi_image": 120, "cot_multi_study": 60}
VQA_WEIGHTS = {"vqa": 8.0, "difference_vqa": 3.0}
MIXTURES = ("paper", "uniform", "equal_groups", "proportional")


class MixtureError(ValueError):
    """An unknown mixture name or weights that cannot be sampled."""


def _within_group(group: str) -> dict[str, float]:
    """Fractions (summing to 1) of each task inside a group, following the paper."""
    tasks = TASK_GROUPS[group]
    raw = {"report": REPORT_WEIGHTS, "vqa": VQA_WEIGHTS}.get(group, {t: 1.0 for t in tasks})
    total = sum(raw[t] for t in tasks)
    return {t: raw[t] / total for t in tasks}


def paper_weights(group_shares: Mapping[str, float] = GROUP_SHARES) -> dict[str, float]:
    """Per-task weights from per-group shares, split inside groups as in the paper."""
    return {t: group_shares[g] * f for g in TASK_GROUPS for t, f in _within_group(g).items()}


def mixture_weights(
    name: str | Mapping[str, float], sizes: Mapping[str, int] | None = None
) -> dict[str, float]:
    """Per-task sampling probabilities of a named mixture, renormalised over tasks with data.

    Args:
        name: one of ``MIXTURES``, or a dict of explicit task weights (e.g. for an ablation
            ``{"direct_report": 54, "vqa": 11, ...}``).
        sizes: task -> number of usable examples (studies). Tasks with size 0 or absent are
            dropped with a warning. None = assume every task of the mixture has data (not
            allowed for ``proportional``).

    Returns:
        task -> probability, summing to 1, tasks in ``MIXTURE_TASKS`` order.
    """
    if isinstance(name, Mapping):
        check_tasks(list(name))
        weights = {t: float(w) for t, w in name.items()}
    elif name == "paper":
        weights = paper_weights()
    elif name == "uniform":
        weights = {t: 1.0 for t in MIXTURE_TASKS}
    elif name == "equal_groups":
        third = 100.0 / 3
        image_understanding = GROUP_SHARES["classification"] + GROUP_SHARES["localization"]
        weights = paper_weights(
            {
                "report": third,
                "classification": third * GROUP_SHARES["classification"] / image_understanding,
                "localization": third * GROUP_SHARES["localization"] / image_understanding,
                "vqa": third,
            }
        )
    elif name == "proportional":
        if sizes is None:
            raise MixtureError("mixture 'proportional' needs the task sizes")
        weights = {t: float(sizes.get(t, 0)) for t in MIXTURE_TASKS}
    else:
        raise MixtureError(
            f"unknown mixture '{name}': choose one of {', '.join(MIXTURES)} or pass a dict of "
            f"task weights"
        )
    if any(w < 0 for w in weights.values()):
        raise MixtureError(f"mixture weights must be >= 0, got {weights}")
    if sizes is not None:
        empty = [t for t, w in weights.items() if w > 0 and sizes.get(t, 0) <= 0]
        if empty and isinstance(name, Mapping):  # tasks asked for by name: never drop silently
            raise MixtureError(
                f"task(s) {', '.join(empty)} of the given weights have no data (no study can make "
                f"them; sizes {dict(sizes)}): remove them from the weights or build data with them"
            )
        if empty:
            warnings.warn(
                f"mixture '{name}': no data for {', '.join(empty)}; their share is "
                f"redistributed over the other tasks",
                stacklevel=2,
            )
        weights = {t: w for t, w in weights.items() if t not in empty}
    weights = {t: w for t, w in weights.items() if w > 0}
    total = sum(weights.values())
    if total <= 0:
        raise MixtureError(f"mixture '{name}' has no task with data (sizes: {dict(sizes or {})})")
    return {t: w / total for t, w in weights.items()}


def group_shares(weights: Mapping[str, float]) -> dict[str, float]:
    """Sum task probabilities per group (``report``, ``classification``, ...; the direct report
    prompts count as ``report``; others: ``extra``)."""
    group_of = {t: g for g, tasks in TASK_GROUPS.items() for t in tasks}
    group_of.update({t: "report" for t in DIRECT_REPORT_TASKS})  # notebook 08's no-CoT arms
    out: dict[str, float] = {}
    for task, w in weights.items():
        g = group_of.get(task.split("@", 1)[0], "extra")  # "task@source" on real data
        out[g] = out.get(g, 0.0) + w
    return out


class TaskSampler:
    """Draws task names with fixed probabilities from a seeded NumPy generator.

    Args:
        weights: task -> weight (need not sum to 1), e.g. from ``mixture_weights``.
        seed: seed of the generator; the same seed gives the same sequence.
    """

    def __init__(self, weights: Mapping[str, float], seed: int = 0):
        if not weights:
            raise MixtureError("TaskSampler needs at least one task weight")
        self.tasks: list[str] = list(weights)
        p = np.array([float(weights[t]) for t in self.tasks])
        if (p < 0).any() or p.sum() <= 0:
            raise MixtureError(f"weights must be >= 0 with a positive sum, got {dict(weights)}")
        self.probs = p / p.sum()
        self.rng = np.random.default_rng(seed)

    def sample(self, n: int | None = None) -> str | list[str]:
        """One task name, or a list of ``n``."""
        idx = self.rng.choice(len(self.tasks), size=n if n is not None else 1, p=self.probs)
        names = [self.tasks[i] for i in idx]
        return names if n is not None else names[0]

    def draw(self, rng: np.random.Generator) -> str:
        """One task name from an outside generator (for index-seeded, order-free datasets)."""
        return self.tasks[int(rng.choice(len(self.tasks), p=self.probs))]

    def expected(self) -> dict[str, float]:
        return dict(zip(self.tasks, self.probs.tolist()))


def check_tasks(tasks: Sequence[str]) -> None:
    """Raise if a name is not a task of the mixture or of ``EXTRA_TASKS``."""
    from cxrlib.data.conversations import ALL_TASKS

    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown:
        raise MixtureError(f"unknown task(s) {unknown}; known tasks: {', '.join(ALL_TASKS)}")
