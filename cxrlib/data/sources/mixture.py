"""The official phase-2 mixture: the release's 50 training sets and their sampling weights.

Each training sample first draws a (task, dataset) pair with probability proportional to its
weight, then a random item of it. Here a pair is ``"task@source"`` with this project's task
names; on real data ``ConversationDataset`` with ``data.mixture: paper`` samples these pairs
(``official_weights``), over whichever sources the user has: the absent pairs are listed in one
warning and the rest renormalised.

Mapping of the release's task names to ours: multi-disease classification is ``multi_label`` for
sources that label all 13 findings (CheXpert, BRAX) and ``single_disease`` for those that label a
few (their multi-label question would claim the rest absent); anatomy grounding / grounded anatomy
(Chest ImaGenome) are ``organ_grounding`` / ``grounded_organ``; RaDialog-Instruct and
MIMIC-CXR-VQA are ``vqa``; the Medical-Diff-VQA difference questions are ``difference_vqa``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

OFFICIAL_WEIGHTS: dict[str, float] = {
    # report generation (MIMIC-CXR)
    "cot_single@mimic_cxr": 200, "cot_multi_image@mimic_cxr": 120,
    "cot_multi_study@mimic_cxr": 60,
    # multi-disease classification
    "multi_label@brax": 7, "multi_label@chexpert": 30, "single_disease@vindr": 3,
    "single_disease@nih": 10, "single_disease@chestx_det10": 1, "single_disease@siim": 4,
    "single_disease@rsna": 4, "single_disease@covid19_radiography": 3,
    # finding grounding
    "finding_grounding@vindr": 2, "finding_grounding@nih": 10,
    "finding_grounding@chestx_det10": 2, "finding_grounding@jsrt": 0.1,
    "finding_grounding@siim": 4, "finding_grounding@rsna": 1, "finding_grounding@covid_qu_ex": 1,
    "finding_grounding@qata_cov19": 1,
    # grounded finding
    "grounded_finding@vindr": 2, "grounded_finding@chestx_det10": 2, "grounded_finding@jsrt": 0.1,
    "grounded_finding@siim": 2, "grounded_finding@rsna": 1, "grounded_finding@covid_qu_ex": 1,
    "grounded_finding@qata_cov19": 3,
    # abnormality detection
    "abnormality_detection@vindr": 3, "abnormality_detection@chestx_det10": 1.5,
    "abnormality_detection@jsrt": 0.1, "abnormality_detection@siim": 2,
    "abnormality_detection@rsna": 1, "abnormality_detection@covid_qu_ex": 1.5,
    "abnormality_detection@qata_cov19": 1.5,
    # multi-finding grounding
    "multi_finding_grounding@nih": 10, "multi_finding_grounding@vindr": 2,
    "multi_finding_grounding@chestx_det10": 2,
    # organ grounding / grounded organ
    "organ_grounding@covid19_radiography": 0.8, "grounded_organ@covid19_radiography": 0.8,
    "organ_grounding@covid_qu_ex": 0.8, "grounded_organ@covid_qu_ex": 0.8,
    # phrases
    "grounded_phrase@ms_cxr": 2, "phrase_grounding@ms_cxr": 2,
    "grounded_phrase@chest_imagenome": 40, "phrase_grounding@chest_imagenome": 40,
    # anatomy (ImaGenome regions, our organ tasks)
    "organ_grounding@chest_imagenome": 20, "grounded_organ@chest_imagenome": 20,
    # VQA
    "vqa@mimic_cxr_vqa": 2, "vqa@medical_diff_vqa": 2, "difference_vqa@medical_diff_vqa": 4,
    "vqa@radialog": 70,
}  # fmt: skip
assert len(OFFICIAL_WEIGHTS) == 50, "the release lists 50 training sets"


def official_weights(sizes: Mapping[str, int]) -> dict[str, float]:
    """Probabilities of the official ``task@source`` pairs that have data (``sizes``: pair ->
    number of studies that can make it), renormalised; one warning lists the absent pairs."""
    present = {k: w for k, w in OFFICIAL_WEIGHTS.items() if sizes.get(k, 0) > 0}
    absent = [k for k in OFFICIAL_WEIGHTS if k not in present]
    if not present:
        raise ValueError(
            "the official mixture has no training set with data: build at least one of its "
            "sources (data.source / data.roots, docs/datasets.md)"
        )
    if absent:
        warnings.warn(
            f"official mixture: {len(absent)} of {len(OFFICIAL_WEIGHTS)} training sets have no "
            f"data and are left out ({', '.join(absent)}); the other {len(present)} are "
            f"renormalised",
            stacklevel=3,
        )
    total = sum(present.values())
    return {k: w / total for k, w in present.items()}


def uses_official_mixture(studies) -> bool:
    """True when the studies come from real sources (the phantom path keeps its task mixture)."""
    sources = {k.split("@", 1)[1] for k in OFFICIAL_WEIGHTS}
    return any(s["source"] in sources for s in studies)
