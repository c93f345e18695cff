"""Release files: CITATION.cff (CFF 1.2.0), the one version, LICENSE, CHANGELOG."""

import os
import re

import yaml

from utils.version import __version__

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def test_version_is_semantic_and_written_once():
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)
    # pyproject.toml reads it from utils/version.py (read as text: tomllib needs Python 3.11).
    pyproject = _read("pyproject.toml")
    assert re.search(r'^dynamic = \["version"\]$', pyproject, re.M)
    assert not re.search(r"^version\s*=\s*\"", pyproject, re.M)
    assert re.search(r'^version = \{ attr = "utils\.version\.__version__" \}$', pyproject, re.M)
    assert re.search(r'^license = "MIT"$', pyproject, re.M)


def test_citation_cff_has_the_required_fields_and_both_papers():
    cff = yaml.safe_load(_read("CITATION.cff"))
    # Required keys of CFF 1.2.0 for the software itself.
    assert cff["cff-version"] == "1.2.0"
    for key in ("message", "title", "authors"):
        assert cff[key], key
    assert all("name" in a or "family-names" in a for a in cff["authors"])
    assert cff["type"] == "software" and cff["license"] == "MIT"
    assert str(cff["version"]) == __version__
    refs = {r["title"].split(":")[0]: r for r in cff["references"]}
    clipreid = refs["CLIP-ReID"]
    assert [a["family-names"] for a in clipreid["authors"]] == ["Li", "Sun", "Li"]
    assert clipreid["year"] == 2023 and "AAAI" in clipreid["conference"]["name"]
    assert clipreid["identifiers"][0]["value"] == "arXiv:2211.13977"
    pcl = refs[
        "Prototypical Contrastive Learning-based CLIP Fine-tuning for Object Re-identification"
    ]
    assert [a["family-names"] for a in pcl["authors"]] == ["Li", "Gong"]
    assert pcl["identifiers"][0]["value"] == "arXiv:2310.17218"
    for ref in cff["references"]:  # required keys of a CFF reference
        assert ref["type"] and ref["title"] and ref["authors"]


def test_license_and_changelog():
    assert _read("LICENSE").startswith("MIT License\n")
    changelog = _read("CHANGELOG.md")
    assert f"## [{__version__}] - " in changelog
    assert "### Added" in changelog


def test_readme_images_exist_and_are_small():
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", _read("README.md"))
    assert len(images) >= 4
    for rel in images:
        path = os.path.join(ROOT, rel)
        assert os.path.isfile(path), rel
        assert os.path.getsize(path) < 200_000, rel
