"""Notebook 08's ablations: each arm is a change to the preset, trained and scored the same way.

An arm is a short phase 2 (``ablation.steps`` steps, the preset's seed and schedule) that starts
from the shared phase-1 checkpoint of ``make all`` (``<out>/phase1``), or from a phase 1 of its own
when it changes the projector (tokens per image, depth). Every arm is scored on the same held-out
test studies and the same grounding / VQA questions (``score_arm``), every number with a 95%
bootstrap interval. Runs are cached by configuration: an arm's folder is named after a hash of
everything its training depends on, so a second run of the notebook trains only what changed.

    arms = sweep(full=False)                       # the default, `make all` sized sweep
    cfg = arm_config("tiny", {}, arms[0], steps=200, seed=0)
    folder = train_arm(cfg, arms[0], run.out, device="cpu")
    card = score_arm(folder, arms[0], data, test, labeler, ...)

The paper's ablations (its release configures them): no chain of thought (a single-turn report);
no CoT with the classification turn as a task of its own; no VQA; no image understanding; sampling
ratios (uniform per dataset, equal thirds per task group in two variants, proportional to size).
Its three open questions: projector design for multi-image and multi-study inputs, lateral vs
frontal views (an evaluation of the main model: ``evaluate.view_f1_by_finding``), the VQA share.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrlib import engine, evaluate, metrics
from cxrlib.config import load_preset, merge_overrides, num_patches
from cxrlib.constants import DIRECT_REPORT_TASKS, FRONTAL_VIEWS, TASK_GROUPS
from cxrlib.data.conversations import build_conversation
from cxrlib.data.mixture import GROUP_SHARES, group_shares, mixture_weights, paper_weights
from cxrlib.inference import LocalBackend, generate_reports, run_conversations
from cxrlib.phases import ARTIFACT_FILES, stage_dir, stage_identity
from cxrlib.train import run_stage

QUESTIONS = {
    "recipe": "reference",
    "cot": "1. Chain of thought",
    "task_groups": "2. Task groups",
    "sampling": "3. Sampling ratios",
    "projector": "4. Projector design (open question 1)",
    "vqa_share": "6. VQA share (open question 3)",
}
RECIPE = "recipe"  # the preset's own mixture and projector: every question's reference arm
SHARED = ("data", "tokenizer", "backbones")  # what every arm reads from the main run


@dataclass(frozen=True)
class Arm:
    """One ablation arm: a name, the question it answers and the preset change that makes it."""

    name: str
    question: str
    changes: dict = field(default_factory=dict)  # nested preset overrides (as OVERRIDES)
    cot: bool = True  # its reports are asked with the CoT prompt (False: the direct prompt)
    own_phase1: bool = False  # the change reaches phase 1 (the projector): train phase 1 too
    value: float | None = None  # the swept number (VQA share %, tokens per image), for plots


# --- the mixtures of the arms -------------------------------------------------------------------


def _percent(weights: dict[str, float]) -> dict[str, float]:
    """Weights as percentages of their sum, zero weights dropped: two constructions of the same
    mixture give the same dict (and so the same cache key)."""
    total = sum(weights.values())
    return {t: round(100 * w / total, 9) for t, w in weights.items() if w > 0}


def mixture_with_groups(**shares: float) -> dict[str, float]:
    """Per-task weights with some group shares changed (others as the card), split inside groups
    as in the paper: ``mixture_with_groups(vqa=0)`` is the card's mixture without VQA."""
    unknown = set(shares) - set(GROUP_SHARES)
    if unknown:
        raise ValueError(f"unknown task group(s) {sorted(unknown)}; groups: {list(GROUP_SHARES)}")
    return _percent(paper_weights({**GROUP_SHARES, **shares}))


