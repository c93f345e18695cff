"""The CLIP-ReID paper's tables and the PCL-CLIP rows (data in ``paper_tables.yaml``) and our
results beside them.

A table is a list of rows; each cell names the config that produces it and the paper's two
numbers. Finished runs are found below a run-folder root by their config (:func:`config_key`) and
tabulated as mean and sample standard deviation over seeds next to the paper's numbers
(:func:`write_table`). ``tools/reproduce.py`` plans and runs the cells.
"""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from utils.checkpoint import write_text
from utils.cli import UsageError

logger = logging.getLogger(__name__)

TABLES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_tables.yaml")
METRICS_FILE = "test_metrics.json"
TRAIN_CONFIG = "config.yaml"
TEST_CONFIG = "test_config.yaml"
METRIC_LABELS = {"mAP": "mAP", "mINP": "mINP", "rank1": "R1", "rank5": "R5", "rank10": "R10"}


# ------------------------------------------------------------------------------------------------
# The tables
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """One column group of a table: a dataset and the two metrics shown (ours, then the paper's).

    Args:
        header: column title ("MSMT17", or a variant such as "one stage").
        dataset: dataset name as ``DATASETS.NAMES`` spells it.
        metrics: the two keys of ``test_metrics.json`` shown, e.g. ("mAP", "rank1").
    """

    header: str
    dataset: str
    metrics: tuple[str, str]


@dataclass(frozen=True)
class Cell:
    """The config that produces one table cell and the paper's numbers for it.

    Args:
        config: config path relative to the repository root.
        paper: the paper's two numbers in %, or None when the paper gives none.
    """

    config: str
    paper: tuple[float, float] | None


@dataclass(frozen=True)
class Row:
    """One table row: its labels and one cell per column (None: no such experiment).

    Args:
        labels: the row's label columns, e.g. ("ViT-B/16", "CLIP-ReID").
        cells: one entry per column of the table.
    """

    labels: tuple[str, ...]
    cells: tuple[Cell | None, ...]


@dataclass(frozen=True)
class Table:
    """A table of the paper: label headers, column groups and rows.

    Args:
        key: name used by ``--rows`` ("table2", ...).
        title: heading of the table in the markdown output.
        label_headers: headers of the label columns.
        columns: the column groups.
        rows: the rows.
        note: one line printed under the table.
    """

    key: str
    title: str
    label_headers: tuple[str, ...]
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    note: str = ""


def _table_from_data(data: dict, datasets: dict[str, tuple[str, tuple[str, str]]]) -> Table:
    """One table of ``paper_tables.yaml`` (format in the file's header comment)."""
    key = data["key"]
    columns = []
    for col in data["columns"]:
        spec = col if isinstance(col, dict) else {"dataset": col}
        title, metrics = datasets[spec["dataset"]]
        columns.append(Column(spec.get("header", title), spec["dataset"], metrics))
    rows = []
    for row in data["rows"]:
        configs = row.get("configs") or [row["config"]] * len(columns)
        papers = row["paper"]
        if len(configs) != len(columns) or len(papers) != len(columns):
            raise ValueError(
                f"{TABLES_FILE}: table {key!r} row {row['labels']}: {len(columns)} columns but "
                f"{len(configs)} configs and {len(papers)} paper entries"
            )
        cells = tuple(
            None if c is None else Cell(c, None if p is None else (float(p[0]), float(p[1])))
            for c, p in zip(configs, papers, strict=True)
        )
        rows.append(Row(tuple(str(x) for x in row["labels"]), cells))
    return Table(
        key,
        data["title"],
        tuple(data["label_headers"]),
        tuple(columns),
        tuple(rows),
        data.get("note", ""),
    )


