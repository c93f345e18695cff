"""utils.logger: the one progress display (tqdm on a terminal, periodic log lines otherwise)."""

import logging

import utils.logger
from utils.logger import Progress, progress


def _lines(caplog, prefix):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]


def test_progress_counts_and_logs_off_a_terminal(monkeypatch, caplog):
    monkeypatch.setattr(utils.logger, "LOG_PERIOD_S", 0.0)
    monkeypatch.setattr(utils.logger, "interactive", lambda: False)
    log = logging.getLogger("tests.progress")
    with caplog.at_level("INFO", logger="tests.progress"):
        bar = Progress(10, "rows test", "rows", log=log)
        bar.update(4)
        bar.update(6)  # the last update logs nothing: the work is done
        bar.close()
    lines = _lines(caplog, "rows test")
    assert len(lines) == 1 and lines[0].startswith("rows test: 4/10 rows (40%)")
    assert all(r.name == "tests.progress" for r in caplog.records if r.getMessage() in lines)
    assert bar.done == 10


def test_progress_wrapper_yields_every_item_and_logs_only_when_asked(monkeypatch, caplog):
    monkeypatch.setattr(utils.logger, "LOG_PERIOD_S", 0.0)
    monkeypatch.setattr(utils.logger, "interactive", lambda: False)
    with caplog.at_level("INFO", logger="utils.logger"):
        assert list(progress(range(5), total=5, desc="quiet")) == [0, 1, 2, 3, 4]
        assert list(progress(iter(range(3)), desc="loud", unit="batches", log_lines=True)) == [
            0,
            1,
            2,
        ]
    assert not _lines(caplog, "quiet")
    # Without a total: counts and elapsed time only, one line per item with a zero period.
    assert [line.split(",")[0] for line in _lines(caplog, "loud")] == [
        "loud: 1 batches",
        "loud: 2 batches",
        "loud: 3 batches",
    ]


def test_disabled_progress_shows_nothing(monkeypatch, caplog):
    monkeypatch.setattr(utils.logger, "LOG_PERIOD_S", 0.0)
    with caplog.at_level("INFO", logger="utils.logger"):
        bar = Progress(4, "off test", enabled=False)
        bar.update(1)
        bar.close()
    assert bar.bar is None and not _lines(caplog, "off test")
