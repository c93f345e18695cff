"""Check a dataset tree before a long run: layout, file names, readable images, split sizes.

Examples::

    python -m tools.check_dataset --name market1501 --root /data
    python -m tools.check_dataset --config_file configs/person/vit_clipreid.yml \
        DATASETS.ROOT_DIR /data
    python -m tools.check_dataset --name veri --root /data --decode

Every dataset of ``DATASETS.NAMES`` is read as a run would read it (same layouts, same options)
and checked: the layout (missing folders or lists, malformed names or list lines), images
skipped for their file name, other files in the image folders, every image readable (header
check; ``--decode`` decodes every image), and the identity / image / camera counts of each split,
compared with the published statistics of the benchmark when the tree is one of them
(``--subset`` when it is a deliberately reduced copy). The report goes to stdout.

Exit status: 0 when every check passes (warnings allowed), 1 when a check fails, 2 on a usage or
configuration error.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.config import load_cfg  # noqa: E402
from datasets.bases import (  # noqa: E402
    ISSUE,
    ISSUE_EVALUATION,
    ISSUE_FILE_NAME,
    ISSUE_NON_IMAGE,
    MAX_LISTED,
    DatasetFormatError,
    DatasetLayoutError,
    PublishedSplit,
    ReIDDataset,
    SplitStats,
    compute_stats,
)
from datasets.build import check_dataset, dataset_names, dataset_options  # noqa: E402
from datasets.image_dataset import check_images_readable  # noqa: E402
from datasets.layouts import DatasetOptions, Layout, get_layout  # noqa: E402

PASS, WARN, FAIL, INFO = "PASS", "WARN", "FAIL", "INFO"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


@dataclass(frozen=True)
class CheckResult:
    """One line of the report.

    Attributes:
        status: PASS, WARN (reported, does not fail), FAIL or INFO.
        check: what was checked.
        detail: what was found (may span lines).
    """

    status: str
    check: str
    detail: str


class _Collect(logging.Handler):
    """Keeps the warnings of the datasets package for the report."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _datasets_warnings() -> Iterator[list[logging.LogRecord]]:
    """Collect the warnings logged under ``datasets`` (they go to the report, not stderr)."""
    log = logging.getLogger("datasets")
    handler, propagate = _Collect(), log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        yield handler.records
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


def _issues(records: list[logging.LogRecord], kind: str | None) -> list[str]:
    """Messages of the collected warnings of one kind (None: untagged ones)."""
    return [r.getMessage() for r in records if getattr(r, ISSUE, None) == kind]


def split_statistics(dataset: ReIDDataset) -> dict[str, SplitStats]:
    """Counts of every split, plus the whole test pool of a dataset with trials.

    Args:
        dataset: a parsed dataset.

    Returns:
        ``{split: SplitStats}``.
    """
    stats = dataset.statistics()
    if dataset.test_pool is not None:
        stats["test"] = compute_stats(dataset.test_pool)
    return stats


def compare_published(
    stats: Mapping[str, SplitStats], published: Mapping[str, PublishedSplit]
) -> list[str]:
    """Differences between counted and published split sizes.

    Args:
        stats: the counted splits.
        published: the published figures (an image count of None is not compared).

    Returns:
        One line per differing split, e.g. ``'query: 750 ids / 3,367 images, published 750 /
        3,368'``; empty when they agree.
    """
    out = []
    for split, want in published.items():
        got = stats[split]
        if got.num_ids != want.num_ids or want.num_images not in (None, got.num_images):
            want_images = "?" if want.num_images is None else f"{want.num_images:,}"
            out.append(
                f"{split}: {got.num_ids:,} ids / {got.num_images:,} images, published "
                f"{want.num_ids:,} / {want_images}"
            )
    return out


def _statistics_table(
    stats: Mapping[str, SplitStats], published: Mapping[str, PublishedSplit] | None
) -> str:
    lines = ["  split   |  # ids | # images | # cameras | published ids / images"]
    for split, st in stats.items():
        pub = (published or {}).get(split)
        text = ""
        if pub is not None:
            images = "?" if pub.num_images is None else f"{pub.num_images:,}"
            text = f"{pub.num_ids:,} / {images}"
        lines.append(
            f"  {split:<7} | {st.num_ids:6,} | {st.num_images:8,} | {st.num_cameras:9,} | {text}"
        )
    return "\n".join(lines)


def _listed(lines: Sequence[str]) -> str:
    more = [f"... and {len(lines) - MAX_LISTED} more"] if len(lines) > MAX_LISTED else []
    return "\n".join([*lines[:MAX_LISTED], *more])


def _record_checks(records: list[logging.LogRecord]) -> list[CheckResult]:
    """Turn the warnings of a load into report lines."""
    names = _issues(records, ISSUE_FILE_NAME)
    out = [
        CheckResult(FAIL, "file names", _listed(names))
        if names
        else CheckResult(PASS, "file names", "no image skipped for its name")
    ]
    kinds = ((ISSUE_NON_IMAGE, "other files"), (ISSUE_EVALUATION, "evaluation"), (None, "load"))
    for kind, check in kinds:
        found = _issues(records, kind)
        if found:
            out.append(CheckResult(WARN, check, _listed(found)))
    return out