def load_tables(
    path: str = TABLES_FILE,
) -> tuple[dict[str, tuple[str, tuple[str, str]]], dict[str, Table]]:
    """Read the paper's tables.

    Args:
        path: the YAML file (default: ``tools/paper_tables.yaml``).

    Returns:
        (dataset name -> (title in the tables, the two metrics its columns show),
        table key -> :class:`Table`, in file order).

    Raises:
        ValueError: a row whose configs or paper numbers do not match its table's columns.
    """
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    datasets = {
        name: (str(d["title"]), (str(d["metrics"][0]), str(d["metrics"][1])))
        for name, d in data["datasets"].items()
    }
    tables = [_table_from_data(t, datasets) for t in data["tables"]]
    return datasets, {t.key: t for t in tables}


DATASETS, TABLES = load_tables()


def table_keys(names: Sequence[str]) -> list[str]:
    """Resolve ``--rows`` names to registry keys (``tabN`` = ``tableN``; ``all`` = every table).

    Args:
        names: names as typed, e.g. ["table2", "tab5"] or ["all"].

    Returns:
        Registry keys in registry order, without duplicates.

    Raises:
        utils.cli.UsageError: an unknown name (the message lists the valid ones).
    """
    wanted: set[str] = set()
    for name in names:
        for part in (p for p in name.split(",") if p):
            key = re.sub(r"^tab(?:le)?(\d)$", r"table\1", part.strip().lower())
            if key == "all":
                wanted |= set(TABLES)
            elif key in TABLES:
                wanted.add(key)
            else:
                raise UsageError(f"unknown row group {part!r}; valid: {', '.join(TABLES)}, all")
    return [k for k in TABLES if k in wanted]


def config_key(config: str) -> str:
    """Name of a config's run-folder level: its path below ``configs/``, without extension.

    Args:
        config: a config path (relative or absolute).

    Returns:
        e.g. "person/vit_clipreid" for "configs/person/vit_clipreid.yml"; the file's stem for a
        file outside a ``configs`` folder.
    """
    parts = os.path.normpath(os.path.splitext(config)[0]).replace("\\", "/").split("/")
    if "configs" in parts[:-1]:
        last = len(parts) - 1 - parts[::-1].index("configs")
        return "/".join(parts[last + 1 :])
    return parts[-1]


def restrict_table(table: Table, datasets: set[str]) -> Table:
    """The columns of a table whose dataset is selected, without rows left empty.

    Args:
        table: the table.
        datasets: dataset names to keep.

    Returns:
        A new table.
    """
    keep = [i for i, c in enumerate(table.columns) if c.dataset in datasets]
    rows = tuple(Row(r.labels, tuple(r.cells[i] for i in keep)) for r in table.rows)
    return Table(
        table.key,
        table.title,
        table.label_headers,
        tuple(table.columns[i] for i in keep),
        tuple(r for r in rows if any(c is not None for c in r.cells)),
        table.note,
    )


