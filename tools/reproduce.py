"""Reproduce the tables of the CLIP-ReID paper (and the PCL-CLIP rows): train, test, tabulate.

Each (config, dataset, seed) gets its own run folder ``ROOT/<config>/<dataset>/seed<k>``, where
``<config>`` is the config's path below ``configs/`` without the extension (for example
``runs/person/vit_clipreid/msmt17/seed1234``). A run is trained with ``train_clipreid.main``
and tested with ``test_clipreid.main``; a folder that already holds ``test_metrics.json`` is
skipped, a folder with the final weights is only tested, and a folder with ``last.pth`` resumes
training, so the same command can be repeated until everything is done. The markdown table puts
our numbers (mean and sample standard deviation over seeds) next to the paper's; the tables
themselves are data, in ``tools/paper_tables.yaml`` (read by ``tools/paper_tables.py``).

Usage (from the repository root):
    python -m tools.reproduce --rows table2 --dataset-root path/to/data --seeds 1 2 3
    python -m tools.reproduce --rows table3 --dry-run             # print the commands only
    python -m tools.reproduce --rows table2 --dataset market1501  # one column of a table
    python -m tools.reproduce --config configs/person/vit_clipreid.yml --dataset market1501
    python -m tools.reproduce --rows all --table-only --root runs  # tabulate finished runs
    python -m tools.reproduce --rows table2 MODEL.AMP_DTYPE bf16   # extra KEY VALUE overrides

Row groups: table2, table3, table5, table6, table7, table8, tokens (``tabN`` also works), pcl
(PCL-CLIP, supervised), all.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from configs.config import load_cfg
from tools.paper_tables import (
    METRICS_FILE,
    TABLES,
    Table,
    config_key,
    pairs_table,
    restrict_table,
    table_keys,
    write_table,
)
from utils.cli import UsageError, make_parser, parse_args, run_main

logger = logging.getLogger(__name__)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Keys this tool sets itself for every run; a conflicting override would put a run in the wrong
# folder or make it test the wrong weights.
RESERVED_KEYS = ("DATASETS.NAMES", "SOLVER.SEED", "OUTPUT_DIR", "TEST.WEIGHT", "SOLVER.RESUME")


# ------------------------------------------------------------------------------------------------
# Runs: folders, commands, execution
# ------------------------------------------------------------------------------------------------
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
    common = ["--config-file", path, "DATASETS.NAMES", dataset, *base]
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
# Command line
# ------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = make_parser(
        "Train and test the CLIP-ReID paper's table rows (and the PCL-CLIP rows); write a "
        "markdown table. Extra KEY VALUE config overrides (e.g. MODEL.AMP_DTYPE bf16) apply to "
        "every run.",
        prog="python -m tools.reproduce",
        config=None,
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
        raise UsageError("nothing to do: give --rows (e.g. table2) or --config/--dataset pairs")
    tables = [TABLES[k] for k in table_keys(args.rows)]
    pairs: list[tuple[str, str | None]] = []
    if tables and not args.config and args.dataset:
        unknown = set(args.dataset) - {c.dataset for t in tables for c in t.columns}
        if unknown:
            raise UsageError(f"--dataset {sorted(unknown)} is in none of the selected tables")
        tables = [restrict_table(t, set(args.dataset)) for t in tables]
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
            raise UsageError(f"{n} configs but {m} datasets: give 0, 1 or {n} datasets")
        explicit = []
        for config, dataset in zip(configs, datasets or [None] * n, strict=True):
            if dataset is None:
                dataset = str(load_cfg(_config_path(config)).DATASETS.NAMES[0])
            explicit.append((config, dataset))
        pairs += [p for p in explicit if p not in pairs]
        tables.append(pairs_table(explicit))
    return tables, pairs


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run, resume or tabulate the selected rows.

    Args:
        argv: command line without the program name (None: ``sys.argv[1:]``).

    Returns:
        ``{"runs": [run folders], "commands": [shell lines] (dry run), "done": [folders skipped
        as finished], "failed": [folders whose run raised], "table": markdown path or None,
        "markdown": text or None}``.

    Raises:
        utils.cli.UsageError: nothing selected, unknown row group, a reserved override.
        configs.config.ConfigError: a config or override does not load.
    """
    args, overrides = parse_args(_parser(), argv)
    clash = [k for k in overrides[::2] if k in RESERVED_KEYS]
    if args.dataset_root and "DATASETS.ROOT_DIR" in overrides[::2]:
        clash.append("DATASETS.ROOT_DIR (use --dataset-root or the override, not both)")
    if clash:
        raise UsageError(f"these keys are set by the tool for every run: {clash}")
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


def _program(argv: list[str]) -> int:
    """The command line: exit status 1 when a run failed (its traceback is in the log)."""
    _restore_logging()
    return 1 if main(argv)["failed"] else 0


if __name__ == "__main__":
    run_main(_program)
