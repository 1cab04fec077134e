"""Build, save and load a preset's datasets, and serve them as tokenized conversations.

Two sources make one set of study records (schema in the team brief):

- **IU-Phantom**: every IU X-ray study with a Findings section (``cxrlib.data.iuxray``), its
  findings from the study's MeSH terms (``cxrlib.data.labels``), and a frontal + lateral
  PhantomCXR image (``cxrlib.data.phantom``) rendered from exactly those findings, so the real
  report describes the pixels. ``data.max_studies`` caps the count (a seeded sample).
  MeSH terms index the whole report (impression included, hedges ignored) while the target is the
  cleaned Findings section, so ``reconcile_findings`` first makes findings, labels and text agree
  (the card takes the CoT labels "from the report's Findings section"): a MeSH finding the
  Findings text does not state is dropped and one it hedges becomes uncertain (judged by the
  rule-based labeler ``cxrlib.labeler``, the one that scores reports). ``stats.json`` counts both.
- **Longitudinal**: ``data.longitudinal_patients`` patients with a prior and a current study
  (``cxrlib.data.longitudinal``); both share the patient seed (same anatomy). Each split's cases
  are composed from that split's IU sentences only, so no test sentence reaches training.

Splits are by study for IU (computed over ALL IU studies with findings, so the test set does not
depend on the cap) and by patient for the longitudinal set. ``build_datasets`` writes into
``out_dir``: ``images.npy`` (N, H, W) uint8, ``studies.jsonl``, ``splits.json``, ``config.json``
and ``stats.json``.

    info = build_datasets(cfg, run.out / "data")                 # notebook 01
    data = load_datasets(run.out / "data")                       # later notebooks
    ds = ConversationDataset(data.studies, data.images, tokenizer, cfg, split="train")
    loader = DataLoader(ds, batch_size=8, collate_fn=ds.collate)

Each item of ``ConversationDataset`` is a task drawn from the mixture, a study that supports it,
the encoded conversation and the raw uint8 images (``cxrlib.model.ImageProcessor`` turns them
into pixel values). Introduced in notebook 01.
"""

from __future__ import annotations

import json
import os
import time
import warnings
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cxrlib.config import load_config, save_config
from cxrlib.constants import (
    CHEXPERT_LABELS,
    DIRECT_REPORT_TASKS,
    FRONTAL_VIEWS,
    LATERAL_VIEW,
    NOTEBOOKS,
    POSITIVE,
    TASK_GROUPS,
)
from cxrlib.data.conversations import (
    ALL_TASKS,
    NOT_FOUND,
    build_conversation,
    cot_answer,
    has_finding_box,
    rare_finding_repeats,
    supported_tasks,
)
from cxrlib.data.iuxray import load_iu_reports
from cxrlib.data.labels import (
    SPLITS,
    Finding,
    coverage_summary,
    labels_from_findings,
    make_splits,
    mesh_coverage,
    mesh_to_findings,
    save_splits,
)
from cxrlib.data.longitudinal import build_longitudinal
from cxrlib.data.mixture import MIXTURE_TASKS, TaskSampler, check_tasks, mixture_weights
from cxrlib.data.phantom import render
from cxrlib.data.sources import (
    IMAGE_FILES,
    build_source_datasets,
    open_image_store,
    selected_sources,
)
from cxrlib.data.sources.mixture import official_weights, uses_official_mixture
from cxrlib.data.tokenize import collate, encode_conversation
from cxrlib.labeler import label_report
from cxrlib.utils import require_artifact

MADE_BY = NOTEBOOKS["data"]
# Report-generation tasks, whose pools ``abnormal_repeats`` class-balances.
REPORT_TASKS = (*TASK_GROUPS["report"], *DIRECT_REPORT_TASKS)
# Tasks that ask whether a finding is there and where, whose pools ``boxed_repeats`` balances.
FINDING_BOX_TASKS = ("finding_grounding", "multi_finding_grounding")
FILES = ("images.npy", "studies.jsonl", "splits.json", "config.json", "stats.json")
MAX_TRIES = 20  # studies tried before giving up on a drawn task
PHANTOM_MAX_IMAGES = 2  # the renderer draws a frontal and a lateral view
MAX_IMAGES_PER_CONVERSATION = 5  # the card: multi-image prompts use up to 5 images of a study