# ------------------------------------------------------------------------------------------------
# Finished runs and the markdown tables
# ------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """The test results of one finished run.

    Args:
        dataset: dataset the run was tested on.
        seed: its ``SOLVER.SEED``.
        metrics: ``test_metrics.json`` (fractions in [0, 1]).
        notes: settings worth flagging in the table ("re-ranking", "test size 1600").
        path: the run folder.
    """

    dataset: str
    seed: int
    metrics: dict[str, float]
    notes: tuple[str, ...]
    path: str


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    return data if isinstance(data, dict) else {}


def _get(cfg: dict, key: str) -> Any:
    """``cfg['A']['B']`` for ``key`` 'A.B'; None when any level is missing."""
    node: Any = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _read_run(folder: str) -> RunResult | None:
    """Read one run folder; dataset and seed come from its config, else from the folder names."""
    with open(os.path.join(folder, METRICS_FILE), encoding="utf-8") as f:
        metrics = json.load(f)
    bad = [
        k
        for k in ("mAP", "rank1")
        if not isinstance(metrics.get(k), (int, float)) or not 0.0 <= metrics[k] <= 1.0
    ]
    if bad:
        logger.warning("skipping %s: %s missing or not a fraction in [0, 1]", folder, bad)
        return None
    train_cfg = _read_yaml(os.path.join(folder, TRAIN_CONFIG))
    test_cfg = _read_yaml(os.path.join(folder, TEST_CONFIG)) or train_cfg
    run_cfg = train_cfg or test_cfg
    parts = os.path.normpath(folder).replace("\\", "/").split("/")
    names = _get(run_cfg, "DATASETS.NAMES")
    if names:
        dataset = str(names[0] if isinstance(names, list) else names)
    elif len(parts) >= 2:
        dataset = parts[-2]
    else:
        return None
    seed = _get(run_cfg, "SOLVER.SEED")
    if seed is None:
        match = re.fullmatch(r"seed(\d+)", parts[-1])
        if not match:
            logger.warning("skipping %s: no config.yaml and no seed<k> folder name", folder)
            return None
        seed = int(match.group(1))
    notes = []
    if _get(test_cfg, "TEST.RE_RANKING") is True:
        notes.append("re-ranking")
    size = _get(test_cfg, "DATASETS.VEHICLEID_TEST_SIZE")
    if dataset == "VehicleID" and size not in (None, 800):
        notes.append(f"test size {size}")
    return RunResult(dataset, int(seed), metrics, tuple(notes), folder)


def gather_runs(root: str, keys: Sequence[str]) -> dict[tuple[str, str], dict[int, RunResult]]:
    """Collect every finished run below ``root/<key>`` for the given config keys.

    A run folder is any folder holding ``test_metrics.json``; it belongs to the longest key whose
    folder contains it, so results copied in from other machines need only be placed below the
    right ``root/<key>`` folder. Dataset and seed are read from the run's ``config.yaml``.

    Args:
        root: run-folder root.
        keys: config keys (see :func:`config_key`).

    Returns:
        ``{(key, dataset): {seed: result}}``; of two folders with the same key, dataset and seed
        the first in sorted path order is kept (with a warning).
    """
    found: dict[tuple[str, str], dict[int, RunResult]] = {}
    ordered = sorted(set(keys), key=lambda k: -len(k.split("/")))
    claimed: set[str] = set()
    for key in ordered:
        top = os.path.join(root, *key.split("/"))
        for folder, dirs, files in os.walk(top):
            dirs.sort()  # top-down walk in sorted order: the same on every filesystem
            if METRICS_FILE not in files or folder in claimed:
                continue
            claimed.add(folder)
            result = _read_run(folder)
            if result is None:
                continue
            slot = found.setdefault((key, result.dataset), {})
            if result.seed in slot:
                logger.warning(
                    "%s repeats seed %d of %s; ignored",
                    folder,
                    result.seed,
                    slot[result.seed].path,
                )
                continue
            slot[result.seed] = result
    return found


def format_cell(results: Sequence[RunResult], metrics: tuple[str, str], notes: bool = True) -> str:
    """Our numbers for one cell: "a / b (n seeds)", with "± std" over several seeds.

    Args:
        results: the finished runs of the cell (any number of seeds).
        metrics: the two metrics shown.
        notes: append settings that differ from the paper's protocol.

    Returns:
        Percentages with one decimal; the sample standard deviation (n - 1) when n > 1; "–" when
        there is no run.
    """
    if not results:
        return "–"
    parts = []
    for metric in metrics:
        values = [100.0 * float(r.metrics[metric]) for r in results if metric in r.metrics]
        if not values:
            parts.append("–")
        elif len(values) == 1:
            parts.append(f"{values[0]:.1f}")
        else:
            parts.append(f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}")
    n = len(results)
    extra = [f"{n} seed" + ("s" if n > 1 else "")]
    if notes:
        extra += sorted({note for r in results for note in r.notes})
    return f"{' / '.join(parts)} ({'; '.join(extra)})"


def _paper(pair: tuple[float, float] | None) -> str:
    return "–" if pair is None else f"{pair[0]:.1f} / {pair[1]:.1f}"


def render_table(
    table: Table,
    runs: dict[tuple[str, str], dict[int, RunResult]],
    seeds: Sequence[int] | None = None,
) -> str:
    """Markdown of one table: per column group our numbers, then the paper's.

    Args:
        table: the table.
        runs: output of :func:`gather_runs`.
        seeds: only these seeds (None: every finished seed).

    Returns:
        A markdown section (heading, table, note).
    """
    header = list(table.label_headers)
    for col in table.columns:
        m = " / ".join(METRIC_LABELS[k] for k in col.metrics)
        header += [f"{col.header} {m}", "paper"]
    lines = [f"## {table.title}", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(" --- " for _ in header) + "|")
    for row in table.rows:
        cells = list(row.labels)
        for col, cell in zip(table.columns, row.cells, strict=True):
            if cell is None:
                cells += ["", ""]
                continue
            by_seed = runs.get((config_key(cell.config), col.dataset), {})
            chosen = [by_seed[s] for s in sorted(by_seed) if seeds is None or s in seeds]
            cells += [format_cell(chosen, col.metrics), _paper(cell.paper)]
        lines.append("| " + " | ".join(cells) + " |")
    if table.note:
        lines += ["", table.note]
    return "\n".join(lines) + "\n"


def _paper_lookup(key: str, dataset: str, metrics: tuple[str, str]) -> tuple[float, float] | None:
    for table in TABLES.values():
        for row in table.rows:
            for col, cell in zip(table.columns, row.cells, strict=True):
                if (
                    cell is not None
                    and col.dataset == dataset
                    and col.metrics == metrics
                    and config_key(cell.config) == key
                ):
                    return cell.paper
    return None


def pairs_table(pairs: Sequence[tuple[str, str]]) -> Table:
    """A table for explicit ``--config``/``--dataset`` pairs: rows = configs, columns = datasets.

    Args:
        pairs: (config path, dataset) pairs.

    Returns:
        A table whose paper numbers come from the registry where it has the same experiment.
    """
    datasets = list(dict.fromkeys(d for _, d in pairs))
    configs = list(dict.fromkeys(c for c, _ in pairs))
    # A dataset outside the paper's tables shows mAP / R1, as the person and VeRi columns.
    title_metrics = {d: DATASETS.get(d, (d, ("mAP", "rank1"))) for d in datasets}
    columns = tuple(Column(title, d, metrics) for d, (title, metrics) in title_metrics.items())
    rows = []
    for config in configs:
        cells = []
        for col in columns:
            if (config, col.dataset) in pairs:
                paper = _paper_lookup(config_key(config), col.dataset, col.metrics)
                cells.append(Cell(config, paper))
            else:
                cells.append(None)
        rows.append(Row((config_key(config),), tuple(cells)))
    return Table("runs", "Selected runs", ("Config",), columns, tuple(rows))


def render_markdown(
    tables: Sequence[Table],
    runs: dict[tuple[str, str], dict[int, RunResult]],
    seeds: Sequence[int] | None = None,
) -> str:
    """The whole results file.

    Args:
        tables: tables to render, in order.
        runs: output of :func:`gather_runs`.
        seeds: only these seeds (None: every finished seed).

    Returns:
        Markdown text.
    """
    intro = (
        "# CLIP-ReID reproduction results\n\n"
        "Our numbers are the mean ± sample standard deviation over the seeds shown, in %, "
        "from each run's test_metrics.json (single query, no re-ranking unless a cell says "
        'so); "–" marks a run that has not finished. "paper" is the number published in the '
        "CLIP-ReID paper (PCL-CLIP rows: in the PCL-CLIP paper, as the table's note says).\n"
    )
    return intro + "".join("\n" + render_table(t, runs, seeds) for t in tables)


def write_table(
    path: str,
    tables: Sequence[Table],
    root: str,
    seeds: Sequence[int] | None = None,
) -> str:
    """Gather the finished runs below ``root`` and write the markdown tables to ``path``.

    Args:
        path: output file (its folder is created).
        tables: tables to render.
        root: run-folder root.
        seeds: only these seeds (None: every finished seed).

    Returns:
        The markdown text written.
    """
    keys = {config_key(c.config) for t in tables for r in t.rows for c in r.cells if c}
    text = render_markdown(tables, gather_runs(root, sorted(keys)), seeds)
    write_text(path, text)
    return text
