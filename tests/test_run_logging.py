"""Metric sinks (TensorBoard fed the metrics.jsonl records) and the learning-curve figures."""

import json
import sys

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from configs.config import ConfigError, load_cfg
from tools import plot_curves
from utils import metric_sinks
from utils.cli import UsageError
from utils.learning_curves import learning_curve_figure, read_metrics, stage_curves
from utils.metric_sinks import (
    TensorBoardSink,
    build_metric_sinks,
    build_run_logging,
    close_metric_sinks,
    emit_metrics,
    record_scalars,
    set_metric_sinks,
)

# Every record shape a run writes: stage-1 and stage-2 epochs, evaluations, the PCL memory bank
# and clustering, and a resumed run's repeat of stage-2 epoch 2 (the later record wins).
RECORDS = [
    {"time": 100.0, "stage": 1, "epoch": 1, "lr": 1e-4, "loss": 7.0, "i2t": 4.0, "t2i": 3.0},
    {"time": 101.0, "stage": 1, "epoch": 2, "lr": 1e-6, "loss": 6.5, "i2t": 3.5, "t2i": 3.0},
    {"time": 102.0, "stage": 2, "epoch": 1, "memory_bank": [3, 96], "clusters": 3, "outliers": 1,
     "clustered_images": 23},
    {"time": 103.0, "stage": 2, "epoch": 1, "lr": 1e-3, "img_per_s": 600.0, "loss": 8.0,
     "id": 0.9, "tri": 3.0, "acc": 0.25},
    {"time": 104.0, "stage": 2, "epoch": 1, "eval": {"mAP": 0.125, "rank1": 0.5, "rank5": 0.75,
     "num_valid_queries": 12}},
    {"time": 105.0, "stage": 2, "epoch": 2, "lr": 1e-3, "img_per_s": 500.0, "loss": 9.0,
     "id": 1.0, "tri": 4.0, "acc": 0.0},
    {"time": 106.0, "stage": 2, "epoch": 2, "lr": 5e-4, "img_per_s": 550.0, "loss": 6.0,
     "id": 0.5, "tri": 2.5, "acc": 0.5},
    {"time": 107.0, "stage": 2, "epoch": 2, "eval": {"mAP": 0.25, "rank1": 0.75, "rank5": 1.0,
     "num_valid_queries": 12}},
]  # fmt: skip


def _write_run(folder, records=RECORDS):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_record_scalars_hand_worked():
    step, wall, scalars = record_scalars(RECORDS[2])
    assert (step, wall) == (1, 102.0)
    assert scalars == {
        "stage2/memory_bank/0": 3.0,
        "stage2/memory_bank/1": 96.0,
        "stage2/clusters": 3.0,
        "stage2/outliers": 1.0,
        "stage2/clustered_images": 23.0,
    }
    step, wall, scalars = record_scalars({"step": 40, "epoch": 2, "eval": {"a": {"mAP": 1}}})
    assert (step, wall, scalars) == (40, None, {"eval/a/mAP": 1.0})
    assert record_scalars({"stage": 1, "epoch": 1, "note": "x", "v": None})[2] == {}


def _record_values(records, tag, step):
    """(value, time) of ``tag`` at ``step`` in every record holding it, looked up by hand."""
    stage, *path = tag.split("/")
    found = []
    for r in records:
        if f"stage{r['stage']}" != stage or r["epoch"] != step or path[0] not in r:
            continue
        value = r
        for part in path:
            value = value[int(part)] if isinstance(value, list) else value[part]
        found.append((pytest.approx(value, rel=1e-6), r["time"]))
    return found


def test_tensorboard_events_read_back_equal_the_records(tmp_path):
    log_dir = tmp_path / "tb"
    previous = set_metric_sinks([TensorBoardSink(str(log_dir))])
    try:
        for record in RECORDS:
            emit_metrics(record)
    finally:
        close_metric_sinks()
        set_metric_sinks(previous)
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {
        "stage1/lr", "stage1/loss", "stage1/i2t", "stage1/t2i",
        "stage2/memory_bank/0", "stage2/memory_bank/1", "stage2/clusters", "stage2/outliers",
        "stage2/clustered_images", "stage2/lr", "stage2/img_per_s", "stage2/loss", "stage2/id",
        "stage2/tri", "stage2/acc", "stage2/eval/mAP", "stage2/eval/rank1", "stage2/eval/rank5",
        "stage2/eval/num_valid_queries",
    }  # fmt: skip
    n_events = 0
    for tag in tags:
        events = acc.Scalars(tag)
        n_events += len(events)
        for step in {e.step for e in events}:
            # A resumed run's repeated epoch appears as both records, in order.
            got = [(e.value, e.wall_time) for e in events if e.step == step]
            assert got == _record_values(RECORDS, tag, step), tag
    # One event per number of every record: 2 x 4 (stage 1) + 5 (memory) + 3 x 6 + 2 x 4 (eval).
    assert n_events == 39


def test_build_metric_sinks_from_the_config(tmp_path, monkeypatch):
    off = load_cfg(None, ["OUTPUT_DIR", str(tmp_path)])
    assert build_metric_sinks(off) == []
    on = load_cfg(None, ["OUTPUT_DIR", str(tmp_path), "LOG.TENSORBOARD", "True"])
    (sink,) = build_metric_sinks(on)
    assert isinstance(sink, TensorBoardSink)
    assert sink.log_dir == str(tmp_path / metric_sinks.TENSORBOARD_DIR)
    sink.close()
    # Without the package the error names the key and the install command.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r"LOG.TENSORBOARD .* pip install tensorboard"):
        build_metric_sinks(on)