def mixture_with_vqa_share(share: float) -> dict[str, float]:
    """The card's mixture with VQA at ``share`` percent and the other groups scaled to the rest
    (the card's own VQA share is 11%)."""
    if not 0 <= share < 100:
        raise ValueError(f"a VQA share is a percentage in [0, 100), got {share}")
    rest = sum(v for g, v in GROUP_SHARES.items() if g != "vqa")
    scaled = {g: v * (100 - share) / rest for g, v in GROUP_SHARES.items() if g != "vqa"}
    return mixture_with_groups(**scaled, vqa=share)


def no_cot_mixture(classification_task: bool = False) -> dict[str, float]:
    """The card's mixture with each CoT report task replaced by the direct (single-turn) prompt
    in the same input mode and with the same weight.

    ``classification_task``: the paper's "no CoT + classification": half of the report share
    goes to the direct reports, the other half to the CoT's first turn asked on its own
    (``multi_label``), so the model still learns to name findings but not to report from them.
    """
    weights = paper_weights()
    for cot_task, direct in zip(TASK_GROUPS["report"], DIRECT_REPORT_TASKS):
        weights[direct] = weights.pop(cot_task)
    if classification_task:
        moved = 0.0
        for task in DIRECT_REPORT_TASKS:
            weights[task] /= 2
            moved += weights[task]
        weights["multi_label"] += moved
    return _percent(weights)


def equal_groups_uniform() -> dict[str, float]:
    """Equal thirds for report / image understanding / VQA, every task equal inside its third
    (the second variant of the release's equal-thirds ablation; the first, ``equal_groups``,
    keeps the card's proportions inside each third)."""
    groups = {"report": ["report"], "image": ["classification", "localization"], "vqa": ["vqa"]}
    weights = {}
    for parts in groups.values():
        tasks = [t for g in parts for t in TASK_GROUPS[g]]
        weights.update({t: 100 / 3 / len(tasks) for t in tasks})
    return _percent(weights)


# --- the sweep ------------------------------------------------------------------------------------

DEFAULT_SWEEP = {  # sized for `make all` under tiny (notebook 08's FULL=False)
    "cot": ["no CoT"],
    "task_groups": ["no VQA"],
    "sampling": ["uniform"],
    "vqa_share": [0, 40],
    "tokens": None,  # the preset's ablation.projector_tokens (tiny: none, each needs a phase 1)
    "depths": [],
}
FULL_SWEEP = {
    "cot": ["no CoT", "no CoT + classification"],
    "task_groups": ["no VQA", "no image understanding"],
    "sampling": [
        "uniform",
        "equal thirds (card inside)",
        "equal thirds (uniform inside)",
        "proportional",
    ],  # fmt: skip
    "vqa_share": [0, 5, 25, 40],
    "tokens": [4, 36, 64],
    "depths": [1, 3],
}


def _named_arms() -> dict[str, Arm]:
    return {
        "no CoT": Arm("no CoT", "cot", {"data": {"mixture": no_cot_mixture()}}, cot=False),
        "no CoT + classification": Arm(
            "no CoT + classification", "cot",
            {"data": {"mixture": no_cot_mixture(classification_task=True)}}, cot=False,
        ),
        "no VQA": Arm(
            "no VQA", "task_groups", {"data": {"mixture": mixture_with_groups(vqa=0)}}, value=0.0
        ),
        "no image understanding": Arm(
            "no image understanding", "task_groups",
            {"data": {"mixture": mixture_with_groups(classification=0, localization=0)}},
        ),
        "uniform": Arm("uniform", "sampling", {"data": {"mixture": "uniform"}}),
        "equal thirds (card inside)": Arm(
            "equal thirds (card inside)", "sampling", {"data": {"mixture": "equal_groups"}}
        ),
        "equal thirds (uniform inside)": Arm(
            "equal thirds (uniform inside)", "sampling",
            {"data": {"mixture": equal_groups_uniform()}},
        ),
        "proportional": Arm("proportional", "sampling", {"data": {"mixture": "proportional"}}),
    }  # fmt: skip


