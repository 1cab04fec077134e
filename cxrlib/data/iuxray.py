"""Indiana University (Open-i) chest X-ray reports, read from the installed torchxrayvision wheel.

The wheel ships the 3,955 XML reports of the IU collection (``data/NLMCXR_reports.tgz``) and the
DICOM metadata of its 7,470 images (``data/nlmcxr_dicom_metadata.csv.gz``). Nothing is downloaded:
the files are found through the installed package. Introduced in notebook 01.

    >>> reports, stats = load_iu_reports()
    >>> reports[0].findings, reports[0].mesh[0].heading, reports[0].images[0].view

De-identification: IU replaced names, dates and many ordinary words with ``XXXX`` ("The XXXX are
clear."). A masked word cannot be recovered, so
  * ``findings`` and ``impression`` (training targets) drop every sentence that contains ``XXXX``
    (about 2,000 of 16,000 findings sentences); the untouched text stays in ``findings_raw``;
  * ``indication`` and ``comparison`` (context only) keep their sentences and write each run of
    ``XXXX`` as ``___``, the mark MIMIC-CXR uses for removed text.

Views: the DICOM ``View Position`` is missing for a third of the images, and PA/AP is often copied
to every image of a study. We take, in order: a lateral DICOM tag (LL, RL, LATERAL), the t-SNE view
that torchxrayvision ships (``nlmcxr_tsne_pa.csv.gz``, PA or L, one image per study), then for a
two-image study the complement of its known image (IU pairs are a frontal and a lateral), then the
DICOM PA/AP tag. Otherwise ``view`` is None (about 100 of 7,470 images).
"""

from __future__ import annotations

import importlib.util
import re
import tarfile
import time
import xml.etree.ElementTree as ET
import zlib
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pandas as pd

ARCHIVE_NAME = "NLMCXR_reports.tgz"
METADATA_NAME = "nlmcxr_dicom_metadata.csv.gz"
TSNE_VIEW_NAME = "nlmcxr_tsne_pa.csv.gz"
DEID_TOKEN = "XXXX"
DEID_MARK = "___"  # what indication/comparison show instead of XXXX
_INSTALL_HINT = "reinstall the wheel that ships it: `pip install --force-reinstall torchxrayvision`"

_DICOM_VIEWS = {"PA": "PA", "AP": "AP", "LL": "LATERAL", "RL": "LATERAL", "LATERAL": "LATERAL",
                "LARGE LATERAL": "LATERAL"}  # fmt: skip
_TSNE_VIEWS = {"PA": "PA", "L": "LATERAL"}


class IUArchiveError(RuntimeError):
    """The IU report archive is missing or unreadable; the message names the file and the fix."""


@dataclass(frozen=True)
class MeshTerm:
    """One MeSH index term, e.g. ``Opacity/lung/base/left/mild``.

    ``heading`` is the part before the first ``/``; ``qualifiers`` the rest (location, severity,
    ...), lower-cased and stripped. ``major`` terms were assigned by a person; ``automatic`` ones
    (major=False) by a keyword tagger, and are kept only for reference.
    """

    text: str
    heading: str
    qualifiers: tuple[str, ...] = ()
    major: bool = True

    @classmethod
    def parse(cls, text: str, major: bool = True) -> MeshTerm:
        parts = [p.strip() for p in text.strip().split("/")]
        return cls(text.strip(), parts[0], tuple(p.lower() for p in parts[1:] if p), major)


@dataclass(frozen=True)
class IUImage:
    image_id: str  # e.g. "CXR1000_IM-0003-1001" (the parentImage id)
    view: str | None  # "PA" | "AP" | "LATERAL" | None (unknown)


@dataclass(frozen=True)
class IUReport:
    study_id: str  # e.g. "CXR1000" (the uId of the XML file)
    findings: str  # clean Findings section (no XXXX); "" when absent
    impression: str  # clean Impression section
    indication: str  # XXXX -> ___
    comparison: str  # XXXX -> ___
    mesh: tuple[MeshTerm, ...]
    images: tuple[IUImage, ...]
    findings_raw: str = ""  # the Findings section as written, XXXX included

    @property
    def major_mesh(self) -> list[MeshTerm]:
        return [t for t in self.mesh if t.major]


