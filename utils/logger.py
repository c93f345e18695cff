"""Logging set-up, progress (tqdm on terminals, periodic log lines otherwise), ``metrics.jsonl``."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from utils.checkpoint import write_text
from utils.dist import is_main_process
from utils.metric_sinks import emit_metrics

T = TypeVar("T")

_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"
# Progress off a terminal: one log line at most this often (seconds).
LOG_PERIOD_S = 30.0

logger = logging.getLogger(__name__)


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


class Progress:
    """Progress of a long loop: a tqdm bar on an interactive terminal, log lines otherwise.

    Off a terminal (a log file, a batch job), one line at most every ``LOG_PERIOD_S`` seconds
    gives the count, the share done, the elapsed time and an estimate of the time left.

    Args:
        total: the number of units to do, if known.
        desc: label of the bar and of the log lines.
        unit: what is counted ('batches', 'queries', 'rows').
        enabled: False shows nothing (library calls with ``show_progress=False``).
        log_lines: False shows no log lines off a terminal (loops that log their own lines).
        log: the logger of the log lines (default: this module's), so that they carry the name
            of the module doing the work.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        *,
        enabled: bool = True,
        log_lines: bool = True,
        log: logging.Logger | None = None,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.log_lines = enabled and log_lines
        self.log = log or logger
        self.done = 0
        self.start = self.last_log = time.monotonic()
        self.bar = None
        if enabled and interactive():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done.

        Args:
            n: units finished since the last call.
        """
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        finished = self.total is not None and self.done >= self.total
        if not self.log_lines or finished or now - self.last_log < LOG_PERIOD_S:
            return
        self.last_log = now
        elapsed = now - self.start
        if self.total is None:
            self.log.info("%s: %d %s, %.0f s elapsed", self.desc, self.done, self.unit, elapsed)
            return
        self.log.info(
            "%s: %d/%d %s (%.0f%%), %.0f s elapsed, about %.0f s left",
            self.desc,
            self.done,
            self.total,
            self.unit,
            100.0 * self.done / max(self.total, 1),
            elapsed,
            elapsed * (self.total - self.done) / max(self.done, 1),
        )

    def close(self) -> None:
        """Close the bar; log the total count and time at debug level."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elapsed = time.monotonic() - self.start
        self.log.debug("%s: %d %s in %.1f s", self.desc, self.done, self.unit, elapsed)


def progress(
    iterable: Iterable[T],
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    log_lines: bool = False,
) -> Iterator[T]:
    """Iterate with a :class:`Progress`: tqdm on a terminal, optional log lines otherwise.

    Args:
        iterable: the loop.
        total: its length, if known.
        desc: the label.
        unit: what one item is.
        log_lines: periodic log lines off a terminal (off for loops that log their own).

    Returns:
        An iterator over the same items.
    """
    bar = Progress(total, desc, unit, log_lines=log_lines)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()


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
    emit_metrics(record)  # TensorBoard and other sinks see exactly the records of the file


def rewind_metrics(output_dir: str, until: tuple[int, int] | None) -> None:
    """Drop the ``metrics.jsonl`` records written after a checkpoint (a resumed run rewrites them).

    Args:
        output_dir: run folder.
        until: keep records of (stage, epoch) up to this pair; None empties the file (a fresh
            run). Records without a stage (none today) are kept.
    """
    path = os.path.join(output_dir, "metrics.jsonl")
    if not output_dir or not os.path.isfile(path):
        return
    kept = []
    if until is not None:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                record = json.loads(line)
                at = (record.get("stage"), record.get("epoch"))
                if at[0] is None or at <= tuple(until):
                    kept.append(line if line.endswith("\n") else line + "\n")
    write_text(path, "".join(kept))


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
            if value is None:
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

    def state_dict(self) -> dict:
        """Sums, counts and images so far (plain values, for a mid-epoch checkpoint)."""
        return {"sums": dict(self.sums), "counts": dict(self.counts), "images": self.images}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`; the rate covers the steps after the restart only."""
        self.sums = dict(state["sums"])
        self.counts = dict(state["counts"])

    def rate(self) -> float:
        """Images per second over the period."""
        elapsed = time.perf_counter() - self.start
        return self.images / elapsed if elapsed > 0 else 0.0