def sweep(
    full: bool = False,
    vqa_shares: Sequence[float] | None = None,
    tokens: Sequence[int] | None = None,
    depths: Sequence[int] | None = None,
    cfg: dict | None = None,
) -> list[Arm]:
    """The arms to run: the recipe first, then each question's arms.

    Args:
        full: every arm of ``FULL_SWEEP`` instead of ``DEFAULT_SWEEP``.
        vqa_shares, tokens, depths: replace that part of the sweep (VQA share in percent, image
            tokens per image, RegNet blocks per projector stage); None keeps the sweep's.
        cfg: the resolved preset: a swept value equal to the recipe's is the recipe arm itself
            (not trained twice), and tokens beyond the encoder's patch grid are left out.
    """
    plan = dict(FULL_SWEEP if full else DEFAULT_SWEEP)
    for key, value in (("vqa_share", vqa_shares), ("tokens", tokens), ("depths", depths)):
        if value is not None:
            plan[key] = list(value)
    recipe = (cfg or {}).get("projector", {})
    patches = num_patches(cfg) if cfg else None
    named = _named_arms()
    arms = [Arm(RECIPE, "recipe", value=GROUP_SHARES["vqa"])]
    for question in ("cot", "task_groups", "sampling"):
        arms += [named[name] for name in plan[question]]
    for share in plan["vqa_share"]:
        if share == GROUP_SHARES["vqa"] or (share == 0 and "no VQA" in plan["task_groups"]):
            continue  # the recipe's own share, or the "no VQA" arm
        changes = {"data": {"mixture": mixture_with_vqa_share(share)}}
        arms.append(Arm(f"VQA {share:g}%", "vqa_share", changes, value=float(share)))
    if plan["tokens"] is None:
        plan["tokens"] = list(((cfg or {}).get("ablation") or {}).get("projector_tokens", []))
    for n in plan["tokens"]:
        if int(np.sqrt(n)) ** 2 != n:
            raise ValueError(f"tokens per image must be a square number (2x2, 4x4, ...), got {n}")
        if patches is not None and n > patches:
            print(f"{n} tokens per image left out: the encoder has {patches} patches per image")
        elif n != recipe.get("num_queries"):
            arms.append(Arm(f"{n} tokens", "projector", {"projector": {"num_queries": n}},
                            own_phase1=True, value=float(n)))  # fmt: skip
    for d in plan["depths"]:
        if d != recipe.get("depth"):
            arms.append(Arm(f"depth {d}", "projector", {"projector": {"depth": d}},
                            own_phase1=True, value=float(d)))  # fmt: skip
    return arms


def describe_arm(arm: Arm, cfg: dict, sizes: dict[str, int]) -> dict:
    """One row of the arms table: prompt, group shares of its mixture, projector, what changed."""
    shares = group_shares(mixture_weights(cfg["data"]["mixture"], sizes))
    return {
        "arm": arm.name,
        "question": QUESTIONS.get(arm.question, arm.question),
        "report prompt": "CoT" if arm.cot else "direct",
        **{f"{g} %": round(100 * shares.get(g, 0.0), 1) for g in GROUP_SHARES},
        "tokens / image": cfg["projector"]["num_queries"],
        "depth": cfg["projector"]["depth"],
        "own phase 1": arm.own_phase1,
        "changes": ", ".join(_changed_keys(arm.changes)) or "none",
    }


