"""Reproduce the tables of the CLIP-ReID paper: train and test every row, then tabulate.

Each (config, dataset, seed) gets its own run folder ``ROOT/<config>/<dataset>/seed<k>``, where
``<config>`` is the config's path below ``configs/`` without the extension (for example
``runs/person/vit_clipreid/msmt17/seed1234``). A run is trained with ``train_clipreid.main``
and tested with ``test_clipreid.main``; a folder that already holds ``test_metrics.json`` is
skipped, a folder with the final weights is only tested, and a folder with ``last.pth`` resumes
training, so the same command can be repeated until everything is done. The markdown table puts
our numbers (mean and sample standard deviation over seeds) next to the paper's.

Usage (from the repository root):
    python -m tools.reproduce --rows table2 --dataset-root path/to/data --seeds 1 2 3
    python -m tools.reproduce --rows table3 --dry-run             # print the commands only
    python -m tools.reproduce --rows table2 --dataset market1501  # one column of a table
    python -m tools.reproduce --config configs/person/vit_clipreid.yml --dataset market1501
    python -m tools.reproduce --rows all --table-only --root runs  # tabulate finished runs
    python -m tools.reproduce --rows table2 MODEL.AMP_DTYPE bf16   # extra KEY VALUE overrides

Row groups: table2, table3, table5, table6, table7, table8, tokens (``tabN`` also works), all.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import shlex
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

if __package__ in (None, ""):
    # Run as a script (``python tools/reproduce.py``): make the repository root importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.config import load_cfg  # noqa: E402

logger = logging.getLogger(__name__)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS_FILE = "test_metrics.json"
TRAIN_CONFIG = "config.yaml"
TEST_CONFIG = "test_config.yaml"
# Keys this tool sets itself for every run; a conflicting override would put a run in the wrong
# folder or make it test the wrong weights.
RESERVED_KEYS = ("DATASETS.NAMES", "SOLVER.SEED", "OUTPUT_DIR", "TEST.WEIGHT", "SOLVER.RESUME")
_SECTIONS = ("MODEL", "INPUT", "DATASETS", "DATALOADER", "SOLVER", "TEST")
_KEY = re.compile(rf"(?:{'|'.join(_SECTIONS)})(?:\.[A-Z0-9_]+)+|OUTPUT_DIR")

# Dataset name -> (name in the paper's tables, the two metrics its column shows).
DATASETS: dict[str, tuple[str, tuple[str, str]]] = {
    "msmt17": ("MSMT17", ("mAP", "rank1")),
    "market1501": ("Market-1501", ("mAP", "rank1")),
    "dukemtmc": ("DukeMTMC-reID", ("mAP", "rank1")),
    "occ_duke": ("Occluded-Duke", ("mAP", "rank1")),
    "veri": ("VeRi-776", ("mAP", "rank1")),
    "VehicleID": ("VehicleID", ("rank1", "rank5")),
}
METRIC_LABELS = {"mAP": "mAP", "mINP": "mINP", "rank1": "R1", "rank5": "R5", "rank10": "R10"}


# ------------------------------------------------------------------------------------------------
# Registry of the paper's table rows
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


def _col(dataset: str, header: str | None = None) -> Column:
    name, metrics = DATASETS[dataset]
    return Column(header or name, dataset, metrics)


def _row(labels: tuple[str, ...], *cells: tuple[str, tuple[float, float] | None] | None) -> Row:
    return Row(labels, tuple(None if c is None else Cell(c[0], c[1]) for c in cells))


_P = "configs/person/"
_A = "configs/person/ablations/"
_PERSON = tuple(_col(d) for d in ("msmt17", "market1501", "dukemtmc", "occ_duke"))
_MSMT = (_col("msmt17"),)

TABLES: dict[str, Table] = {
    t.key: t
    for t in (
        Table(
            "table2",
            "Table 2: person re-ID, mAP / R1 (%)",
            ("Backbone", "Method"),
            _PERSON,
            (
                _row(
                    ("CNN", "baseline"),
                    (_P + "cnn_base.yml", (60.7, 82.1)),
                    (_P + "cnn_base.yml", (88.1, 94.7)),
                    (_P + "cnn_base.yml", (79.3, 88.6)),
                    (_P + "cnn_base.yml", (47.4, 54.2)),
                ),
                _row(
                    ("CNN", "CLIP-ReID"),
                    (_P + "cnn_clipreid.yml", (63.0, 84.4)),
                    (_P + "cnn_clipreid.yml", (89.8, 95.7)),
                    (_P + "cnn_clipreid.yml", (80.7, 90.0)),
                    (_P + "cnn_clipreid.yml", (53.5, 61.0)),
                ),
                _row(
                    ("ViT-B/16", "baseline"),
                    (_P + "vit_base.yml", (66.1, 84.4)),
                    (_P + "vit_base.yml", (86.4, 93.3)),
                    (_P + "vit_base.yml", (80.0, 88.8)),
                    (_P + "vit_base.yml", (53.5, 60.8)),
                ),
                _row(
                    ("ViT-B/16", "CLIP-ReID"),
                    (_P + "vit_clipreid.yml", (73.4, 88.7)),
                    (_P + "vit_clipreid.yml", (89.6, 95.5)),
                    (_P + "vit_clipreid.yml", (82.5, 90.0)),
                    (_P + "vit_clipreid.yml", (59.5, 67.1)),
                ),
                _row(
                    ("ViT-B/16", "CLIP-ReID + SIE + OLP"),
                    (_P + "vit_clipreid_sie_olp.yml", (75.8, 89.7)),
                    (_P + "vit_clipreid_sie_olp.yml", (90.5, 95.4)),
                    (_P + "vit_clipreid_sie_olp.yml", (83.1, 90.8)),
                    (_P + "vit_clipreid_sie_olp.yml", (60.3, 67.2)),
                ),
            ),
        ),
        Table(
            "table3",
            "Table 3: vehicle re-ID, VeRi-776 mAP / R1, VehicleID R1 / R5 (%)",
            ("Backbone", "Method"),
            (_col("veri"), _col("VehicleID")),
            (
                _row(
                    ("CNN", "baseline"),
                    ("configs/veri/cnn_base.yml", (79.3, 95.7)),
                    ("configs/vehicleid/cnn_base.yml", (84.4, 96.6)),
                ),
                _row(
                    ("CNN", "CLIP-ReID"),
                    ("configs/veri/cnn_clipreid.yml", (80.3, 96.8)),
                    ("configs/vehicleid/cnn_clipreid.yml", (85.2, 97.1)),
                ),
                _row(
                    ("ViT-B/16", "baseline"),
                    ("configs/veri/vit_base.yml", (79.3, 95.7)),
                    ("configs/vehicleid/vit_base.yml", (84.2, 96.6)),
                ),
                _row(
                    ("ViT-B/16", "CLIP-ReID"),
                    ("configs/veri/vit_clipreid.yml", (83.3, 97.4)),
                    ("configs/vehicleid/vit_clipreid.yml", (85.3, 97.6)),
                ),
                _row(
                    ("ViT-B/16", "CLIP-ReID + SIE + OLP (VeRi) / + OLP (VehicleID)"),
                    ("configs/veri/vit_clipreid_sie_olp.yml", (84.5, 97.3)),
                    ("configs/vehicleid/vit_clipreid_olp.yml", (85.5, 97.2)),
                ),
            ),
            "VehicleID: test size 800, averaged over the gallery draws (TEST.VEHICLEID_TRIALS).",
        ),
        Table(
            "table5",
            "Table 5: one-stage vs two-stage training, MSMT17 mAP / R1 (%)",
            ("Backbone",),
            (
                _col("msmt17", "baseline"),
                _col("msmt17", "one stage"),
                _col("msmt17", "two stage"),
            ),
            (
                _row(
                    ("CNN",),
                    (_P + "cnn_base.yml", (60.7, 82.1)),
                    (_A + "cnn_one_stage.yml", (61.9, 82.8)),
                    (_P + "cnn_clipreid.yml", (63.0, 84.4)),
                ),
                _row(
                    ("ViT-B/16",),
                    (_P + "vit_base.yml", (66.1, 84.4)),
                    (_A + "vit_one_stage.yml", (68.9, 85.9)),
                    (_P + "vit_clipreid.yml", (73.4, 88.7)),
                ),
            ),
        ),
        Table(
            "table6",
            "Table 6: stage-2 text losses, ViT-B/16, MSMT17 mAP / R1 (%)",
            ("Stage-2 text loss",),
            _MSMT,
            (
                _row(("none (baseline)",), (_P + "vit_base.yml", (66.1, 84.4))),
                _row(("i2t + t2i",), (_A + "vit_s2_i2t_t2i.yml", (71.3, 87.5))),
                _row(("i2t",), (_A + "vit_s2_i2t.yml", (71.7, 87.6))),
                _row(("i2tce + t2i",), (_A + "vit_s2_i2tce_t2i.yml", (73.2, 88.6))),
                _row(("i2tce (CLIP-ReID)",), (_P + "vit_clipreid.yml", (73.4, 88.7))),
            ),
        ),
        Table(
            "table7",
            "Table 7: SIE and OLP, ViT-B/16, MSMT17 mAP / R1 (%)",
            ("Variant",),
            _MSMT,
            (
                _row(("none",), (_P + "vit_clipreid.yml", (73.4, 88.7))),
                _row(("SIE-all",), (_A + "vit_sie_all.yml", (74.3, 88.6))),
                _row(("SIE-cls",), (_A + "vit_sie_cls.yml", (74.5, 88.8))),
                _row(("OLP",), (_A + "vit_olp.yml", (74.6, 89.5))),
                _row(("SIE-cls + OLP",), (_P + "vit_clipreid_sie_olp.yml", (75.8, 89.7))),
            ),
        ),
        Table(
            "table8",
            "Table 8 (supplementary): stage-1 variants, ViT-B/16, mAP / R1 (%)",
            ("Stage 1",),
            (_col("msmt17"), _col("market1501")),
            (
                _row(
                    ("average",),
                    (_A + "vit_stage1_average.yml", (72.4, 88.3)),
                    (_A + "vit_stage1_average.yml", (89.3, 95.2)),
                ),
                _row(
                    ("instance (CLIP-ReID)",),
                    (_P + "vit_clipreid.yml", (73.4, 88.6)),
                    (_P + "vit_clipreid.yml", (89.6, 95.5)),
                ),
            ),
        ),
        Table(
            "tokens",
            "Learnable prompt tokens M, ViT-B/16, MSMT17 mAP / R1 (%)",
            ("M",),
            _MSMT,
            (
                _row(("1",), (_A + "vit_m1.yml", None)),
                _row(("4 (CLIP-ReID)",), (_P + "vit_clipreid.yml", (73.4, 88.7))),
                _row(("8",), (_A + "vit_m8.yml", None)),
            ),
            "The paper gives no numbers for M = 1 and 8, only that M = 4 is best.",
        ),
    )
}


def table_keys(names: Sequence[str]) -> list[str]:
    """Resolve ``--rows`` names to registry keys (``tabN`` = ``tableN``; ``all`` = every table).

    Args:
        names: names as typed, e.g. ["table2", "tab5"] or ["all"].

    Returns:
        Registry keys in registry order, without duplicates.

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
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
                raise ValueError(f"unknown row group {part!r}; valid: {', '.join(TABLES)}, all")
    return [k for k in TABLES if k in wanted]


