"""The task mixture: the card's shares, the named alternatives, renormalisation, sampling."""

from collections import Counter

import pytest

from cxrlib.constants import TASK_GROUPS
from cxrlib.data.mixture import (
    MIXTURE_TASKS,
    MixtureError,
    TaskSampler,
    group_shares,
    mixture_weights,
)

ALL_SIZES = {t: 100 for t in MIXTURE_TASKS}


def test_paper_shares():
    w = mixture_weights("paper", ALL_SIZES)
    assert sum(w.values()) == pytest.approx(1.0)
    g = group_shares(w)
    assert g["report"] == pytest.approx(0.54)
    assert g["classification"] + g["localization"] == pytest.approx(0.35)
    assert g["classification"] == pytest.approx(0.09)
    assert g["vqa"] == pytest.approx(0.11)
    assert w["cot_single"] / w["cot_multi_study"] == pytest.approx(200 / 60)
    assert w["cot_multi_image"] / w["cot_multi_study"] == pytest.approx(120 / 60)


def test_alternatives():
    uniform = mixture_weights("uniform", ALL_SIZES)
    assert list(uniform.values()) == pytest.approx([1 / 15] * 15)
    eq = group_shares(mixture_weights("equal_groups", ALL_SIZES))
    assert eq["report"] == pytest.approx(1 / 3) and eq["vqa"] == pytest.approx(1 / 3)
    assert eq["classification"] + eq["localization"] == pytest.approx(1 / 3)
    sizes = dict(ALL_SIZES, vqa=300)
    prop = mixture_weights("proportional", sizes)
    assert prop["vqa"] == pytest.approx(3 * prop["cot_single"])


def test_unknown_name_lists_the_choices():
    with pytest.raises(MixtureError, match="paper, uniform, equal_groups, proportional"):
        mixture_weights("papr", ALL_SIZES)
    with pytest.raises(MixtureError, match="unknown task"):
        mixture_weights({"reports": 1.0})


def test_missing_tasks_are_renormalised_with_a_warning():
    sizes = dict(ALL_SIZES, cot_multi_study=0, difference_vqa=0)
    with pytest.warns(UserWarning, match="cot_multi_study, difference_vqa"):
        w = mixture_weights("paper", sizes)
    assert "cot_multi_study" not in w and sum(w.values()) == pytest.approx(1.0)
    ref = mixture_weights("paper", ALL_SIZES)
    assert w["cot_single"] / w["vqa"] == pytest.approx(ref["cot_single"] / ref["vqa"])


def test_sampler_matches_the_shares():
    w = mixture_weights("paper", ALL_SIZES)
    sampler = TaskSampler(w, seed=0)
    n = 40_000
    counts = Counter(sampler.sample(n))
    for task, p in w.items():
        assert counts[task] / n == pytest.approx(p, abs=0.01), task
    groups = Counter()
    for task, c in counts.items():
        groups[next(g for g, ts in TASK_GROUPS.items() if task in ts)] += c
    assert groups["report"] / n == pytest.approx(0.54, abs=0.01)


def test_sampler_is_seeded():
    w = mixture_weights("uniform")
    assert TaskSampler(w, 1).sample(50) == TaskSampler(w, 1).sample(50)
    assert TaskSampler(w, 1).sample(50) != TaskSampler(w, 2).sample(50)
    with pytest.raises(MixtureError):
        TaskSampler({})
