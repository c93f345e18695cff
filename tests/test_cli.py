"""utils.cli: overrides anywhere, both flag spellings, --resume in every position, run_main."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from configs.config import ConfigError, load_cfg
from datasets.bases import DatasetLayoutError
from model.loading import CheckpointMismatchError
from tests.conftest import ROOT, restored_root_logger
from utils.checkpoint import CheckpointFormatError
from utils.cli import (
    DEBUG_ENV,
    EXIT_USER_ERROR,
    USER_ERRORS,
    UsageError,
    is_override_key,
    is_user_error,
    parse_and_setup,
    parse_command_line,
    run_main,
    split_overrides,
)
from utils.registry import UnknownNameError

DEMO = "configs/demo/clipreid_tiny.yml"


@pytest.fixture(autouse=True)
def _restore_logging():
    """parse_and_setup configures the root logger as entry scripts do; put it back."""
    with restored_root_logger():
        yield


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------
def test_override_keys_are_recognised_by_the_config_sections():
    for key in ("MODEL.NAME", "SOLVER.STAGE2.BASE_LR", "OUTPUT_DIR", "MODEL.PRETRAIN_CHOICE"):
        assert is_override_key(key), key
    for token in ("RESULTS.MD", "model.name", "MODEL", "MODEL.name", "runs/x", "--resume", "OUT"):
        assert not is_override_key(token), token


def test_split_overrides_anywhere_and_both_spellings():
    argv = ["MODEL.DEVICE", "cpu", "--config_file", "a.yml", "OUTPUT_DIR", "o", "--num_views=2"]
    argv += ["--out", "RESULTS.MD", "TEST.MAX_RANK", "-1", "--", "SOLVER.SEED", "3"]
    args, opts = split_overrides(argv)
    assert args == ["--config-file", "a.yml", "--num-views=2", "--out", "RESULTS.MD"]
    assert opts == ["MODEL.DEVICE", "cpu", "OUTPUT_DIR", "o", "TEST.MAX_RANK", "-1"] + [
        "SOLVER.SEED",
        "3",
    ]
    # Without a config nothing is an override; flag spellings are still unified.
    assert split_overrides(["--num_ids", "3", "MODEL.NAME", "x"], overrides=False) == (
        ["--num-ids", "3", "MODEL.NAME", "x"],
        [],
    )
    with pytest.raises(UsageError, match="OUTPUT_DIR has no value"):
        split_overrides(["--resume", "OUTPUT_DIR"])
    with pytest.raises(UsageError, match="pairs"):
        split_overrides(["--", "MODEL.NAME"])


RESUME_CASES = [
    # (command line, the overrides it gives, SOLVER.RESUME)
    # The README's form, overrides before --resume (argparse REMAINDER said 'odd count').
    (["--config-file", DEMO, "OUTPUT_DIR", "d", "--resume"], ["OUTPUT_DIR", "d"], "auto"),
    # --resume followed by an override key (REMAINDER took OUTPUT_DIR as the path).
    (["--resume", "OUTPUT_DIR", "d"], ["OUTPUT_DIR", "d"], "auto"),
    (["--resume", "runs/x/last.pth", "OUTPUT_DIR", "d"], ["OUTPUT_DIR", "d"], "runs/x/last.pth"),
    (["OUTPUT_DIR", "d", "--resume", "runs/x/last.pth"], ["OUTPUT_DIR", "d"], "runs/x/last.pth"),
    (["--resume", "--config_file", DEMO, "MODEL.DEVICE", "cpu"], ["MODEL.DEVICE", "cpu"], "auto"),
    (["--resume=ckpt/last.pth", "MODEL.DEVICE", "cpu"], ["MODEL.DEVICE", "cpu"], "ckpt/last.pth"),
    (
        ["MODEL.DEVICE", "cpu", "--resume", "--", "OUTPUT_DIR", "d"],
        ["MODEL.DEVICE", "cpu", "OUTPUT_DIR", "d"],
        "auto",
    ),
    (["--config-file", DEMO, "MODEL.DEVICE", "cpu"], ["MODEL.DEVICE", "cpu"], None),
]


@pytest.mark.parametrize(("argv", "opts", "resume"), RESUME_CASES)
def test_resume_works_anywhere(argv, opts, resume):
    config, got, _ = parse_command_line(argv, "test", resume_flag=True)
    assert config == (DEMO if DEMO in argv else "")
    assert got == [*opts, *(["SOLVER.RESUME", resume] if resume else [])]
    cfg = load_cfg(os.path.join(ROOT, config) if config else None, got)
    assert cfg.SOLVER.RESUME == (resume or "")
    if "OUTPUT_DIR" in opts:
        assert cfg.OUTPUT_DIR == "d"


def test_resume_through_parse_and_setup(tmp_path):
    out = tmp_path / "run"
    argv = ["--config_file", os.path.join(ROOT, DEMO), "OUTPUT_DIR", str(out)]
    argv += ["MODEL.DEVICE", "cpu", "--resume"]
    cfg, device, _ = parse_and_setup(argv, "test", "log.txt", resume_flag=True)
    assert cfg.SOLVER.RESUME == "auto" and cfg.OUTPUT_DIR == str(out) and device.type == "cpu"
    saved = load_cfg(str(out / "config.yaml"))
    assert saved.SOLVER.RESUME == "auto" and (out / "log.txt").is_file()


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------
def test_every_user_error_entry_names_an_exception_class():
    for entry in USER_ERRORS:
        module, name = entry.split(":")
        cls = getattr(importlib.import_module(module), name)
        assert isinstance(cls, type) and issubclass(cls, Exception), entry
        assert is_user_error(cls("x")), entry
    assert not is_user_error(RuntimeError("a bug")) and not is_user_error(KeyError("k"))


USER_ERROR_CASES = [
    ConfigError("MODEL.NAME = 'x' is not valid"),
    FileNotFoundError("TEST.WEIGHT 'w.pth' does not exist"),
    UsageError("--topk must be positive"),
    CheckpointFormatError("TEST.WEIGHT 'c.yml' is a text file"),
    CheckpointMismatchError("set MODEL.SIE_CAMERA True"),
    DatasetLayoutError("market1501: folder missing"),
    UnknownNameError("unknown MODEL.NAME 'x'; valid: RN50"),
]


@pytest.mark.parametrize("err", USER_ERROR_CASES, ids=lambda e: type(e).__name__)
def test_user_errors_exit_2_with_the_message_alone(err, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    seen = []

    def main(argv):
        seen.append(argv)
        raise err

    with pytest.raises(SystemExit) as exit_:
        run_main(main, ["--config-file", "a.yml"])
    assert exit_.value.code == EXIT_USER_ERROR == 2
    assert capsys.readouterr().err == f"error: {err}\n"
    assert seen == [["--config-file", "a.yml"]]


def test_debug_shows_the_traceback(capsys, monkeypatch):
    def main(argv):
        assert "--debug" not in argv
        raise ConfigError("bad key")

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit):
        run_main(main, ["--debug", "MODEL.DEVICE", "cpu"])
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("error: bad key\n")
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(SystemExit) as exit_:
        run_main(main, [])
    assert exit_.value.code == 2 and "Traceback" in capsys.readouterr().err


def test_bugs_propagate_and_return_values_are_exit_codes():
    def bug(argv):
        raise ZeroDivisionError("oops")

    with pytest.raises(ZeroDivisionError):
        run_main(bug, [])
    for result, code in ((3, 3), ({"mAP": 0.5}, 0), (None, 0), (True, 0)):
        with pytest.raises(SystemExit) as exit_:
            run_main(lambda argv, r=result: r, [])
        assert exit_.value.code == code

    def interrupted(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_:
        run_main(interrupted, [])
    assert exit_.value.code == 130


def _run(args, **env):
    environ = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env={**environ, **env}
    )


def test_entry_script_and_tool_print_one_line_and_exit_2(tmp_path):
    missing = str(tmp_path / "missing.yml")
    proc = _run(["train_clipreid.py", "--config-file", missing, "OUTPUT_DIR", str(tmp_path)])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and missing in lines[0], lines
    proc = _run(["-m", "tools.reproduce", "--rows", "table9", "--dry-run"])
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown row group 'table9'")
    assert "Traceback" not in proc.stderr
    proc = _run(["-m", "tools.reproduce", "--rows", "table9"], **{DEBUG_ENV: "1"})
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "table9" in proc.stderr
