"""Logging set-up, per-period progress lines, tqdm on terminals and ``metrics.jsonl``."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from utils.dist import is_main_process

T = TypeVar("T")

_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"


def setup_logger(output_dir: str | None, rank: int = 0, filename: str = "train_log.txt") -> None:
    """Configure the root logger once: stdout, plus ``output_dir/filename`` (appended) on rank 0.

    Args:
        output_dir: folder of the log file; None or '' logs to stdout only.
        rank: process rank; ranks other than 0 log warnings only.
        filename: log file name inside ``output_dir``.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_clipreid", False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter(_FORMAT)
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    stream._clipreid = True  # type: ignore[attr-defined]
    root.addHandler(stream)
    if output_dir and rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        # Appended, not overwritten: a resumed run keeps the log of the interrupted one.
        file_handler = logging.FileHandler(os.path.join(output_dir, filename), mode="a")
        file_handler.setFormatter(fmt)
        file_handler._clipreid = True  # type: ignore[attr-defined]
        root.addHandler(file_handler)
    logging.captureWarnings(True)


def interactive() -> bool:
    """True when progress bars make sense: stderr is a terminal and this is rank 0."""
    return sys.stderr.isatty() and is_main_process()


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
    """Wrap a long loop in a tqdm bar on a terminal; return it unchanged otherwise.

    Args:
        iterable: the loop.
        total: its length, if known.
        desc: the bar's label.

    Returns:
        An iterator over the same items.
    """
    if interactive():
        from tqdm import tqdm

        return iter(tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True))
    return iter(iterable)


def append_metrics(output_dir: str, record: dict[str, Any]) -> None:
    """Append one JSON line to ``output_dir/metrics.jsonl`` (rank 0 only).

    Args:
        output_dir: run folder.
        record: JSON-serialisable values; a wall-clock ``time`` field is added.
    """
    if not output_dir or not is_main_process():
        return
    os.makedirs(output_dir, exist_ok=True)
    record = {"time": round(time.time(), 3), **record}
    with open(os.path.join(output_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=float) + "\n")


class PeriodMeter:
    """Running means of named values over a logging period, with throughput.

    Args:
        names: nothing needed up front; values are added by name as they come.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new period."""
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.images = 0
        self.start = time.perf_counter()

    def update(self, values: dict[str, float], images: int = 0) -> None:
        """Add one iteration's values.

        Args:
            values: name -> scalar.
            images: images processed in this iteration (for img/s).
        """
        for name, value in values.items():
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
            self.counts[name] = self.counts.get(name, 0) + 1
        self.images += images

    def mean(self, name: str) -> float:
        """Mean of ``name`` over the period (nan if never updated)."""
        return self.sums[name] / self.counts[name] if self.counts.get(name) else float("nan")

    def means(self) -> dict[str, float]:
        """All means of the period."""
        return {name: self.mean(name) for name in self.sums}

    def rate(self) -> float:
        """Images per second over the period."""
        elapsed = time.perf_counter() - self.start
        return self.images / elapsed if elapsed > 0 else 0.0