def check_one(
    layout: Layout, root: str, options: DatasetOptions, decode: bool, subset: bool
) -> tuple[list[CheckResult], str]:
    """Run every check on one dataset.

    Args:
        layout: the dataset's layout.
        root: ``DATASETS.ROOT_DIR``.
        options: the dataset settings of the run.
        decode: decode every image instead of the header check.
        subset: the tree is a deliberately reduced copy: differences from the published
            statistics are warnings, not failures.

    Returns:
        (report lines, statistics table or '' when the layout could not be read).
    """
    with _datasets_warnings() as records:
        try:
            dataset = layout.load(root, options)
        except (DatasetLayoutError, DatasetFormatError) as err:
            return [CheckResult(FAIL, "layout", str(err))], ""
        check_dataset(dataset)
    results = [CheckResult(PASS, "layout", f"read from {dataset.root}")]
    results += _record_checks(records)

    pool = dataset.test_pool or []
    images = [*dataset.train, *dataset.query, *dataset.gallery, *pool]
    bad = check_images_readable(images, f"{layout.name} images", decode=decode)
    how = "full decode" if decode else "header check; --decode decodes every image"
    checked = len({r.path for r in images})
    if bad:
        lines = [f"{b.path}: {b.reason}" for b in bad]
        detail = f"{len(bad):,} of {checked:,} unreadable ({how}):\n{_listed(lines)}"
        results.append(CheckResult(FAIL, "images", detail))
    else:
        results.append(CheckResult(PASS, "images", f"{checked:,} readable ({how})"))

    stats = split_statistics(dataset)
    published = layout.published_stats(options)
    if published is None:
        results.append(CheckResult(INFO, "statistics", f"no published figures for {layout.name}"))
    elif diffs := compare_published(stats, published):
        status, note = (WARN, " (--subset)") if subset else (FAIL, "")
        detail = f"differ from the published {layout.name} figures{note}:\n" + "\n".join(diffs)
        results.append(CheckResult(status, "statistics", detail))
    else:
        results.append(
            CheckResult(PASS, "statistics", f"match the published {layout.name} figures")
        )
    return results, _statistics_table(stats, published)


def format_report(name: str, root: str, results: Sequence[CheckResult], table: str) -> str:
    """Render the checks of one dataset.

    Args:
        name: dataset name.
        root: ``DATASETS.ROOT_DIR``.
        results: its checks.
        table: its statistics table ('' for none).

    Returns:
        A multi-line block.
    """
    lines = [f"Dataset {name} (DATASETS.ROOT_DIR = {root})"]
    if table:
        lines.append(table)
    for r in results:
        first, *rest = r.detail.split("\n")
        lines.append(f"  {r.status}  {r.check:<12} {first}")
        lines += [f"        {' ' * 12} {line}" for line in rest]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Exit status: 0 all checks passed, 1 a check failed, 2 usage/config error.",
    )
    parser.add_argument(
        "--config_file", "--config-file", default="", help="run config (its DATASETS.* is used)"
    )
    parser.add_argument("--name", default="", help="dataset name (sets DATASETS.NAMES)")
    parser.add_argument("--root", default="", help="folder holding the dataset folders (ROOT_DIR)")
    parser.add_argument("--decode", action="store_true", help="decode every image fully")
    parser.add_argument(
        "--subset",
        action="store_true",
        help="a deliberately reduced copy: differences from published figures only warn",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides (last)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Check every dataset of the config and print the report.

    Args:
        argv: arguments without the program name (None: ``sys.argv[1:]``).

    Returns:
        0 when every check passes, 1 when one fails, 2 on a usage or configuration error.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse's usage error (2) or --help (0)
        return int(exit_.code or 0)
    if not (args.config_file or args.name):
        parser.print_usage(sys.stderr)
        print("error: give --config_file FILE or --name NAME", file=sys.stderr)
        return EXIT_USAGE
    opts = list(args.opts)
    if any(o.startswith("--") for o in opts):
        print(f"error: flags go before the KEY VALUE overrides: {' '.join(opts)}", file=sys.stderr)
        return EXIT_USAGE
    opts += ["DATASETS.NAMES", args.name] if args.name else []
    opts += ["DATASETS.ROOT_DIR", args.root] if args.root else []
    try:
        cfg = load_cfg(args.config_file or None, opts)
        layouts = [get_layout(n) for n in dataset_names(cfg)]
    except (OSError, ValueError, KeyError) as err:  # ConfigError, UnknownDatasetError, no file
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    options, root = dataset_options(cfg), str(cfg.DATASETS.ROOT_DIR)
    blocks, failed, warnings = [], [], 0
    for layout in layouts:
        results, table = check_one(layout, root, options, args.decode, args.subset)
        blocks.append(format_report(layout.name, root, results, table))
        failed += [f"{layout.name} {r.check}" for r in results if r.status == FAIL]
        warnings += sum(r.status == WARN for r in results)
    verdict = f"FAILED: {', '.join(failed)}" if failed else "all checks passed"
    if warnings:
        verdict += f" ({warnings} warning(s))"
    print("\n\n".join(blocks) + f"\n\nResult: {verdict}")
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
