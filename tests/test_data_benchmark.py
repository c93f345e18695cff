"""The data benchmark rewrites only its own section of docs/benchmarks.md."""

from __future__ import annotations

from benchmarks.data_pipeline import HEADING, write_docs

ROWS = [{"source": "128x64", "pipeline": "train", "ours": 300.0, "reference": 200.0, "n": 10}]


def test_write_docs_replaces_only_its_section(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text(
        "# Benchmarks\n\n## Evaluation\n\nkeep me\n\n"
        f"{HEADING}\n\nold figures\n\n## Other\n\nme too\n"
    )
    write_docs(ROWS, 3, str(path))
    text = path.read_text()
    assert "old figures" not in text and "| 128x64 | train | 300 | 200 | 1.50x |" in text
    assert text.startswith("# Benchmarks\n\n## Evaluation\n\nkeep me\n\n" + HEADING)
    assert text.endswith("## Other\n\nme too\n") and text.count(HEADING) == 1

    fresh = tmp_path / "new.md"
    write_docs(ROWS, 3, str(fresh))
    assert fresh.read_text().startswith("# Benchmarks\n\n" + HEADING)
    path.write_text("# Benchmarks\n\n## Evaluation\n\nkeep me\n")
    write_docs(ROWS, 3, str(path))
    assert path.read_text().startswith("# Benchmarks\n\n## Evaluation\n\nkeep me\n\n" + HEADING)