@dataclass
class DatasetInfo:
    """What ``build_datasets`` made (also saved as ``stats.json``)."""

    out_dir: str
    num_studies: int
    num_images: int
    image_hw: list[int]
    studies_per_source: dict[str, int]
    split_sizes: dict[str, int]  # studies per split
    split_sizes_by_source: dict[str, dict[str, int]]
    images_per_split: dict[str, int]
    task_sizes: dict[str, dict[str, int]]  # split -> task -> studies that support it
    label_prevalence: dict[str, float]  # share of studies with label == 1
    label_counts: dict[str, int]
    longitudinal_changes: dict[str, int]
    iu: dict  # parse statistics and MeSH coverage
    build_seconds: float
    render_seconds: float
    images_per_second: float
    phases: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Datasets:
    """The saved datasets of a preset, as ``load_datasets`` returns them."""

    studies: list[dict]
    images: np.ndarray  # (N, H, W) uint8, memory-mapped
    splits: dict[str, str]  # study_id -> split
    cfg: dict  # the configuration the data was built with
    stats: dict

    def split(self, name: str) -> list[dict]:
        """The study records of one split (``train``, ``val`` or ``test``)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split '{name}': use one of {', '.join(SPLITS)}")
        return [s for s in self.studies if s["split"] == name]


# --- building -------------------------------------------------------------------------------------


def _seed(*parts) -> int:
    """A stable non-negative 31-bit seed from strings/ints (Python's hash() is salted per run)."""
    return zlib.crc32(":".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def _render_job(job: dict) -> tuple[np.ndarray, dict]:
    """Render one image; top-level so a process pool can pickle it."""
    findings = [Finding.from_dict(f) for f in job["findings"]]
    out = render(findings, job["view"], tuple(job["size"]), job["patient_seed"], job["acq_seed"])
    record = {
        "view": out.view,
        "hw": list(out.image.shape),
        "finding_boxes": [
            {"finding": f.to_dict(), "box": [round(float(v), 2) for v in box]}
            for f, box in out.finding_boxes
        ],
        "organ_boxes": {k: [round(float(v), 2) for v in b] for k, b in out.organ_boxes.items()},
    }
    return out.image, record


def reconcile_findings(
    findings: list[Finding], findings_text: str
) -> tuple[list[Finding], dict[str, int | None], Counter]:
    """Make MeSH findings agree with what the Findings text states (rule-based labeler).

    Args:
        findings: the study's findings from its MeSH terms.
        findings_text: the (cleaned) Findings section, the training target.

    Returns:
        (findings kept, the study's 14 labels, counts of ``kept``/``uncertain``/``dropped``).
        Text negatives ("No pneumothorax.") become explicit 0 labels.
    """
    text = label_report(findings_text)
    counts: Counter = Counter()
    out = []
    for f in findings:
        status = text.get(f.observation)
        if status == POSITIVE:
            out.append(replace(f, status=POSITIVE))
            counts["kept"] += 1
        elif status == -1:
            out.append(replace(f, status=-1))
            counts["uncertain"] += 1
        else:
            counts["dropped"] += 1
    # Observations only the text states are NOT added: the rule-based labeler misreads long
    # negation lists ("no focal consolidation, suspicious opacity, or effusion") often enough that
    # adding them would draw findings the report denies.
    present = {f.observation for f in out}
    negatives = [o for o in CHEXPERT_LABELS[1:] if text.get(o) == 0 and o not in present]
    return out, labels_from_findings(out, negatives), counts


def _views(report, max_images: int) -> list[str]:
    """One frontal (the study's own PA/AP if known, else PA) and, if allowed, one lateral."""
    frontal = next((im.view for im in report.images if im.view in FRONTAL_VIEWS), "PA")
    return [frontal, LATERAL_VIEW][: max(1, max_images)]


def _render_all(jobs: list[dict], workers: int, desc: str) -> list[tuple[np.ndarray, dict]]:
    if workers <= 1 or len(jobs) < 64:
        return [_render_job(j) for j in tqdm(jobs, desc=desc, leave=False)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        chunk = max(4, min(64, len(jobs) // (workers * 16)))  # small: a live progress bar
        return list(tqdm(pool.map(_render_job, jobs, chunksize=chunk), total=len(jobs),
                         desc=desc, leave=False))  # fmt: skip


def _check_cfg(cfg: dict) -> dict:
    try:
        data = cfg["data"]
        size = data["render_size"]
    except (KeyError, TypeError):
        raise ValueError(
            "cfg has no data.render_size: pass a resolved preset (cxrlib.config.load_preset)"
        ) from None
    if data["max_images_per_study"] > PHANTOM_MAX_IMAGES:
        raise ValueError(
            f"data.max_images_per_study {data['max_images_per_study']}: IU-Phantom renders at most "
            f"{PHANTOM_MAX_IMAGES} images per study (frontal + lateral); set it to 1 or 2, or use "
            f"a real source with more views (data.source: mimic_cxr, docs/datasets.md)"
        )
    if len(size) != 2 or min(size) < 16:
        raise ValueError(f"data.render_size {size} is impossible: need [height, width] >= 16")
    if data["max_studies"] is not None and data["max_studies"] < 1:
        raise ValueError(f"data.max_studies must be >= 1 or null, got {data['max_studies']}")
    if data["longitudinal_patients"] < 0:
        raise ValueError("data.longitudinal_patients must be >= 0")
    return data


def build_datasets(
    cfg: dict,
    out_dir: str | Path,
    workers: int | None = None,
    archive: str | Path | None = None,
    reconcile: bool = True,
) -> DatasetInfo:
    """Build IU-Phantom + the longitudinal set for a preset and save them in ``out_dir``.

    Args:
        cfg: a resolved preset (``cxrlib.config.load_preset``); uses ``cfg["data"]`` and
            ``cfg["seed"]``.
        out_dir: folder to write ``images.npy``, ``studies.jsonl``, ``splits.json``,
            ``config.json`` and ``stats.json`` into (created; existing files are replaced).
        workers: processes that render images (default: up to 4, one per CPU core).
        archive: the IU report archive (default: the copy in the torchxrayvision wheel).
        reconcile: make MeSH findings agree with the Findings text (``reconcile_findings``);
            False keeps the MeSH findings and labels as they are.

    Returns:
        A ``DatasetInfo`` with sizes, split sizes, task sizes, label prevalence and timings.
    """
    if selected_sources(cfg):  # a real dataset: its adapters (cxrlib.data.sources)
        return build_source_datasets(cfg, out_dir)
    start = time.perf_counter()
    data = _check_cfg(cfg)
    seed = int(cfg.get("seed", 0))
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    phases = {}

    # 1. IU reports with a Findings section; splits over all of them, then the (seeded) cap.
    reports, parse_stats = load_iu_reports(archive)
    with_findings = [r for r in reports if r.findings.strip()]
    iu_splits = make_splits([r.study_id for r in with_findings], data["val_fraction"],
                            data["test_fraction"], data["split_seed"])  # fmt: skip
    chosen = with_findings
    if data["max_studies"] is not None and data["max_studies"] < len(with_findings):
        pick = np.random.default_rng(data["split_seed"]).choice(
            len(with_findings), data["max_studies"], replace=False
        )
        chosen = [with_findings[i] for i in sorted(pick)]
    phases["parse"] = time.perf_counter() - start

    size = list(data["render_size"])
    records, jobs = [], []  # jobs[k] renders image k; records point at their jobs by index
    reconciled: Counter = Counter()
    for r in chosen:
        findings, _ = mesh_to_findings(r.mesh)
        labels = labels_from_findings(findings)
        if reconcile:
            findings, labels, counts = reconcile_findings(findings, r.findings)
            reconciled.update(counts)
        record = {
            "study_id": r.study_id, "patient_id": r.study_id,  # IU: one study per patient
            "split": iu_splits[r.study_id], "source": "iu",
            "findings_text": r.findings, "impression": r.impression,
            "labels": labels, "findings": [f.to_dict() for f in findings],
            "images": [], "prior": None, "changes": None,
        }  # fmt: skip
        pseed = _seed(seed, r.study_id)
        for k, view in enumerate(_views(r, data["max_images_per_study"])):
            record["images"].append(len(jobs))
            jobs.append(dict(findings=record["findings"], view=view, size=size,
                             patient_seed=pseed, acq_seed=_seed(seed, r.study_id, k)))  # fmt: skip
        records.append(record)

    # 2. Longitudinal patients, split by patient; each split's cases use that split's sentences.
    t = time.perf_counter()
    n_long = data["longitudinal_patients"]
    n_test, n_val = round(data["test_fraction"] * n_long), round(data["val_fraction"] * n_long)
    per_split = {"train": n_long - n_test - n_val, "val": n_val, "test": n_test}
    change_counts: Counter = Counter()
    views = ["PA", LATERAL_VIEW][: max(1, data["max_images_per_study"])]
    for split, n in per_split.items():
        pool = [r for r in with_findings if iu_splits[r.study_id] == split]
        for case in build_longitudinal(pool, n, seed=_seed(seed, "longitudinal", split)):
            pid = f"L{split[:2]}{case.patient_id[1:]}"  # e.g. "Ltr0001", unique across splits
            pseed = _seed(seed, pid)
            prior = _long_record(case.prior, f"{pid}-prior")
            current = _long_record(case.current, f"{pid}-current")
            for k, (study, view) in enumerate(
                [(prior, v) for v in views] + [(current, v) for v in views]
            ):
                study["images"].append(len(jobs))
                jobs.append(dict(findings=study["findings"], view=view, size=size,
                                 patient_seed=pseed, acq_seed=_seed(seed, pid, k)))  # fmt: skip
            current.update(patient_id=pid, split=split, source="longitudinal",
                           prior=prior, changes=dict(case.changes))  # fmt: skip
            change_counts.update(case.changes.values())
            records.append(current)
    phases["longitudinal"] = time.perf_counter() - t

    # 3. Render every image (in parallel), then give the records their image entries.
    t = time.perf_counter()
    rendered = _render_all(jobs, workers, "rendering PhantomCXR")
    render_seconds = time.perf_counter() - t
    phases["render"] = render_seconds
    images = np.stack([im for im, _ in rendered]).astype(np.uint8)

    def attach(study):
        study["images"] = [{"index": k, **rendered[k][1]} for k in study["images"]]

    for rec in records:
        attach(rec)
        if rec["prior"]:
            attach(rec["prior"])

    # 4. Save, then summarise.
    t = time.perf_counter()
    np.save(out_dir / "images.npy", images)
    with open(out_dir / "studies.jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    save_splits({r["study_id"]: r["split"] for r in records}, out_dir / "splits.json")
    save_config(cfg, out_dir)
    phases["save"] = time.perf_counter() - t

    t = time.perf_counter()
    info = DatasetInfo(
        out_dir=str(out_dir),
        num_studies=len(records),
        num_images=int(images.shape[0]),
        image_hw=list(images.shape[1:]),
        studies_per_source=dict(Counter(r["source"] for r in records)),
        split_sizes={s: sum(r["split"] == s for r in records) for s in SPLITS},
        split_sizes_by_source={
            src: {s: sum(r["split"] == s and r["source"] == src for r in records) for s in SPLITS}
            for src in ("iu", "longitudinal")
        },
        images_per_split={
            s: sum(_num_images(r) for r in records if r["split"] == s) for s in SPLITS
        },
        task_sizes=task_sizes(records),
        label_counts=(lc := label_counts(records)),
        label_prevalence={k: round(v / max(1, len(records)), 4) for k, v in lc.items()},
        longitudinal_changes=dict(change_counts),
        iu={
            "reports": parse_stats.parsed,
            "with_findings": len(with_findings),
            "used": len(chosen),
            "skipped_xml": len(parse_stats.skipped),
            "dropped_deid_sentences": parse_stats.dropped_sentences,
            "mesh_coverage": coverage_summary(mesh_coverage(chosen)),
            "reconciled_findings": dict(reconciled),
        },
        build_seconds=0.0,
        render_seconds=round(render_seconds, 2),
        images_per_second=round(len(jobs) / max(render_seconds, 1e-9), 1),
        phases={},
    )
    phases["stats"] = time.perf_counter() - t
    info.phases = {k: round(v, 2) for k, v in phases.items()}
    info.build_seconds = round(time.perf_counter() - start, 2)
    (out_dir / "stats.json").write_text(json.dumps(info.to_dict(), indent=2))
    return info


def _long_record(study, study_id: str) -> dict:
    findings = [f.to_dict() for f in study.findings]
    return {"study_id": study_id, "findings_text": study.findings_text, "impression": "",
            "labels": study.labels, "findings": findings, "images": []}  # fmt: skip


def _num_images(record: dict) -> int:
    return len(record["images"]) + (len(record["prior"]["images"]) if record["prior"] else 0)


def label_counts(records: list[dict]) -> dict[str, int]:
    """Studies with each CheXpert label positive (== 1)."""
    return {k: sum(r["labels"].get(k) == POSITIVE for r in records) for k in CHEXPERT_LABELS}


def task_sizes(records: list[dict], tasks=ALL_TASKS) -> dict[str, dict[str, int]]:
    """split -> task -> number of studies that can make a conversation of that task."""
    out = {s: dict.fromkeys(tasks, 0) for s in SPLITS}
    for rec in records:
        for task in supported_tasks(rec, tasks):
            out[rec["split"]][task] += 1
    return out


# --- loading --------------------------------------------------------------------------------------


def load_datasets(out_dir: str | Path) -> Datasets:
    """Load what ``build_datasets`` saved (images memory-mapped).

    Raises:
        MissingArtifactError: a file is missing (run notebook 01-data-prep).
        ValueError: the files disagree (an interrupted build): rebuild.
    """
    out_dir = Path(out_dir)
    real = (out_dir / IMAGE_FILES).exists()  # a real-source build: images stay files
    for name in FILES:
        if not (real and name == "images.npy"):
            require_artifact(out_dir / name, made_by=MADE_BY)
    if real:
        images = open_image_store(out_dir, load_config(out_dir))
    else:
        images = np.load(out_dir / "images.npy", mmap_mode="r")
    with open(out_dir / "studies.jsonl") as f:
        studies = [json.loads(line) for line in f if line.strip()]
    splits = json.loads((out_dir / "splits.json").read_text())
    top = max((im["index"] for s in studies for im in _all_images(s)), default=-1)
    if images.ndim != 3 or images.dtype != np.uint8 or top >= len(images):
        raise ValueError(
            f"{out_dir}: images.npy {images.shape} {images.dtype} does not match studies.jsonl "
            f"(needs {top + 1} uint8 images): the build was interrupted; rerun notebook {MADE_BY}"
        )
    if set(splits) != {s["study_id"] for s in studies}:
        raise ValueError(f"{out_dir}: splits.json and studies.jsonl list different studies; "
                         f"rerun notebook {MADE_BY}")  # fmt: skip
    stats = json.loads((out_dir / "stats.json").read_text())
    return Datasets(studies, images, splits, load_config(out_dir), stats)


def check_max_images(studies: list[dict], limit: int = MAX_IMAGES_PER_CONVERSATION) -> int:
    """Warn when studies have more images than a report conversation uses (the card: 5).

    Returns the number of such studies (0: nothing is cut)."""
    over = [
        s for s in studies for st in (s, s.get("prior") or {}) if len(st.get("images", [])) > limit
    ]
    if over:
        cut = sum(len(st.get("images", [])) - limit for s in over
                  for st in (s, s.get("prior") or {}) if len(st.get("images", [])) > limit)  # fmt: skip
        warnings.warn(f"{len(over)} studies have more than {limit} images: report conversations use "
                      f"the first {limit} of each ({cut} images left out of multi-image prompts)",
                      stacklevel=3)  # fmt: skip
    return len(over)


def _all_images(study: dict) -> list[dict]:
    return study["images"] + (study["prior"]["images"] if study.get("prior") else [])


# --- serving ----------------------------------------------------------------------------------------


class ConversationDataset(torch.utils.data.Dataset):
    """Conversations drawn from a task mixture, tokenized, with their raw images.

    Item ``i`` is deterministic in ``(seed, i)``: a task drawn with the mixture's probabilities,
    then a random study of the split that supports it, then the conversation's random choices.

    Args:
        studies: study records (all splits; filtered by ``split``).
        images: the ``(N, H, W)`` uint8 array of ``images.npy``.
        tokenizer: the preset's tokenizer, or None to get un-tokenized conversations.
        cfg: the preset (``data.mixture``, ``data.samples_per_study``, ``projector.num_queries``,
            ``llm.max_length``).
        tasks: a list of tasks sampled uniformly (e.g. ``["report_only"]`` for phase 1) or a dict
            of task weights; overrides ``mixture``.
        mixture: a mixture name (``cxrlib.data.mixture.MIXTURES``); default ``cfg["data"]["mixture"]``.
        split: ``train``, ``val``, ``test`` or None (all studies).
        seed: seeds the draws.
        length: items per epoch; default ``samples_per_study`` x studies for train, else one
            per study.
    """

    def __init__(
        self,
        studies: list[dict],
        images: np.ndarray,
        tokenizer=None,
        cfg: dict | None = None,
        tasks: list[str] | dict[str, float] | None = None,
        mixture: str | None = None,
        split: str | None = "train",
        seed: int = 0,
        length: int | None = None,
        abnormal_repeats: int = 1,
        boxed_repeats: int = 1,
        rare_finding_power: float = 0.0,
    ):
        if cfg is None:
            raise ValueError("ConversationDataset needs the preset config (cfg)")
        if split is not None and split not in SPLITS:
            raise ValueError(f"unknown split '{split}': use one of {', '.join(SPLITS)} or None")
        self.studies = [s for s in studies if split is None or s["split"] == split]
        if not self.studies:
            raise ValueError(f"no studies in split '{split}': was the dataset built?")
        self.images, self.tokenizer, self.cfg, self.seed = images, tokenizer, cfg, seed
        self.num_image_tokens = cfg["projector"]["num_queries"]
        self.max_length = cfg["llm"]["max_length"]
        named = cfg["data"]["mixture"] if isinstance(cfg["data"]["mixture"], dict) else {}
        # a dict mixture may name tasks outside the mixture (notebook 08's direct report prompts)
        candidates = (
            list(tasks)
            if tasks is not None
            else list(MIXTURE_TASKS) + [t for t in named if t not in MIXTURE_TASKS]
        )
        check_tasks(candidates)
        check_max_images(self.studies)  # warns: the card uses at most 5 images per study
        self.pools = {t: [] for t in candidates}
        per_source: dict[str, list[int]] = {}  # "task@source" -> studies (the official mixture)
        for name, value in (
            ("abnormal_repeats", abnormal_repeats),
            ("boxed_repeats", boxed_repeats),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if rare_finding_power < 0:
            raise ValueError(f"rare_finding_power must be >= 0, got {rare_finding_power}")
        rarity = rare_finding_repeats(self.studies, rare_finding_power)
        for i, study in enumerate(self.studies):
            abnormal = cot_answer(study["labels"]) != NOT_FOUND
            boxed = has_finding_box(study)
            for task in supported_tasks(study, candidates):
                # class balance (train.phase2.abnormal_repeats / boxed_repeats): a study with a
                # positive CoT finding is drawn abnormal_repeats times as often for the report
                # tasks, one with a finding box boxed_repeats times as often for the tasks that
                # ask where a finding is (else most of their answers are "Not present.")
                k = 1
                if task in REPORT_TASKS and abnormal:
                    k = abnormal_repeats * rarity[i]
                elif task in FINDING_BOX_TASKS and boxed:
                    k = boxed_repeats
                self.pools[task] += [i] * k
                per_source.setdefault(f"{task}@{study['source']}", []).extend([i] * k)
        sizes = {t: len(p) for t, p in self.pools.items()}
        name = mixture or cfg["data"]["mixture"]
        if tasks is None and name == "paper" and uses_official_mixture(self.studies):
            # Real sources: the release's (task, dataset) weights over "task@source" pools.
            self.pools = per_source
            self.weights = official_weights({k: len(p) for k, p in per_source.items()})
        elif isinstance(tasks, dict):
            self.weights = mixture_weights(dict(tasks), sizes)
        elif tasks is not None:
            self.weights = mixture_weights(dict.fromkeys(tasks, 1.0), sizes)
        else:
            self.weights = mixture_weights(name, sizes)
        self.sampler = TaskSampler(self.weights, seed)
        per_study = cfg["data"]["samples_per_study"] if split == "train" else 1
        self.length = length if length is not None else per_study * len(self.studies)
        pad = tokenizer.pad_token_id if tokenizer is not None else 0
        self.collate = partial(collate, pad_id=pad, padding_side="right")

    def __len__(self) -> int:
        return self.length

    def conversation(self, i: int) -> dict:
        """The (un-tokenized) conversation of item ``i``."""
        if not 0 <= i < self.length:
            raise IndexError(f"item {i} out of range for a dataset of {self.length}")
        rng = np.random.default_rng([self.seed, i])
        key = self.sampler.draw(rng)
        task, pool = key.split("@", 1)[0], self.pools[key]  # "task" or "task@source"
        for _ in range(MAX_TRIES):  # a study may fail a task on an unlucky draw (rare)
            conv = build_conversation(task, self.studies[pool[int(rng.integers(len(pool)))]], rng)
            if conv is not None:
                return conv
        raise RuntimeError(f"no study of this split could make a '{task}' conversation")

    def __getitem__(self, i: int) -> dict:
        conv = self.conversation(i)
        item = {"task": conv["task"], "meta": conv["meta"], "conversation": conv,
                "image_indices": conv["images"],
                "images": [np.asarray(self.images[j], dtype=np.uint8) for j in conv["images"]]}  # fmt: skip
        if self.tokenizer is not None:  # warns (and flags ``truncated``) when text is cut
            item.update(encode_conversation(conv, self.tokenizer, self.num_image_tokens,
                                            self.max_length))  # fmt: skip
        return item