# ------------------------------------------------------------------------------------------------
# Runs: folders, commands, execution
# ------------------------------------------------------------------------------------------------
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


def run_dir(root: str, config: str, dataset: str, seed: int) -> str:
    """Folder of one run.

    Args:
        root: ``--root``.
        config: config path.
        dataset: dataset name.
        seed: ``SOLVER.SEED``.

    Returns:
        ``root/<config_key>/<dataset>/seed<seed>``.
    """
    return os.path.join(root, *config_key(config).split("/"), dataset, f"seed{seed}")


def _config_path(config: str) -> str:
    """The config as given when it exists from here, else relative to the repository root."""
    if os.path.isfile(config) or os.path.isabs(config):
        return config
    in_repo = os.path.join(REPO, config)
    return in_repo if os.path.isfile(in_repo) else config


@dataclass
class Run:
    """One planned run.

    Args:
        config: config path passed to ``--config_file``.
        dataset: dataset name.
        seed: ``SOLVER.SEED``.
        output_dir: the run folder.
        weights: the final weights file that training writes and testing reads.
        train_argv: arguments of ``train_clipreid.main``.
        test_argv: arguments of ``test_clipreid.main``.
    """

    config: str
    dataset: str
    seed: int
    output_dir: str
    weights: str
    train_argv: list[str] = field(default_factory=list)
    test_argv: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        """True when the run folder already holds the test results."""
        return os.path.isfile(os.path.join(self.output_dir, METRICS_FILE))