@dataclass
class ParseStats:
    """What ``load_iu_reports`` read, skipped and cleaned (print it, or ``vars(stats)``)."""

    archive: str = ""
    xml_files: int = 0  # .xml members in the archive
    parsed: int = 0  # reports returned
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (member name, reason)
    with_findings_raw: int = 0  # reports with a non-empty Findings section
    with_findings: int = 0  # ... still non-empty after dropping XXXX sentences
    findings_sentences: int = 0  # Findings sentences before cleaning
    dropped_sentences: int = 0  # of which dropped for XXXX
    images: int = 0
    views: dict[str, int] = field(default_factory=dict)  # "PA"/"AP"/"LATERAL"/"unknown" -> count
    view_sources: dict[str, int] = field(default_factory=dict)  # dicom/tsne/pair/none -> count
    seconds: float = 0.0  # parse time (the first call; later calls hit the in-memory cache)


def data_dir() -> Path:
    """The ``data`` folder of the installed torchxrayvision package (found without importing it)."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise IUArchiveError(
            f"torchxrayvision is not installed, so {ARCHIVE_NAME} cannot be found: "
            "`pip install torchxrayvision`"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


# --- text cleaning -------------------------------------------------------------------------------

# A sentence ends at . ! or ? followed by white space and an upper-case letter or a digit
# ("2.5 cm" and "x-ray." inside a sentence do not split).
_SENT_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")
_LIST_NUMBER = re.compile(r"^\d+\.$")  # "1." of a numbered impression
_DEID_WORD = re.compile(r"(?:\w+-)?XXXX")  # "x-XXXX" (x-ray) is one masked word
_DEID_RUN = re.compile(rf"{DEID_MARK}(?:\s+{DEID_MARK})+")


def split_sentences(text: str) -> list[str]:
    """Split report text into sentences; list numbers ("1.", "2.") are dropped, not kept alone."""
    text = re.sub(r"\.{2,}", ".", " ".join((text or "").split()))  # "effusion.." -> "effusion."
    parts = [s.strip() for s in _SENT_END.split(text) if s.strip()]
    return [s for s in parts if not _LIST_NUMBER.match(s)]


def drop_deid_sentences(text: str) -> tuple[str, int, int]:
    """Remove the sentences with XXXX. Returns (clean text, sentences before, sentences dropped)."""
    sentences = split_sentences(text)
    kept = [s for s in sentences if DEID_TOKEN not in s]
    return " ".join(kept), len(sentences), len(sentences) - len(kept)


def mark_deid(text: str) -> str:
    """Write each run of XXXX words (e.g. "x-XXXX XXXX") as ``___``."""
    text = _DEID_WORD.sub(DEID_MARK, " ".join((text or "").split()))
    return _DEID_RUN.sub(DEID_MARK, text)


# --- parsing -------------------------------------------------------------------------------------


def _parse_xml(data: bytes) -> tuple[dict, int, int]:
    """One XML report -> (fields, findings sentences, dropped sentences); raises on bad input."""
    root = ET.fromstring(data)
    uid = root.find("uId")
    if uid is None or not uid.get("id"):
        raise ValueError("no <uId id=...> element")
    sections = {
        (node.get("Label") or "").lower(): (node.text or "").strip()
        for node in root.iter("AbstractText")
    }
    findings, n_sent, n_drop = drop_deid_sentences(sections.get("findings", ""))
    fields = dict(
        study_id=uid.get("id"),
        findings=findings,
        impression=drop_deid_sentences(sections.get("impression", ""))[0],
        indication=mark_deid(sections.get("indication", "")),
        comparison=mark_deid(sections.get("comparison", "")),
        findings_raw=" ".join(sections.get("findings", "").split()),
        mesh=tuple(
            MeshTerm.parse(node.text, major=node.tag == "major")
            for node in root.findall("MeSH/*")
            if node.tag in ("major", "automatic") and (node.text or "").strip()
        ),
        image_ids=[n.get("id") for n in root.findall("parentImage") if n.get("id")],
    )
    return fields, n_sent, n_drop


def _read_views(folder: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(DICOM view per image id, t-SNE view per image id); empty when a file is absent."""
    dicom, tsne = {}, {}
    if (folder / METADATA_NAME).exists():
        meta = pd.read_csv(folder / METADATA_NAME, usecols=["imageid", "View Position"])
        meta = meta.dropna()
        dicom = dict(zip(meta["imageid"], meta["View Position"].str.strip().map(_DICOM_VIEWS)))
    if (folder / TSNE_VIEW_NAME).exists():
        tsne_df = pd.read_csv(folder / TSNE_VIEW_NAME)
        tsne = dict(zip(tsne_df["imageid"], tsne_df["tsne-view"].map(_TSNE_VIEWS)))
    return dicom, tsne


