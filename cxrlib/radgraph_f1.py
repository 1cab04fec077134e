"""RadGraph F1: entity / relation overlap of a generated report with its reference.

The paper's RadGraph F1 is the "partial" reward of the ``radgraph`` package (also called RG_ER):
per report pair, the sets of (entity tokens, entity label, has-a-relation) of the two reports'
RadGraph annotations, their precision / recall / F1; 0 when either set is empty; the corpus score
is the mean over pairs. ``simple`` drops the relation flag; ``complete`` replaces it by the
relation triples (entity, relation type, target entity, lowercased). The set arithmetic is written
here from that definition (so it is tested without the model); the annotations come from the
package's model, whose weights live on the Hugging Face hub only:

    scorer, note = radgraph_scorer()        # None and a note when the package or weights are absent
    if scorer: scores = scorer.score(hyps, refs)   # {"partial": ..., "scorer": "radgraph 0.1.18 ..."}

Install the optional extra (``pip install cxrlib[scorers]``) and download the RadGraph model into
the cache on a machine with internet; without it the metrics file carries ``note`` instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import metadata

LEVELS = ("simple", "partial", "complete")
DEFAULT_MODEL = "radgraph-xl"


def entity_set(annotation: dict, level: str) -> set[tuple]:
    """The set a RadGraph annotation (``{"entities": {id: {tokens, label, relations}}}``) is
    scored by at ``level`` (``simple``, ``partial`` or ``complete``)."""
    if level not in LEVELS:
        raise ValueError(f"unknown RadGraph level '{level}': choose one of {', '.join(LEVELS)}")
    entities = annotation.get("entities", {})
    out: set[tuple] = set()
    for entity in entities.values():
        key = (entity["tokens"], entity["label"])
        relations = entity.get("relations") or []
        if level == "simple" or not relations:
            out.add(key)
        elif level == "partial":
            out.add((*key, True))
        else:
            for rel_type, target in relations:
                out.add((entity["tokens"].lower(), entity["label"], rel_type,
                         entities[str(target)]["tokens"].lower()))  # fmt: skip
    return out


def set_f1(hyp: set, ref: set) -> float:
    """F1 of two sets; 0 when either is empty (the package's convention)."""
    if not hyp or not ref:
        return 0.0
    hits = len(hyp & ref)
    precision, recall = hits / len(hyp), hits / len(ref)
    return 2 * precision * recall / (precision + recall) if hits else 0.0


def pair_f1(hyp_annotation: dict, ref_annotation: dict, level: str = "partial") -> float:
    return set_f1(entity_set(hyp_annotation, level), entity_set(ref_annotation, level))


def corpus_f1(hyp_annotations: Sequence[dict], ref_annotations: Sequence[dict]) -> dict:
    """Mean pair F1 at every level over aligned annotation lists."""
    if len(hyp_annotations) != len(ref_annotations):
        raise ValueError(f"{len(hyp_annotations)} hypotheses vs {len(ref_annotations)} references")
    n = max(1, len(hyp_annotations))
    return {
        level: sum(pair_f1(h, r, level) for h, r in zip(hyp_annotations, ref_annotations)) / n
        for level in LEVELS
    }


class RadGraphScorer:
    """RadGraph F1 through the ``radgraph`` package (``F1RadGraph(reward_level="all")``)."""

    def __init__(self, model_type: str = DEFAULT_MODEL, **kwargs):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time
        from radgraph import F1RadGraph

        self.model_type = model_type
        self.version = metadata.version("radgraph")
        self._f1 = F1RadGraph(reward_level="all", model_type=model_type, **kwargs)

    @property
    def name(self) -> str:
        return f"radgraph {self.version} ({self.model_type})"

    def score(self, hyps: Sequence[str], refs: Sequence[str]) -> dict:
        """Corpus RadGraph F1 (``simple``, ``partial`` = the paper's, ``complete``)."""
        mean, per_pair, hyp_ann, ref_ann = self._f1(refs=list(refs), hyps=list(hyps))
        out = dict(zip(LEVELS, (float(m) for m in mean)))
        out.update(n=len(hyps), scorer=self.name,
                   per_pair_partial=[float(v) for v in per_pair[1]])  # fmt: skip
        return out


def radgraph_scorer(model_type: str = DEFAULT_MODEL, **kwargs):
    """``(scorer, None)`` when ``radgraph`` and its weights are available, else ``(None, note)``."""
    try:
        return RadGraphScorer(model_type, **kwargs), None
    except ImportError:
        return None, ("RadGraph F1 not computed: the optional package `radgraph` is not installed "
                      "(pip install 'cxrlib[scorers]')")  # fmt: skip
    except Exception as e:  # noqa: BLE001 - the package raises many kinds when weights are absent
        return None, (f"RadGraph F1 not computed: the {model_type} weights are not in the local "
                      f"cache ({type(e).__name__}: {e}); download them on a machine with internet")  # fmt: skip
