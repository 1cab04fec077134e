"""IU X-ray report parsing, checked against the archive in the torchxrayvision wheel."""

import gzip
import io
import re
import tarfile
import xml.etree.ElementTree as ET
from collections import Counter

import pytest

from cxrlib.data.iuxray import (
    ARCHIVE_NAME,
    DEID_TOKEN,
    IUArchiveError,
    MeshTerm,
    data_dir,
    drop_deid_sentences,
    load_iu_reports,
    mark_deid,
    split_sentences,
)

ARCHIVE = data_dir() / ARCHIVE_NAME


@pytest.fixture(scope="module")
def iu():
    return load_iu_reports()


@pytest.fixture(scope="module")
def raw_xml():
    """Every report of the archive, parsed independently of cxrlib: {uId: root element}."""
    out = {}
    with tarfile.open(ARCHIVE) as tar:
        for m in tar.getmembers():
            if m.isfile() and m.name.endswith(".xml"):
                root = ET.parse(tar.extractfile(m)).getroot()
                out[root.find("uId").get("id")] = root
    return out


def test_counts_match_the_archive(iu, raw_xml):
    reports, stats = iu
    assert len(raw_xml) == 3955 == stats.xml_files == stats.parsed == len(reports)
    assert not stats.skipped
    assert {r.study_id for r in reports} == set(raw_xml)
    with_findings = sum(
        bool((n.text or "").strip())
        for root in raw_xml.values()
        for n in root.iter("AbstractText")
        if n.get("Label") == "FINDINGS"
    )
    assert stats.with_findings_raw == with_findings == 3425
    # dropping XXXX sentences empties only the few findings made of XXXX sentences alone
    assert with_findings - 20 < stats.with_findings <= with_findings
    n_images = sum(len(root.findall("parentImage")) for root in raw_xml.values())
    assert stats.images == n_images == sum(len(r.images) for r in reports) == 7470


def test_views(iu):
    reports, stats = iu
    assert sum(stats.views.values()) == stats.images
    assert set(stats.views) <= {"PA", "AP", "LATERAL", "unknown"}
    assert stats.views.get("unknown", 0) < 0.03 * stats.images
    # IU studies are mostly a frontal and a lateral image
    pairs = Counter(
        tuple(sorted(im.view == "LATERAL" for im in r.images))
        for r in reports
        if len(r.images) == 2
    )
    assert pairs[(False, True)] > 0.95 * sum(pairs.values())
    by_id = {r.study_id: r for r in reports}
    assert [im.view for im in by_id["CXR1"].images] == ["LATERAL", "PA"]  # checked by eye


def test_mesh_and_sections(iu, raw_xml):
    reports, _ = iu
    r = next(r for r in reports if r.study_id == "CXR1000")
    assert [t.text for t in r.major_mesh][:2] == [
        "Opacity/lung/upper lobe/right",
        "Pulmonary Atelectasis/upper lobe/right",
    ]
    assert r.mesh[0] == MeshTerm(
        "Opacity/lung/upper lobe/right", "Opacity", ("lung", "upper lobe", "right")
    )
    assert any(not t.major and t.text == "atelectases" for t in r.mesh)
    assert r.indication == "___-year-old male, ___."
    assert "cardiac silhouette is within normal limits" in r.findings
    n_major = sum(len(root.findall("MeSH/major")) for root in raw_xml.values())
    assert sum(len(r.major_mesh) for r in reports) == n_major


def test_xxxx_removed_from_targets(iu):
    reports, stats = iu
    assert not any(DEID_TOKEN in r.findings or DEID_TOKEN in r.impression for r in reports)
    assert not any(DEID_TOKEN in r.indication or DEID_TOKEN in r.comparison for r in reports)
    assert sum(DEID_TOKEN in r.findings_raw for r in reports) > 1000  # raw text keeps it
    assert 1500 < stats.dropped_sentences < 2500 < stats.findings_sentences
    # every kept findings sentence is a sentence of the raw text
    for r in reports[:300]:
        assert set(split_sentences(r.findings)) <= set(split_sentences(r.findings_raw))


def test_text_helpers():
    text = "The heart is normal. The XXXX are clear. 1. No effusion. Nodule 2.5 cm wide."
    assert split_sentences(text) == [
        "The heart is normal.",
        "The XXXX are clear.",
        "No effusion.",
        "Nodule 2.5 cm wide.",
    ]
    clean, n, dropped = drop_deid_sentences(text)
    assert (clean, n, dropped) == ("The heart is normal. No effusion. Nodule 2.5 cm wide.", 4, 1)
    assert (
        mark_deid("PA and lateral chest x-XXXX XXXX. XXXX, cough")
        == "PA and lateral chest ___. ___, cough"
    )


def test_second_load_is_cached(iu):
    reports, stats = load_iu_reports()
    assert stats is iu[1] and reports[0] is iu[0][0]


def test_missing_archive(tmp_path):
    with pytest.raises(IUArchiveError, match=r"nope\.tgz not found.*pip install"):
        load_iu_reports(tmp_path / "nope.tgz")


def test_corrupt_archive(tmp_path):
    bad = tmp_path / ARCHIVE_NAME
    bad.write_bytes(gzip.compress(b"not a tar file at all" * 50)[:-20])
    with pytest.raises(IUArchiveError, match=rf"{re.escape(str(bad))}.*pip install"):
        load_iu_reports(bad)


def _tgz(path, members: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_malformed_xml_is_a_counted_skip(tmp_path):
    with tarfile.open(ARCHIVE) as tar:
        good = tar.extractfile("ecgen-radiology/1000.xml").read()
    path = tmp_path / "small.tgz"
    _tgz(path, {"r/1000.xml": good, "r/broken.xml": b"<eCitation><uId", "r/noid.xml": b"<a/>"})
    reports, stats = load_iu_reports(path)
    assert [r.study_id for r in reports] == ["CXR1000"]
    assert stats.xml_files == 3 and len(stats.skipped) == 2
    assert {name for name, _ in stats.skipped} == {"r/broken.xml", "r/noid.xml"}
    assert len(reports[0].images) == 3 and all(im.view for im in reports[0].images)


def test_archive_without_reports(tmp_path):
    path = tmp_path / "empty.tgz"
    _tgz(path, {"readme.txt": b"hello"})
    with pytest.raises(IUArchiveError, match="no .xml reports"):
        load_iu_reports(path)
