"""The project's version, written only here: pyproject.toml reads it, CITATION.cff repeats it
(``tests/test_release.py`` checks that they agree).

Semantic versioning; every change is listed in ``CHANGELOG.md`` under its version.
"""

__version__ = "0.1.0"