def _changed_keys(changes: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in changes.items():
        if isinstance(value, dict) and key != "mixture":
            out += _changed_keys(value, f"{prefix}{key}.")
        else:
            shown = "task weights" if isinstance(value, dict) else value
            out.append(f"{prefix}{key}={shown}")
    return out


# --- training (cached by configuration) -----------------------------------------------------------


def arm_config(
    preset: str,
    overrides: dict,
    arm: Arm,
    steps: int,
    seed: int,
    tasks_with_data: Sequence[str] | None = None,
) -> dict:
    """The resolved preset of an arm: the notebook's preset and overrides, the arm's change, and
    ``steps`` phase-2 steps (warm-up scaled with them, one validation conversation per task).

    ``tasks_with_data``: the tasks the training split can make (``datasets.task_sizes``); an arm's
    task weights for other tasks are dropped (e.g. finding grounding on MIMIC-CXR alone) with a
    printed note, as a named mixture does.
    """
    base = load_preset(preset, overrides=overrides)
    phase2 = base["train"]["phase2"]
    warmup = round(phase2["warmup_steps"] * steps / phase2["steps"])
    # one validation conversation per task: the arms are compared on the test split, and the
    # validation passes before and after training would otherwise cost as much as 50 steps
    budget = {"steps": steps, "warmup_steps": warmup, "val_per_task": 1}
    change = merge_overrides(arm.changes, {"train": {"phase2": budget}})
    merged = merge_overrides(overrides, change)
    mixture = arm.changes.get("data", {}).get("mixture")
    if mixture is not None:  # replace, never merge with a mixture dict of OVERRIDES
        if isinstance(mixture, dict) and tasks_with_data is not None:
            dropped = [t for t, w in mixture.items() if w > 0 and t not in tasks_with_data]
            if dropped:
                print(f"{arm.name}: no training data for {', '.join(dropped)}; left out")
            mixture = {t: w for t, w in mixture.items() if t in tasks_with_data}
        merged["data"]["mixture"] = mixture
    cfg = load_preset(preset, overrides=merged)
    cfg["seed"] = seed
    return cfg


def arm_key(cfg: dict, arm: Arm, main_out: str | Path) -> str:
    """What an arm's training depends on, hashed: its phase-1 and phase-2 settings and the content
    of the artifacts it shares with the main run (data, tokenizer, backbones, phase 1)."""
    main_out = Path(main_out)
    names = ["data", "tokenizer", "lm_pretrain", "encoder_pretrain"]
    if not arm.own_phase1:
        names.append("phase1")
    inputs = {n: [engine.file_hash(main_out / f) for f in ARTIFACT_FILES[n]] for n in names}
    identity = {
        "phase1": engine.config_hash(cfg, "phase1") if arm.own_phase1 else "shared",
        "phase2": engine.config_hash(cfg, "phase2"),
        "inputs": inputs,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


def arm_dir(cfg: dict, arm: Arm, main_out: str | Path) -> Path:
    """``<out>/ablations/<key>``: arms with the same training (e.g. "no VQA" and "VQA 0%") share
    one folder and are trained once."""
    return Path(main_out) / "ablations" / arm_key(cfg, arm, main_out)


def train_arm(cfg: dict, arm: Arm, main_out: str | Path, device="auto") -> Path:
    """Train (or find trained) one arm; returns its folder, with ``phase2/`` in it.

    The arm's folder links the main run's data, tokenizer and backbones (and its phase 1 unless
    the arm changes the projector). A phase that ``finished`` is not run again, so a cached arm
    costs nothing; an interrupted one resumes from its last checkpoint.
    """
    main_out = Path(main_out)
    folder = arm_dir(cfg, arm, main_out)
    folder.mkdir(parents=True, exist_ok=True)
    linked = list(SHARED) + ([] if arm.own_phase1 else ["phase1"])
    for name in linked:
        source = (main_out / name).resolve()
        if not source.exists():
            made_by = (
                "03-projector-pretraining" if name == "phase1" else "01-data-prep / 02-backbones"
            )
            raise FileNotFoundError(f"{source} is missing: run notebook {made_by} first (make all)")
        link = folder / name
        if not link.exists():
            link.symlink_to(source, target_is_directory=True)
    t0 = time.perf_counter()
    trained = False
    for stage in ("phase1", "phase2") if arm.own_phase1 else ("phase2",):
        if not finished(cfg, stage, folder):
            run_stage(stage, cfg, folder, device=device)
            trained = True
    print(f"{arm.name}: {f'trained in {time.perf_counter() - t0:.0f} s' if trained else 'cached'}"
          f" ({folder.name})")  # fmt: skip
    names_file = folder / "arms.json"  # which arms this folder is (a reader's index)
    names = json.loads(names_file.read_text()) if names_file.exists() else {}
    names[arm.name] = {"question": arm.question, "changes": arm.changes, "cot": arm.cot}
    names_file.write_text(json.dumps(names, indent=1))
    if time.perf_counter() - t0 > 1:
        print(f"trained {arm.name!r} in {time.perf_counter() - t0:.0f} s -> {folder.name}")
    return folder


def finished(cfg: dict, stage: str, folder: str | Path) -> bool:
    """Whether ``stage`` in ``folder`` has trained all its steps with this very identity (settings
    and upstream artifacts) and saved its result: then there is nothing to re-run, not even the
    validation passes ``run_stage`` makes around training."""
    target = stage_dir(stage, folder)
    ckpt = engine.latest_checkpoint(target)
    if ckpt is None or not (target / "summary.json").exists():
        return False
    saved = json.loads((ckpt / engine.STATE_FILE).read_text())
    return saved.get("step") == cfg["train"][stage]["steps"] and not engine.identity_changes(
        saved.get("identity"), stage_identity(cfg, stage, folder)
    )


def training_cost(folder: str | Path) -> dict:
    """Seconds and steps of an arm's phase 2 (and phase 1 when it has its own), from summaries."""
    folder = Path(folder)
    out = {}
    for stage in ("phase1", "phase2"):
        path = stage_dir(stage, folder) / "summary.json"
        if path.exists() and not (folder / stage).is_symlink():
            s = json.loads(path.read_text())
            out[f"{stage}_seconds"] = s.get("stage_seconds")
            out[f"{stage}_steps"] = s.get("steps")
    return out


# --- scoring ------------------------------------------------------------------------------------


def score_questions(test: Sequence[dict], per_task: int, seed: int) -> list[dict]:
    """The grounding, naming and VQA conversations every arm answers: the same ones for every arm
    (seeded), at most ``per_task`` per task."""
    rng = np.random.default_rng(seed)
    tasks = [*evaluate.BOX_TASKS, "multi_finding_grounding", *evaluate.NAMING_TASKS,
             *evaluate.VQA_TASKS]  # fmt: skip
    convs = []
    for task in tasks:
        built = [c for s in test if (c := build_conversation(task, s, rng)) is not None]
        convs += built[:per_task]
    return convs


def _mean_ci(values: Sequence[float], samples: int, seed: int) -> dict:
    """Mean and 95% percentile-bootstrap interval of per-item values."""
    v = np.asarray(values, dtype=float)
    if not len(v):
        return {"mean": None, "ci": None, "n": 0}
    ci = metrics.bootstrap_ci(lambda idx: {"m": float(v[idx].mean())}, len(v), samples, seed)["m"]
    return {"mean": float(v.mean()), "ci": list(ci), "n": int(len(v))}


def score_arm(
    folder: str | Path,
    arm: Arm,
    data,
    test: Sequence[dict],
    questions: Sequence[dict],
    vocabulary: dict[str, set[str]],
    labeler,
    modes: Sequence[str] = ("single",),
    bootstrap: int = 1000,
    seed: int = 0,
    device="auto",
) -> dict:
    """One arm's score card on the test split (notebook 06's measures, with intervals).

    Reports on frontal images (single image; ``modes`` adds multi-image / multi-study), asked
    with the CoT or the direct prompt as the arm was trained: mF1-14, uF1-14 (95% CI), BLEU-4,
    ROUGE-L, the share of outputs that are not reports and of distinct reports; turn-1 findings
    F1 for CoT arms; grounding mIoU (mean over the boxed questions) and VQA exact match with
    intervals; instruction following (``evaluate.instruction_following``) over every answer.
    """
    folder = Path(folder)
    backend = LocalBackend.from_checkpoint(folder / "phase2", device=device)
    study_labels = {s["study_id"]: s["labels"] for s in data.studies}
    card: dict = {"arm": arm.name, "question": arm.question, "cot": arm.cot, "value": arm.value,
                  "tokens_per_image": backend.cfg["projector"]["num_queries"],
                  "projector_depth": backend.cfg["projector"]["depth"],
                  **training_cost(folder), "reports": {}}  # fmt: skip
    report_records = []
    for mode in modes:
        t0 = time.perf_counter()
        recs = generate_reports(backend, test, data.images, mode=mode, cot=arm.cot,
                                frontal_only=True, progress=False)  # fmt: skip
        seconds = time.perf_counter() - t0
        rep = evaluate.report_metrics(recs, labeler, "frontal", bootstrap_samples=bootstrap,
                                      seed=seed, language=mode == "single")  # fmt: skip
        frontal = [r for r in recs if r["views"][0] in FRONTAL_VIEWS]
        entry = {
            "n": rep["n"],
            "mF1-14": rep["clinical"]["mF1-14"],
            "mF1-14 ci": list(rep["clinical_ci"]["mF1-14"]) if bootstrap else None,
            "uF1-14": rep["clinical"]["uF1-14"],
            "uF1-14 ci": list(rep["clinical_ci"]["uF1-14"]) if bootstrap else None,
            "not report %": 100 * rep["degenerate"]["degenerate"] / max(1, rep["degenerate"]["n"]),
            "distinct": len({r["report"] for r in frontal}),
            "seconds per report": seconds / max(1, len(recs)),
        }
        if "language" in rep:
            entry.update({k: rep["language"][k] for k in ("BLEU-4", "ROUGE-L")})
        if arm.cot and mode == "single":
            entry["turn-1 F1"] = evaluate.cot_findings_metrics(frontal, study_labels)["macro_f1"]
        card["reports"][mode] = entry
        report_records += recs
    recs = run_conversations(backend, questions, data.images, max_new_tokens=48, progress=False)
    try:
        grounding = evaluate.grounding_metrics(recs)
    except ValueError:  # no boxed question (a source without boxes)
        grounding = {}
    boxed = {t: g["ious"] for t, g in grounding.items() if t != "overall"}
    card["grounding"] = {
        "mIoU": _mean_ci([i for v in boxed.values() for i in v], bootstrap, seed),
        "by_task": {t: float(np.mean(v)) for t, v in boxed.items() if v},
    }
    vqa = [r for r in recs if r["task"] in evaluate.VQA_TASKS]
    card["vqa"] = _mean_ci([evaluate.exact_match(r) for r in vqa], bootstrap, seed)
    follows = evaluate.instruction_following(recs + report_records, vocabulary)
    card["instruction_following"] = {
        **_mean_ci(follows["items"], bootstrap, seed),
        "by_task": follows["by_task"],
    }
    return card


def cached_score(folder: str | Path, settings: dict, compute) -> dict:
    """``compute()`` once per arm folder and scoring settings (test studies, questions, modes,
    prompt, bootstrap): stored as ``score-<hash>.json`` in the arm's folder."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    path = Path(folder) / f"score-{key[:10]}.json"
    if path.exists():
        return json.loads(path.read_text())
    card = compute()
    path.write_text(json.dumps(card, indent=1, default=float))
    return card


def overlaps(a: Sequence[float] | None, b: Sequence[float] | None) -> bool | None:
    """Whether two intervals overlap (None when one is missing)."""
    if not a or not b:
        return None
    return a[0] <= b[1] and b[0] <= a[1]


# --- reading the results --------------------------------------------------------------------------

# The measures of the results table: (column, where in a score card, scale)
MEASURES = {
    "mF1-14": (("reports", "single", "mF1-14"), 100),
    "uF1-14": (("reports", "single", "uF1-14"), 100),
    "grounding mIoU": (("grounding", "mIoU", "mean"), 1),
    "VQA %": (("vqa", "mean"), 100),
    "follows format %": (("instruction_following", "mean"), 100),
}
CI_OF = {
    "mF1-14": ("reports", "single", "mF1-14 ci"),
    "uF1-14": ("reports", "single", "uF1-14 ci"),
    "grounding mIoU": ("grounding", "mIoU", "ci"),
    "VQA %": ("vqa", "ci"),
    "follows format %": ("instruction_following", "ci"),
}


def _get(card: dict, path: Sequence[str]):
    for key in path:
        if not isinstance(card, dict) or card.get(key) is None:
            return None
        card = card[key]
    return card


def measure(card: dict, name: str, mode: str = "single") -> tuple[float | None, list[float] | None]:
    """One measure of a score card (scaled as in the table) and its 95% interval; ``mode`` picks
    the input mode of a report measure (``single``, ``multi_image``, ``multi_study``)."""
    path, scale = MEASURES[name]
    ci_path = CI_OF[name]
    if path[0] == "reports":
        path, ci_path = ("reports", mode, *path[2:]), ("reports", mode, *ci_path[2:])
    value, ci = _get(card, path), _get(card, ci_path)
    return (
        None if value is None else scale * value,
        None if ci is None else [scale * ci[0], scale * ci[1]],
    )


def error_bars(values: Sequence[float], cis: Sequence[Sequence[float] | None]) -> np.ndarray:
    """Matplotlib ``yerr`` (2 x n) from values and their intervals; a percentile-bootstrap interval
    can lie wholly on one side of its point estimate (small, skewed samples), so bars are clipped
    at 0 rather than drawn negative."""
    err = [[v - ci[0], ci[1] - v] if ci and v == v else [0.0, 0.0] for v, ci in zip(values, cis)]
    return np.clip(np.array(err, dtype=float).reshape(-1, 2).T, 0, None)


def results_table(cards: dict[str, dict]) -> list[dict]:
    """One row per arm: question, arm, each measure as ``value [low, high]``, turn-1 F1, the
    share of outputs that are not reports, distinct reports, tokens per image, training seconds."""
    rows = []
    for name, card in cards.items():
        row = {"question": QUESTIONS.get(card["question"], card["question"]), "arm": name}
        for m in MEASURES:
            value, ci = measure(card, m)
            digits = 3 if m == "grounding mIoU" else 1
            row[m] = (
                "n/a"
                if value is None
                else (
                    f"{value:.{digits}f}"
                    + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")
                )
            )
        single = card["reports"]["single"]
        row["turn-1 F1"] = (
            "n/a" if single.get("turn-1 F1") is None else f"{single['turn-1 F1']:.3f}"
        )
        row["not report %"] = f"{single['not report %']:.1f}"
        row["distinct reports"] = single["distinct"]
        row["tokens / image"] = card["tokens_per_image"]
        row["train s"] = round(sum(card.get(f"{s}_seconds") or 0 for s in ("phase1", "phase2")))
        rows.append(row)
    return rows


def compare_to_recipe(
    cards: dict[str, dict], name: str, measure_name: str, mode: str = "single"
) -> dict:
    """An arm against the recipe on one measure: both values, intervals, and whether the
    intervals overlap (then the toy run cannot tell the two apart)."""
    arm = measure(cards[name], measure_name, mode)
    ref = measure(cards[RECIPE], measure_name, mode)
    return {
        "arm": arm[0], "arm_ci": arm[1], "recipe": ref[0], "recipe_ci": ref[1],
        "overlap": overlaps(arm[1], ref[1]),
    }  # fmt: skip