def plan_run(
    config: str,
    dataset: str | None,
    seed: int | None,
    root: str,
    dataset_root: str | None,
    overrides: Sequence[str],
) -> Run:
    """Build the commands of one run; the config and overrides are loaded and validated here.

    Args:
        config: config path.
        dataset: dataset name; None takes the config's first ``DATASETS.NAMES``.
        seed: ``SOLVER.SEED``; None takes the config's.
        root: run-folder root.
        dataset_root: ``DATASETS.ROOT_DIR``, or None for the config's.
        overrides: extra ``KEY VALUE`` pairs for both train and test.

    Returns:
        The planned run; ``train_argv`` resumes from ``last.pth`` when the folder holds one.
    """
    path = _config_path(config)
    base = ["DATASETS.ROOT_DIR", dataset_root] if dataset_root else []
    cfg = load_cfg(path, [*base, *(["DATASETS.NAMES", dataset] if dataset else []), *overrides])
    dataset = dataset or str(cfg.DATASETS.NAMES[0])
    seed = int(cfg.SOLVER.SEED) if seed is None else int(seed)
    out = run_dir(root, config, dataset, seed)
    common = ["--config_file", path, "DATASETS.NAMES", dataset, *base]
    common += ["SOLVER.SEED", str(seed), "OUTPUT_DIR", out]
    weights = os.path.join(out, f"{cfg.MODEL.NAME}_{cfg.SOLVER.STAGE2.MAX_EPOCHS}.pth")
    resume = ["SOLVER.RESUME", "auto"] if os.path.isfile(os.path.join(out, "last.pth")) else []
    return Run(
        config=path,
        dataset=dataset,
        seed=seed,
        output_dir=out,
        weights=weights,
        train_argv=[*common, *resume, *overrides],
        test_argv=[*common, "TEST.WEIGHT", weights, *overrides],
    )


