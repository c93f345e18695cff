"""Learning curves of a run, drawn from its ``metrics.jsonl`` (matplotlib, no display needed).

One row per training stage; columns: the loss terms per epoch, the learning rate, the evaluations
(mAP and Rank-1 in %, and the training accuracy), and, for unsupervised PCL-CLIP, the cluster
counts. A resumed run may repeat epochs in ``metrics.jsonl``; the last record of an epoch wins.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from utils.checkpoint import atomic_write
from utils.metric_sinks import CURVES_FILE, METRICS_FILE, PLACE_KEYS, flatten_scalars

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

# Training-record fields that are not loss terms.
NOT_LOSSES = ("lr", "img_per_s", "acc")
# Evaluation results plotted (the last part of their path), in % of queries.
EVAL_CURVES = ("mAP", "rank1")
# Unsupervised PCL-CLIP clustering fields plotted per epoch.
CLUSTER_CURVES = ("clusters", "outliers")
# Panel titles, in column order.
PANELS = {
    "loss": "loss terms",
    "lr": "learning rate",
    "eval": "evaluation (%)",
    "clusters": "DBSCAN",
}

# Points are marked on curves of at most this many epochs (longer ones read better as lines).
MARKERS_UP_TO = 30

Series = tuple[list[int], list[float]]


@dataclass
class StageCurves:
    """The curves of one training stage: name -> (epochs, values), epochs ascending.

    Attributes:
        stage: the stage number.
        loss: loss terms ('loss' is their weighted sum).
        lr: {'lr': ...} (the first parameter group's rate at the end of each epoch).
        eval: '{path}' of each evaluation result in :data:`EVAL_CURVES` (in %), and 'train acc'.
        clusters: :data:`CLUSTER_CURVES` of unsupervised PCL-CLIP.
    """

    stage: int
    loss: dict[str, Series] = field(default_factory=dict)
    lr: dict[str, Series] = field(default_factory=dict)
    eval: dict[str, Series] = field(default_factory=dict)
    clusters: dict[str, Series] = field(default_factory=dict)


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a run folder or the file itself).

    A last line cut short (a run killed while writing) is skipped with a warning.

    Args:
        path: run folder or ``metrics.jsonl`` path.

    Returns:
        The records in file order.

    Raises:
        FileNotFoundError: no ``metrics.jsonl`` there.
        ValueError: a line other than the last is not JSON (names the file and line).
    """
    file = os.path.join(path, METRICS_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} does not exist: give a run folder (OUTPUT_DIR) of a run")
    with open(file, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i < len(lines):
                raise ValueError(f"{file} line {i} is not a JSON record: {err}") from err
            logger.warning("%s: last line %d is cut short; skipped", file, i)
    return records


def _put(curves: dict[str, dict[int, float]], name: str, epoch: int, value: float) -> None:
    curves.setdefault(name, {})[epoch] = value


def _series(curves: dict[str, dict[int, float]]) -> dict[str, Series]:
    return {
        name: ([e for e in sorted(points)], [points[e] for e in sorted(points)])
        for name, points in curves.items()
    }


def stage_curves(records: Sequence[Mapping[str, Any]]) -> list[StageCurves]:
    """Sort the records of a run into per-stage curves.

    Args:
        records: ``metrics.jsonl`` records (see :func:`read_metrics`).

    Returns:
        One :class:`StageCurves` per stage, in stage order.
    """
    raw: dict[int, dict[str, dict[str, dict[int, float]]]] = {}
    for record in records:
        if "stage" not in record or "epoch" not in record:
            continue
        panels = raw.setdefault(int(record["stage"]), {p: {} for p in PANELS})
        epoch = int(record["epoch"])
        if "eval" in record:
            for path, value in flatten_scalars(record["eval"]).items():
                if path.rsplit("/", 1)[-1] in EVAL_CURVES:
                    _put(panels["eval"], path, epoch, 100.0 * value)
        if "lr" in record:
            _put(panels["lr"], "lr", epoch, float(record["lr"]))
            if "acc" in record:
                _put(panels["eval"], "train acc", epoch, 100.0 * float(record["acc"]))
            for key, value in record.items():
                if key not in PLACE_KEYS and key not in NOT_LOSSES and _is_number(value):
                    _put(panels["loss"], key, epoch, float(value))
        for key in CLUSTER_CURVES:
            if key in record and _is_number(record[key]):
                _put(panels["clusters"], key, epoch, float(record[key]))
    return [
        StageCurves(stage, **{p: _series(panels[p]) for p in PANELS})
        for stage, panels in sorted(raw.items())
    ]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def learning_curve_figure(records: Sequence[Mapping[str, Any]], title: str = "") -> Figure:
    """Draw the learning curves of a run (one row per stage, one panel per kind of curve).

    Each line's label is its curve name (``loss``, ``id``, ``mAP``, ``train acc``, ...) and its
    data are exactly the (epoch, value) points of :func:`stage_curves`.

    Args:
        records: ``metrics.jsonl`` records.
        title: figure title (e.g. the run folder).

    Returns:
        A matplotlib ``Figure`` (not attached to any pyplot window).

    Raises:
        ValueError: the records hold no per-epoch training record.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    stages = stage_curves(records)
    if not stages:
        raise ValueError("no per-epoch record (with 'stage' and 'epoch') to draw")
    columns = [p for p in PANELS if p != "clusters" or any(s.clusters for s in stages)]
    fig = Figure(figsize=(4.0 * len(columns), 2.8 * len(stages)), dpi=100, layout="constrained")
    axes = fig.subplots(len(stages), len(columns), squeeze=False)
    for row, curves in zip(axes, stages, strict=True):
        for ax, panel in zip(row, columns, strict=True):
            ax.set_title(f"stage {curves.stage}: {PANELS[panel]}", fontsize=9)
            series = getattr(curves, panel)
            if not series:
                ax.set_axis_off()
                ax.text(0.5, 0.5, "none in this stage", ha="center", transform=ax.transAxes)
                continue
            for name, (epochs, values) in series.items():
                style = "--" if name == "train acc" else "-"
                marker = "o" if len(epochs) <= MARKERS_UP_TO else None
                ax.plot(epochs, values, style, marker=marker, markersize=3, label=name)
            ax.set_xlabel("epoch", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if panel == "lr" and all(v > 0 for _, vs in series.values() for v in vs):
                ax.set_yscale("log")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_learning_curves(run_dir: str, out_path: str | None = None) -> str:
    """Draw a run's learning curves from its ``metrics.jsonl`` into a PNG (written atomically).

    Args:
        run_dir: the run folder (OUTPUT_DIR) or its ``metrics.jsonl``.
        out_path: PNG to write (default: ``learning_curves.png`` beside ``metrics.jsonl``).

    Returns:
        The PNG path.

    Raises:
        FileNotFoundError: no ``metrics.jsonl``.
        ValueError: it holds no per-epoch record.
    """
    records = read_metrics(run_dir)
    folder = run_dir if os.path.isdir(run_dir) else os.path.dirname(run_dir)
    out_path = out_path or os.path.join(folder, CURVES_FILE)
    fig = learning_curve_figure(records, title=os.path.basename(os.path.abspath(folder)))
    atomic_write(out_path, lambda tmp: fig.savefig(tmp, format="png"))
    logger.info("learning curves written to %s", out_path)
    return out_path
