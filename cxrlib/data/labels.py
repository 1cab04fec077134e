"""Labels of a study: MeSH terms -> the 14 CheXpert observations, and fixed train/val/test splits.

A ``Finding`` is one positive (or uncertain) observation with where and how bad it is; it is the
record the renderer draws and the conversations talk about. IU studies get theirs from the MeSH
terms a person assigned (``Opacity/lung/base/left/mild`` -> Lung Opacity, left, lower, mild).
Introduced in notebook 01.

    >>> findings, unmapped = mesh_to_findings(["Pleural Effusion/right/small", "Scoliosis"])
    >>> findings[0]
    Finding(observation='Pleural Effusion', side='right', zone=None, severity='mild', status=1)
    >>> labels_from_findings(findings)["Pleural Effusion"], unmapped
    (1, ['Scoliosis'])

Mapping choices (close to the CheXpert labeler's phrase lists): granulomas, nodules and masses are
Lung Lesion; infiltrates, airspace disease, densities and interstitial markings are Lung Opacity;
pulmonary congestion and heart failure are Edema; volume loss is Atelectasis; a blunted
costophrenic angle is an uncertain Pleural Effusion; pleural thickening or scarring is Pleural
Other; "borderline" makes a finding uncertain. Headings with no CheXpert observation (Calcinosis,
Spine, Aorta, Emphysema, ...) are unmapped: counted and reported, never an error. Only ``major``
(human-assigned) terms are mapped.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlib.constants import CHEXPERT_LABELS, NEGATIVE, POSITIVE, UNCERTAIN
from cxrlib.data.iuxray import MeshTerm

OBSERVATIONS = [name for name in CHEXPERT_LABELS if name != "No Finding"]
SIDES = ("left", "right", "bilateral")
ZONES = ("upper", "middle", "lower")
SEVERITIES = ("mild", "moderate", "severe")  # ordered: index = how bad
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Finding:
    """One observation present in a study (``side`` is the patient's side)."""

    observation: str  # one of CHEXPERT_LABELS except "No Finding", e.g. "Pleural Effusion"
    side: str | None = None  # "left" | "right" | "bilateral" | None
    zone: str | None = None  # "upper" | "middle" | "lower" | None
    severity: str | None = None  # "mild" | "moderate" | "severe" | None
    status: int = POSITIVE  # POSITIVE (1) or UNCERTAIN (-1)

    def __post_init__(self):
        for name, value, allowed in [
            ("observation", self.observation, OBSERVATIONS),
            ("side", self.side, (None, *SIDES)),
            ("zone", self.zone, (None, *ZONES)),
            ("severity", self.severity, (None, *SEVERITIES)),
            ("status", self.status, (POSITIVE, UNCERTAIN)),
        ]:
            if value not in allowed:
                raise ValueError(f"Finding.{name}={value!r} is not one of {list(allowed)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Finding:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown Finding keys {sorted(unknown)}; expected a subset of "
                             f"{list(cls.__dataclass_fields__)}")  # fmt: skip
        return cls(**d)


def labels_from_findings(
    findings: Iterable[Finding], mentioned_negative: Iterable[str] = ()
) -> dict[str, int | None]:
    """The 14 CheXpert labels of a study.

    Args:
        findings: the study's positive/uncertain findings.
        mentioned_negative: observations the report explicitly rules out (-> 0).

    Returns:
        {label: 1 | -1 | 0 | None} for every name in CHEXPERT_LABELS (None = not mentioned).
        As in CheXpert, "No Finding" is 1 when no observation other than Support Devices is
        positive or uncertain, else None.
    """
    negative = set(mentioned_negative)
    if negative - set(OBSERVATIONS):
        unknown = sorted(negative - set(OBSERVATIONS))
        raise ValueError(
            f"unknown observations in mentioned_negative: {unknown}; use {OBSERVATIONS}"
        )
    status = defaultdict(set)
    for f in findings:
        status[f.observation].add(f.status)
    labels: dict[str, int | None] = {}
    for name in OBSERVATIONS:
        if POSITIVE in status[name]:
            labels[name] = POSITIVE
        elif UNCERTAIN in status[name]:
            labels[name] = UNCERTAIN
        else:
            labels[name] = NEGATIVE if name in negative else None
    pathologies = [n for n in OBSERVATIONS if n != "Support Devices"]
    abnormal = any(labels[n] in (POSITIVE, UNCERTAIN) for n in pathologies)
    return {"No Finding": None if abnormal else POSITIVE, **labels}


# --- MeSH -> observations ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    observations: tuple[str, ...]
    needs: frozenset = frozenset()  # at least one of these qualifiers must be present
    forbids: frozenset = frozenset()  # none of these may be present
    status: int = POSITIVE


def _rule(*observations, needs=(), forbids=(), status=POSITIVE) -> _Rule:
    return _Rule(tuple(observations), frozenset(needs), frozenset(forbids), status)


_BONES = ("ribs", "thoracic vertebrae", "lumbar vertebrae", "spine", "clavicle", "humerus")
_DEVICE = _rule("Support Devices")
# Lower-case MeSH heading -> rules tried in order; the first whose qualifiers fit wins.
MESH_RULES: dict[str, list[_Rule]] = {
    "cardiomegaly": [_rule("Cardiomegaly")],
    "cardiac shadow": [_rule("Cardiomegaly", needs=["enlarged", "borderline"])],
    "mediastinum": [_rule("Enlarged Cardiomediastinum", needs=["enlarged", "prominent"])],
    "opacity": [_rule("Lung Opacity")],
    "density": [_rule("Lung Lesion", needs=["round"], forbids=_BONES),
                _rule("Lung Opacity", needs=["lung", "retrocardiac"])],
    "airspace disease": [_rule("Lung Opacity")],
    "infiltrate": [_rule("Lung Opacity")],
    "markings": [_rule("Lung Opacity", needs=["interstitial", "prominent"])],
    "lung": [_rule("Lung Opacity", needs=["interstitial"])],
    "lung diseases, interstitial": [_rule("Lung Opacity")],
    "nodule": [_rule("Lung Lesion", forbids=["breast"])],
    "mass": [_rule("Lung Lesion", forbids=["breast"])],
    "calcified granuloma": [_rule("Lung Lesion", forbids=_BONES)],
    "granuloma": [_rule("Lung Lesion", forbids=_BONES)],
    "cavitation": [_rule("Lung Lesion")],
    "pulmonary edema": [_rule("Edema")],
    "pulmonary congestion": [_rule("Edema")],
    "heart failure": [_rule("Edema")],
    "consolidation": [_rule("Consolidation")],
    "pneumonia": [_rule("Pneumonia")],
    "pulmonary atelectasis": [_rule("Atelectasis")],
    "volume loss": [_rule("Atelectasis")],
    "pneumothorax": [_rule("Pneumothorax")],
    "hydropneumothorax": [_rule("Pneumothorax", "Pleural Effusion")],
    "hemopneumothorax": [_rule("Pneumothorax", "Pleural Effusion")],
    "pleural effusion": [_rule("Pleural Effusion")],
    "hemothorax": [_rule("Pleural Effusion")],
    "costophrenic angle": [_rule("Pleural Effusion", needs=["blunted"], status=UNCERTAIN)],
    "sulcus": [_rule("Pleural Effusion", needs=["blunted"], status=UNCERTAIN)],
    "pleura": [_rule("Pleural Effusion", needs=["blunted"], status=UNCERTAIN),
               _rule("Pleural Other")],
    "thickening": [_rule("Pleural Other", needs=["pleura"])],
    "cicatrix": [_rule("Pleural Other", needs=["pleura"])],
    "fractures, bone": [_rule("Fracture")],
    "catheters, indwelling": [_DEVICE],
    "implanted medical device": [_DEVICE],
    "medical device": [_DEVICE],
    "tube, inserted": [_DEVICE],
    "surgical instruments": [_DEVICE],
    "stents": [_DEVICE],
}  # fmt: skip
NORMAL_HEADING = "normal"  # -> "No Finding": no Finding records, not an unmapped term

# Qualifier -> (side, zone) implied by anatomy: the middle lobe is right-sided, the lingula left.
_SIDE_WORDS = {"left": "left", "right": "right", "bilateral": "bilateral"}
_ZONE_WORDS = {"base": "lower", "lower lobe": "lower", "costophrenic angle": "lower",
               "sulcus": "lower",
               "retrocardiac": "lower", "middle lobe": "middle", "lingula": "middle",
               "hilum": "middle", "apex": "upper", "upper lobe": "upper"}  # fmt: skip
_IMPLIED_SIDE = {"middle lobe": "right", "lingula": "left", "retrocardiac": "left"}
_SEVERITY_WORDS = {"mild": "mild", "small": "mild", "borderline": "mild", "moderate": "moderate",
                   "severe": "severe", "large": "severe"}  # fmt: skip


def _where_and_how_bad(quals: Sequence[str]) -> tuple[str | None, str | None, str | None]:
    sides = {_SIDE_WORDS[q] for q in quals if q in _SIDE_WORDS}
    side = "bilateral" if {"left", "right"} <= sides else (sides.pop() if len(sides) == 1 else None)
    if side is None:
        side = next((_IMPLIED_SIDE[q] for q in quals if q in _IMPLIED_SIDE), None)
    zone = next((_ZONE_WORDS[q] for q in quals if q in _ZONE_WORDS), None)
    levels = [SEVERITIES.index(_SEVERITY_WORDS[q]) for q in quals if q in _SEVERITY_WORDS]
    severity = SEVERITIES[max(levels)] if levels else None
    return side, zone, severity


def term_to_findings(term: MeshTerm | str) -> list[Finding] | None:
    """Findings of one MeSH term: [] for "normal", None when no CheXpert observation fits."""
    term = MeshTerm.parse(term) if isinstance(term, str) else term
    heading = term.heading.strip().lower()
    if heading == NORMAL_HEADING:
        return []
    quals = set(term.qualifiers)
    for rule in MESH_RULES.get(heading, []):
        if (not rule.needs or quals & rule.needs) and not quals & rule.forbids:
            # the heading can be a place too ("Costophrenic Angle/left/blunted")
            side, zone, severity = _where_and_how_bad((*term.qualifiers, heading))
            status = UNCERTAIN if "borderline" in quals else rule.status
            return [Finding(obs, side, zone, severity, status) for obs in rule.observations]
    return None


def mesh_to_findings(terms: Iterable[MeshTerm | str]) -> tuple[list[Finding], list[str]]:
    """Map a study's MeSH terms to findings.

    Args:
        terms: MeshTerm records or strings like ``"Opacity/lung/base/left/mild"`` (strings count
            as major terms). Automatic (non-major) terms are ignored.

    Returns:
        (findings without duplicates, in term order; texts of the major terms that map to no
        CheXpert observation). "normal" gives no finding and is not unmapped.
    """
    findings, unmapped = [], []
    for term in terms:
        term = MeshTerm.parse(term) if isinstance(term, str) else term
        if not term.major:
            continue
        mapped = term_to_findings(term)
        if mapped is None:
            unmapped.append(term.text)
        findings += [f for f in mapped or [] if f not in findings]
    return findings, unmapped


def mesh_coverage(studies: Iterable) -> pd.DataFrame:
    """How many major MeSH terms map to an observation, per heading.

    Args:
        studies: IUReport records (anything with ``.mesh``) or lists of MeshTerm/str.

    Returns:
        DataFrame sorted by ``count``: heading, count (term occurrences), mapped, unmapped,
        observations (what the mapped ones became, "; "-joined).
    """
    count, mapped, targets = Counter(), Counter(), defaultdict(set)
    for study in studies:
        for term in getattr(study, "mesh", study):
            term = MeshTerm.parse(term) if isinstance(term, str) else term
            if not term.major:
                continue
            result = term_to_findings(term)
            count[term.heading] += 1
            if result is not None:
                mapped[term.heading] += 1
                targets[term.heading] |= {f.observation for f in result} or {"No Finding"}
    rows = [
        dict(heading=h, count=n, mapped=mapped[h], unmapped=n - mapped[h],
             observations="; ".join(sorted(targets[h])))
        for h, n in count.items()
    ]  # fmt: skip
    columns = ["heading", "count", "mapped", "unmapped", "observations"]
    df = pd.DataFrame(rows, columns=columns)
    return df.sort_values(["count", "heading"], ascending=[False, True], ignore_index=True)


def coverage_summary(coverage: pd.DataFrame, top: int = 10) -> dict:
    """Totals of a ``mesh_coverage`` table: terms, mapped %, and the most frequent unmapped ones."""
    total, mapped = int(coverage["count"].sum()), int(coverage["mapped"].sum())
    unmapped = coverage[coverage["unmapped"] > 0].sort_values("unmapped", ascending=False)
    return {
        "terms": total,
        "mapped": mapped,
        "mapped_pct": round(100 * mapped / max(total, 1), 1),
        "headings": len(coverage),
        "headings_never_mapped": int((coverage["mapped"] == 0).sum()),
        "top_unmapped": dict(zip(unmapped["heading"][:top], unmapped["unmapped"][:top].tolist())),
    }


# --- splits --------------------------------------------------------------------------------------


def make_splits(
    study_ids: Iterable[str], val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> dict[str, str]:
    """Assign each study to train/val/test, the same way for the same ids and seed.

    The ids are sorted before a seeded shuffle, so the input order does not matter; the val and
    test sizes are ``round(fraction * n)``.

    Returns:
        {study_id: "train" | "val" | "test"} in sorted id order.
    """
    ids = sorted(set(study_ids))
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction={val_fraction}, test_fraction={test_fraction}: each must be in [0, 1) "
            "and their sum below 1 (the rest is train)"
        )
    if not ids:
        raise ValueError("make_splits got no study ids")
    n_val, n_test = round(val_fraction * len(ids)), round(test_fraction * len(ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    split_of = {}
    for rank, i in enumerate(order):
        split_of[ids[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return dict(sorted(split_of.items()))


def save_splits(splits: dict[str, str], path: str | Path) -> Path:
    """Write ``{study_id: split}`` as JSON (sorted, so the file is stable under version control)."""
    path = Path(path)
    _check_splits(splits, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(sorted(splits.items())), indent=0))
    return path


def load_splits(path: str | Path) -> dict[str, str]:
    """Read a splits JSON written by ``save_splits``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"splits file {path} not found: run notebook 01-data-prep first")
    try:
        splits = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"splits file {path} is not valid JSON ({err}); delete it and rerun "
                         "notebook 01-data-prep") from None  # fmt: skip
    _check_splits(splits, path)
    return splits


def _check_splits(splits: dict, path: Path) -> None:
    if not isinstance(splits, dict):
        raise ValueError(f"{path}: splits must be a JSON object {{study_id: split}}")
    bad = sorted(k for k, v in splits.items() if v not in SPLITS)
    if bad:
        raise ValueError(
            f"{path}: {len(bad)} study ids map to no split in {SPLITS}, e.g. {bad[:3]}"
        )