def test_run_logging_installs_closes_and_draws_the_curves(tmp_path):
    out = tmp_path / "run"
    cfg = load_cfg(None, ["OUTPUT_DIR", str(out), "LOG.TENSORBOARD", "True"])
    seen = []
    previous = set_metric_sinks([seen.append])
    try:
        with pytest.raises(RuntimeError, match="crash"):
            with build_run_logging(cfg) as sinks:
                assert metric_sinks._SINKS == sinks and len(sinks) == 1
                _write_run(out, RECORDS[:2])
                for record in RECORDS[:2]:
                    emit_metrics(record)
                raise RuntimeError("crash")
        # The run's sinks are gone (the earlier ones back), the curves drawn despite the error.
        assert metric_sinks._SINKS == [seen.append] and seen == []
    finally:
        set_metric_sinks(previous)
    assert (out / metric_sinks.CURVES_FILE).stat().st_size > 1000
    acc = EventAccumulator(str(out / metric_sinks.TENSORBOARD_DIR))
    acc.Reload()
    assert [e.value for e in acc.Scalars("stage1/loss")] == [7.0, 6.5]
    # LOG.CURVES False draws nothing.
    other = tmp_path / "other"
    _write_run(other)
    with build_run_logging(load_cfg(None, ["OUTPUT_DIR", str(other), "LOG.CURVES", "False"])):
        pass
    assert not (other / metric_sinks.CURVES_FILE).exists()


def test_curve_lines_equal_the_records():
    fig = learning_curve_figure(RECORDS)
    lines = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            lines[(ax.get_title(), line.get_label())] = line.get_xydata().tolist()
    s1, s2 = "stage 1: ", "stage 2: "
    assert lines == {
        (s1 + "loss terms", "loss"): [[1, 7.0], [2, 6.5]],
        (s1 + "loss terms", "i2t"): [[1, 4.0], [2, 3.5]],
        (s1 + "loss terms", "t2i"): [[1, 3.0], [2, 3.0]],
        (s1 + "learning rate", "lr"): [[1, 1e-4], [2, 1e-6]],
        (s2 + "loss terms", "loss"): [[1, 8.0], [2, 6.0]],
        (s2 + "loss terms", "id"): [[1, 0.9], [2, 0.5]],
        (s2 + "loss terms", "tri"): [[1, 3.0], [2, 2.5]],
        (s2 + "learning rate", "lr"): [[1, 1e-3], [2, 5e-4]],
        (s2 + "evaluation (%)", "train acc"): [[1, 25.0], [2, 50.0]],
        (s2 + "evaluation (%)", "mAP"): [[1, 12.5], [2, 25.0]],
        (s2 + "evaluation (%)", "rank1"): [[1, 50.0], [2, 75.0]],
        (s2 + "DBSCAN", "clusters"): [[1, 3.0]],
        (s2 + "DBSCAN", "outliers"): [[1, 1.0]],
    }
    # 2 stages x 4 panels (the DBSCAN column appears because a record has clusters).
    assert len(fig.axes) == 8
    assert [c.stage for c in stage_curves(RECORDS)] == [1, 2]


def test_plot_curves_tool_writes_the_png(tmp_path, capsys):
    run = _write_run(tmp_path / "run", RECORDS[:2] + RECORDS[3:])
    png = tmp_path / "curves.png"
    assert plot_curves.main([str(run), "--out", str(png)]) == str(png)
    assert capsys.readouterr().out.strip() == str(png)
    with Image.open(png) as img:
        # 3 columns (no clustering) x 2 stages of 4.0 x 2.8 inches at 100 dpi.
        assert img.size == (1200, 560)
    # Default path: beside metrics.jsonl.
    assert plot_curves.main([str(run)]) == str(run / metric_sinks.CURVES_FILE)


def test_metrics_file_errors(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
        plot_curves.main([str(tmp_path)])
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps(r) for r in RECORDS[:2]]
    # A last line cut short (a killed run) is skipped with a warning...
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"time": 1')
    assert len(read_metrics(str(run))) == 2
    assert "cut short" in caplog.text
    # ...a corrupt line before the end is an error naming it.
    (run / "metrics.jsonl").write_text('{"time": 1\n' + "\n".join(lines))
    with pytest.raises(UsageError, match=r"metrics.jsonl line 1 is not a JSON record"):
        plot_curves.main([str(run)])
    (run / "metrics.jsonl").write_text('{"final": 1}\n')
    with pytest.raises(UsageError, match="no per-epoch record"):
        plot_curves.main([str(run)])


def test_training_run_feeds_tensorboard_the_metrics_records_and_draws_curves(tmp_path):
    """LOG.TENSORBOARD in a real run: the events equal metrics.jsonl; the curves PNG is written."""
    import train_clipreid
    from tests.conftest import tiny_run_opts

    out = tmp_path / "run"
    extra = ["LOG.TENSORBOARD", "True", "SOLVER.STAGE2.EVAL_PERIOD", "1"]
    train_clipreid.main(tiny_run_opts(tmp_path / "data", out, s1=1, s2=2, extra=extra))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(out / metric_sinks.TENSORBOARD_DIR), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"stage1/loss", "stage2/loss", "stage2/tri", "stage2/eval/mAP"} <= tags
    for tag in tags:
        for event in acc.Scalars(tag):
            assert [(event.value, event.wall_time)] == _record_values(records, tag, event.step)
    assert Image.open(out / "learning_curves.png").size[0] > 0
