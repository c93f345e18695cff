"""Where the records of ``metrics.jsonl`` also go: metric sinks (TensorBoard) fed the same records.

``utils.logger.append_metrics`` writes each record to ``OUTPUT_DIR/metrics.jsonl`` and hands the
same dict to :func:`emit_metrics`, which calls every installed sink. A sink is any callable taking
one record; it may have a ``close()``. :func:`build_metric_sinks` builds the sinks a config asks
for (``LOG.TENSORBOARD``), and :func:`build_run_logging` installs them for the length of a run,
closes them, and draws the learning curves (``LOG.CURVES``) at the end.

Record to scalars (:func:`record_scalars`): ``time`` is the wall time, ``stage`` the tag prefix
(``stage2/loss``), ``epoch`` (or an explicit ``step``) the step; every other number becomes one
scalar, nested dicts and lists adding path parts (``stage2/eval/mAP``, ``stage2/memory_bank/0``).
Each stage has its own tags, so its epochs are the steps of its curves. Strings and ``None`` are
not scalars and are left out.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from utils.dist import is_main_process

if TYPE_CHECKING:
    from yacs.config import CfgNode

logger = logging.getLogger(__name__)

MetricSink = Callable[[Mapping[str, Any]], None]
# Record fields that place a record (wall time, stage, step) rather than measure something.
PLACE_KEYS = ("time", "stage", "epoch", "step")
# Sub-folder of OUTPUT_DIR for the TensorBoard event files.
TENSORBOARD_DIR = "tensorboard"
# The run's metrics records (written by utils.logger.append_metrics).
METRICS_FILE = "metrics.jsonl"
# File name of the learning curves drawn at the end of a run.
CURVES_FILE = "learning_curves.png"
TENSORBOARD_INSTALL = "pip install tensorboard"

_SINKS: list[MetricSink] = []


def flatten_scalars(
    value: Any, path: str = "", out: dict[str, float] | None = None
) -> dict[str, float]:
    """The numbers inside a value, named by their path (``eval/mAP``, ``memory_bank/0``).

    Args:
        value: a number, or dicts and lists of them (strings and ``None`` are left out).
        path: the name of ``value`` itself ('' at the top).
        out: dict to add to (a new one when None).

    Returns:
        ``{path: float(number)}``; booleans count as 0 / 1.
    """
    out = {} if out is None else out
    if isinstance(value, Mapping):
        for key, sub in value.items():
            flatten_scalars(sub, f"{path}/{key}" if path else str(key), out)
    elif isinstance(value, (list, tuple)):
        for i, sub in enumerate(value):
            flatten_scalars(sub, f"{path}/{i}" if path else str(i), out)
    elif isinstance(value, (bool, int, float)):
        out[path] = float(value)
    elif hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        out[path] = float(value.item())  # numpy / torch scalars
    return out


def record_scalars(record: Mapping[str, Any]) -> tuple[int, float | None, dict[str, float]]:
    """The step, wall time and named scalars of one ``metrics.jsonl`` record.

    Args:
        record: e.g. ``{"time": t, "stage": 2, "epoch": 3, "lr": 1e-3, "loss": 2.1, "id": .8}``
            or ``{"stage": 2, "epoch": 3, "eval": {"mAP": .41, "rank1": .62}}``.

    Returns:
        (step: ``record['step']`` if present, else ``record['epoch']``, else 0;
        wall time: ``record['time']`` or None;
        ``{tag: value}``: tags ``stage{N}/{key}[/{sub}...]`` (no prefix without a stage)).
    """
    step = record.get("step", record.get("epoch", 0))
    wall = record.get("time")
    prefix = f"stage{record['stage']}" if "stage" in record else ""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key not in PLACE_KEYS:
            flatten_scalars(value, f"{prefix}/{key}" if prefix else str(key), out)
    return int(step), (float(wall) if wall is not None else None), out


class TensorBoardSink:
    """Writes each record's scalars to TensorBoard event files (``add_scalar`` per tag).

    Args:
        log_dir: folder of the event files (created if needed).
        flush_secs: how often pending events are written to disk.

    Raises:
        ImportError: the ``tensorboard`` package is missing (the message says how to install it).
    """

    def __init__(self, log_dir: str, flush_secs: int = 30) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                f"TensorBoard logging needs the tensorboard package: {TENSORBOARD_INSTALL}"
            ) from err
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=log_dir, flush_secs=flush_secs)

    def __call__(self, record: Mapping[str, Any]) -> None:
        """Add every scalar of ``record`` at its step and wall time.

        Args:
            record: one ``metrics.jsonl`` record (see :func:`record_scalars`).
        """
        step, wall, scalars = record_scalars(record)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step, walltime=wall)

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


def build_metric_sinks(cfg: CfgNode) -> list[MetricSink]:
    """The sinks a run's config asks for (rank 0 only: other ranks write no metrics).

    Args:
        cfg: the run configuration (``LOG.TENSORBOARD``, ``OUTPUT_DIR``).

    Returns:
        The sinks; empty when nothing is switched on or on ranks other than 0.

    Raises:
        configs.config.ConfigError: ``LOG.TENSORBOARD`` is on and tensorboard is not installed.
    """
    sinks: list[MetricSink] = []
    if not is_main_process():
        return sinks
    if cfg.LOG.TENSORBOARD:
        log_dir = os.path.join(cfg.OUTPUT_DIR, TENSORBOARD_DIR)
        try:
            sinks.append(TensorBoardSink(log_dir))
        except ImportError as err:
            from configs.config import ConfigError

            raise ConfigError(
                f"LOG.TENSORBOARD is True but the tensorboard package is not installed: "
                f"{TENSORBOARD_INSTALL}, or set LOG.TENSORBOARD False"
            ) from err
        logger.info("TensorBoard event files in %s (tensorboard --logdir %s)", log_dir, log_dir)
    return sinks


def set_metric_sinks(sinks: Sequence[MetricSink]) -> list[MetricSink]:
    """Replace the installed sinks (the old ones are returned, not closed).

    Args:
        sinks: the new sinks.

    Returns:
        The sinks installed before.
    """
    old = list(_SINKS)
    _SINKS[:] = list(sinks)
    return old


def register_sink(sink: MetricSink) -> None:
    """Install one more sink.

    Args:
        sink: a callable taking one record.
    """
    _SINKS.append(sink)


def emit_metrics(record: Mapping[str, Any]) -> None:
    """Hand one record to every installed sink (``append_metrics`` calls this after writing).

    Args:
        record: the record as written to ``metrics.jsonl`` (with its ``time``).
    """
    for sink in _SINKS:
        sink(record)


def close_metric_sinks() -> None:
    """Close every installed sink that has a ``close()`` and uninstall them all."""
    for sink in set_metric_sinks([]):
        close = getattr(sink, "close", None)
        if close is not None:
            close()


@contextlib.contextmanager
def run_logging(
    sinks: Sequence[MetricSink], output_dir: str, curves: bool
) -> Iterator[list[MetricSink]]:
    """Install a run's metric sinks; on exit close them and draw its learning curves.

    The curves are drawn from ``output_dir/metrics.jsonl`` on rank 0, also after an error (a
    failed drawing is logged as a warning and does not hide the run's own error). The sinks
    installed before are restored on exit.

    Args:
        sinks: the run's sinks (:func:`build_metric_sinks`).
        output_dir: the run folder.
        curves: draw ``output_dir/learning_curves.png`` at the end.

    Yields:
        The installed sinks.
    """
    previous = set_metric_sinks(sinks)
    try:
        yield list(sinks)
    finally:
        close_metric_sinks()
        set_metric_sinks(previous)
        metrics = os.path.join(output_dir, METRICS_FILE)
        if curves and is_main_process() and os.path.isfile(metrics):
            from utils.learning_curves import plot_learning_curves

            try:
                plot_learning_curves(output_dir, os.path.join(output_dir, CURVES_FILE))
            except Exception as err:  # a figure must never turn a finished run into a failure
                logger.warning("learning curves not drawn: %s", err)


def build_run_logging(cfg: CfgNode) -> contextlib.AbstractContextManager[list[MetricSink]]:
    """:func:`run_logging` as a run's config asks (``LOG.TENSORBOARD``, ``LOG.CURVES``).

    Use as ``with build_run_logging(cfg): ...`` around a run's training.

    Args:
        cfg: the run configuration.

    Returns:
        The context manager.

    Raises:
        configs.config.ConfigError: ``LOG.TENSORBOARD`` is on and tensorboard is not installed.
    """
    return run_logging(build_metric_sinks(cfg), cfg.OUTPUT_DIR, bool(cfg.LOG.CURVES))