def _assign_views(
    image_ids: list[str], dicom: dict, tsne: dict, sources: Counter
) -> tuple[IUImage, ...]:
    """Views of one study's images, by the precedence in the module docstring."""
    views, how = [], []
    for image_id in image_ids:
        d, t = dicom.get(image_id), tsne.get(image_id)
        if d == "LATERAL":  # lateral DICOM tags agree with the t-SNE view every time both exist
            view, source = d, "dicom"
        elif t is not None:  # AP stays AP when the t-SNE view agrees it is frontal
            view, source = ("AP" if (d == "AP" and t == "PA") else t), "tsne"
        else:  # DICOM PA/AP (often copied to every image of a study) or nothing: weak
            view, source = d, ("dicom-weak" if d else "none")
        views.append(view)
        how.append(source)
    weak = [i for i, s in enumerate(how) if s in ("dicom-weak", "none")]
    if len(views) == 2 and len(weak) == 1:  # IU pairs are a frontal and a lateral
        i, known = weak[0], views[1 - weak[0]]
        views[i] = (views[i] or "PA") if known == "LATERAL" else "LATERAL"
        how[i] = "pair"
    sources.update(how)
    return tuple(IUImage(i, v) for i, v in zip(image_ids, views))


@lru_cache(maxsize=4)
def _load_cached(archive: str, mtime: float) -> tuple[tuple[IUReport, ...], ParseStats]:
    start = time.perf_counter()
    path = Path(archive)
    stats = ParseStats(archive=archive)
    parsed = []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar.getmembers():
                if not (member.isfile() and member.name.endswith(".xml")):
                    continue
                stats.xml_files += 1
                try:
                    fields, n_sent, n_drop = _parse_xml(tar.extractfile(member).read())
                except (ET.ParseError, ValueError) as err:  # one bad file: count it and go on
                    stats.skipped.append((member.name, f"{type(err).__name__}: {err}"))
                    continue
                parsed.append(fields)
                stats.findings_sentences += n_sent
                stats.dropped_sentences += n_drop
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise IUArchiveError(
            f"cannot read the IU report archive {path} ({type(err).__name__}: {err}); "
            f"the file is corrupt or truncated: {_INSTALL_HINT}"
        ) from None
    if stats.xml_files == 0:
        raise IUArchiveError(f"{path} holds no .xml reports; {_INSTALL_HINT}")

    dicom, tsne = _read_views(_metadata_dir(path))
    sources: Counter = Counter()
    reports = []
    for f in sorted(parsed, key=lambda f: _study_number(f["study_id"])):
        images = _assign_views(f.pop("image_ids"), dicom, tsne, sources)
        reports.append(IUReport(images=images, **f))
    stats.parsed = len(reports)
    stats.with_findings_raw = sum(bool(r.findings_raw) for r in reports)
    stats.with_findings = sum(bool(r.findings) for r in reports)
    views = Counter(im.view or "unknown" for r in reports for im in r.images)
    stats.images, stats.views, stats.view_sources = sum(views.values()), dict(views), dict(sources)
    stats.seconds = time.perf_counter() - start
    return tuple(reports), stats


def _metadata_dir(archive: Path) -> Path:
    """The archive's own folder if it has the metadata, else the installed package's."""
    own = archive.parent / METADATA_NAME
    if own.exists() or importlib.util.find_spec("torchxrayvision") is None:
        return archive.parent
    return data_dir()


def _study_number(study_id: str) -> tuple[int, str]:
    digits = re.sub(r"\D", "", study_id)
    return (int(digits) if digits else -1, study_id)


def load_iu_reports(archive: str | Path | None = None) -> tuple[list[IUReport], ParseStats]:
    """Parse every IU report (cached in memory: the second call is instant).

    Args:
        archive: path of ``NLMCXR_reports.tgz``; None = the copy inside the installed
            torchxrayvision package. Views come from that package's metadata files.

    Returns:
        (reports sorted by study number, ParseStats). A malformed XML file is skipped and listed
        in ``stats.skipped``.

    Raises:
        IUArchiveError: the archive is missing, corrupt or holds no reports.
    """
    path = Path(archive) if archive is not None else data_dir() / ARCHIVE_NAME
    if not path.is_file():
        raise IUArchiveError(f"IU report archive {path} not found; {_INSTALL_HINT}")
    reports, stats = _load_cached(str(path.resolve()), path.stat().st_mtime)
    return list(reports), stats