def commands(run: Run) -> list[str]:
    """Shell commands (run from the repository root) that finish a run; [] when it is done.

    Args:
        run: a planned run.

    Returns:
        The train command (unless the final weights exist) and the test command.
    """
    if run.done:
        return []
    out = []
    if not os.path.isfile(run.weights):
        out.append(shlex.join(["python", "train_clipreid.py", *run.train_argv]))
    out.append(shlex.join(["python", "test_clipreid.py", *run.test_argv]))
    return out


def execute(run: Run) -> None:
    """Train (unless the final weights exist) and test one run in this process.

    Args:
        run: a planned run that is not done.
    """
    # Imported here: planning, dry runs and tables need neither torch nor the model code.
    import test_clipreid
    import train_clipreid

    if not os.path.isfile(run.weights):
        logger.info("training %s", run.output_dir)
        train_clipreid.main(run.train_argv)
    if not os.path.isfile(run.weights):
        raise FileNotFoundError(f"training finished without writing {run.weights}")
    logger.info("testing %s", run.weights)
    test_clipreid.main(run.test_argv)


def _release_memory() -> None:
    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# Gathering finished runs and writing the table
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
    columns = tuple(_col(d) if d in DATASETS else Column(d, d, ("mAP", "rank1")) for d in datasets)
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
        "CLIP-ReID paper.\n"
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return text


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``KEY VALUE`` config overrides (UPPER.CASE keys, or anything after ``--``).

    Args:
        argv: the command line without the program name.

    Returns:
        (tool arguments, flat override list).
    """
    args: list[str] = []
    opts: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            opts += list(argv[i + 1 :])
            break
        if _KEY.fullmatch(token):
            if i + 1 >= len(argv):
                raise ValueError(f"override {token} has no value")
            opts += [token, argv[i + 1]]
            i += 2
            continue
        args.append(token)
        i += 1
    if len(opts) % 2:
        raise ValueError(f"overrides come in KEY VALUE pairs; got {opts}")
    return args, opts


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.reproduce",
        description="Train and test the CLIP-ReID paper's table rows; write a markdown table. "
        "Extra KEY VALUE config overrides (e.g. MODEL.AMP_DTYPE bf16) may appear anywhere.",
    )
    p.add_argument(
        "--rows",
        nargs="+",
        default=[],
        help=f"row groups of the paper: {', '.join(TABLES)} (or tabN), all",
    )
    p.add_argument(
        "--config",
        action="extend",
        nargs="+",
        default=[],
        help="config(s) to run; paired with --dataset in order",
    )
    p.add_argument(
        "--dataset",
        action="extend",
        nargs="+",
        default=[],
        help="with --config: one dataset per config, or one for all configs, or several for a "
        "single config (none: the config's own); with --rows only: run just these columns",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="SOLVER.SEED values")
    p.add_argument("--root", default="runs", help="folder of the run folders (default: runs)")
    p.add_argument("--dataset-root", default=None, help="DATASETS.ROOT_DIR for every run")
    p.add_argument("--out", default=None, help="markdown file (default: ROOT/results.md)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    mode.add_argument(
        "--table-only", action="store_true", help="only tabulate the finished run folders"
    )
    return p


def _select(args: argparse.Namespace) -> tuple[list[Table], list[tuple[str, str | None]]]:
    """Tables to render and (config, dataset) pairs to run, from the parsed arguments."""
    if not args.rows and not args.config:
        raise ValueError("nothing to do: give --rows (e.g. table2) or --config/--dataset pairs")
    tables = [TABLES[k] for k in table_keys(args.rows)]
    pairs: list[tuple[str, str | None]] = []
    if tables and not args.config and args.dataset:
        unknown = set(args.dataset) - {c.dataset for t in tables for c in t.columns}
        if unknown:
            raise ValueError(f"--dataset {sorted(unknown)} is in none of the selected tables")
        tables = [_restrict(t, set(args.dataset)) for t in tables]
    for table in tables:
        for row in table.rows:
            for col, cell in zip(table.columns, row.cells, strict=True):
                if cell is not None and (cell.config, col.dataset) not in pairs:
                    pairs.append((cell.config, col.dataset))
    if args.config:
        n, m = len(args.config), len(args.dataset)
        if n == 1 and m > 1:
            configs, datasets = args.config * m, list(args.dataset)
        elif m in (0, 1, n):
            configs, datasets = list(args.config), args.dataset * n if m == 1 else args.dataset
        else:
            raise ValueError(f"{n} configs but {m} datasets: give 0, 1 or {n} datasets")
        explicit = []
        for config, dataset in zip(configs, datasets or [None] * n, strict=True):
            if dataset is None:
                dataset = str(load_cfg(_config_path(config)).DATASETS.NAMES[0])
            explicit.append((config, dataset))
        pairs += [p for p in explicit if p not in pairs]
        tables.append(pairs_table(explicit))
    return tables, pairs


def _restrict(table: Table, datasets: set[str]) -> Table:
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


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run, resume or tabulate the selected rows.

    Args:
        argv: command line without the program name (None: ``sys.argv[1:]``).

    Returns:
        ``{"runs": [run folders], "commands": [shell lines] (dry run), "done": [folders skipped
        as finished], "failed": [folders whose run raised], "table": markdown path or None,
        "markdown": text or None}``.
    """
    tool_argv, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = _parser().parse_args(tool_argv)
    clash = [k for k in overrides[::2] if k in RESERVED_KEYS]
    if args.dataset_root and "DATASETS.ROOT_DIR" in overrides[::2]:
        clash.append("DATASETS.ROOT_DIR (use --dataset-root or the override, not both)")
    if clash:
        raise ValueError(f"these keys are set by the tool for every run: {clash}")
    tables, pairs = _select(args)
    out_path = args.out or os.path.join(args.root, "results.md")
    result: dict[str, Any] = {
        "runs": [],
        "commands": [],
        "done": [],
        "failed": [],
        "table": None,
        "markdown": None,
    }

    if not args.table_only:
        seeds: list[int | None] = list(args.seeds) if args.seeds else [None]
        planned = [
            plan_run(c, d, s, args.root, args.dataset_root, overrides)
            for c, d in pairs
            for s in seeds
        ]
        result["runs"] = [r.output_dir for r in planned]
        if args.dry_run:
            for run in planned:
                lines = commands(run)
                if not lines:
                    result["done"].append(run.output_dir)
                    print(f"# done: {run.output_dir}")
                result["commands"] += lines
                for line in lines:
                    print(line)
            return result
        for i, run in enumerate(planned, 1):
            if run.done:
                logger.info("[%d/%d] done already: %s", i, len(planned), run.output_dir)
                result["done"].append(run.output_dir)
                continue
            logger.info(
                "[%d/%d] %s on %s, seed %d", i, len(planned), run.config, run.dataset, run.seed
            )
            try:
                execute(run)
            except Exception:
                logger.exception("run failed: %s", run.output_dir)
                result["failed"].append(run.output_dir)
            finally:
                _release_memory()
                _restore_logging()

    text = write_table(out_path, tables, args.root, args.seeds)
    result["table"], result["markdown"] = out_path, text
    print(text)
    print(f"table written to {out_path}")
    if result["failed"]:
        print(f"{len(result['failed'])} run(s) failed: {', '.join(result['failed'])}")
    return result


def _restore_logging() -> None:
    """Send log lines to stdout only again (an entry script points them at its run folder)."""
    from utils.logger import setup_logger

    setup_logger(None)


if __name__ == "__main__":
    _restore_logging()
    try:
        outcome = main()
    except ValueError as err:  # a usage error (ConfigError included): the message says what to do
        sys.exit(f"error: {err}")
    sys.exit(1 if outcome["failed"] else 0)
