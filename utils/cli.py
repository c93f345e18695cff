"""Command-line layer shared by the entry scripts and every tool.

Arguments: flags are spelled with dashes (``--config-file``, ``--num-views``); the underscore
spelling (``--config_file``) is accepted everywhere too. ``KEY VALUE`` config overrides
(``OUTPUT_DIR runs/x``, ``MODEL.DEVICE cpu``: keys of ``configs/defaults.py``) may come anywhere on
the line, before, between or after the flags, and everything after a bare ``--`` is overrides.
Because overrides are recognised by their key, a flag with an optional value such as
``--resume [PATH]`` works in any position: ``--resume OUTPUT_DIR d`` is a bare ``--resume``.

Errors: :func:`run_main` runs a ``main(argv)`` as a program. An error that is the user's to fix
(a config, dataset layout, checkpoint, missing file or unknown name) prints its message alone on
stderr and exits with status 2 (:data:`EXIT_USER_ERROR`); ``--debug`` or ``CLIPREID_DEBUG=1``
also prints the traceback. Any other exception is a bug and propagates with its traceback.

torch is imported only by :func:`parse_and_setup`: tools that plan runs or write tables use the
argument helpers without loading it.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from configs.config import load_cfg, save_cfg

if TYPE_CHECKING:
    import torch
    from yacs.config import CfgNode

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2  # as argparse's own usage errors
DEBUG_ENV = "CLIPREID_DEBUG"
DEBUG_FLAG = "--debug"
FLAGS_HELP = (
    "Flags also accept underscores (--config_file). Errors print their message alone; "
    f"{DEBUG_FLAG} or {DEBUG_ENV}=1 shows the traceback."
)
OVERRIDES_HELP = (
    "KEY VALUE config overrides (e.g. OUTPUT_DIR runs/x MODEL.DEVICE cpu) may come anywhere on "
    "the command line, or after a bare '--'. " + FLAGS_HELP
)
# Exception types whose message tells the user what to fix, as "module:Class". They are looked
# up among the modules already imported (an exception's class always is), so this module does
# not import the model or dataset code; tests check that every entry resolves.
USER_ERRORS = (
    "configs.config:ConfigError",
    "datasets.bases:DatasetLayoutError",
    "datasets.bases:DatasetFormatError",
    "datasets.bases:CorruptImageError",
    "model.loading:CheckpointMismatchError",
    "model.weights:WeightsUnavailableError",
    "utils.checkpoint:CheckpointFormatError",
    "utils.registry:UnknownNameError",
    "processor.train:RunDirError",
    "utils.ann:MissingDependencyError",
    "processor.train:ResumeConfigError",
)
# A run that stopped for a reason its message explains (exit status 1, no traceback): training
# diverged, or finished but could not be evaluated.
RUN_STOPS = (
    "processor.common:NonFiniteLossError",
    "processor.train:EvaluationFailedError",
)
_PART = re.compile(r"[A-Z0-9_]+")


class UsageError(ValueError):
    """A command-line argument or input is unusable; the message says what to change."""


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------
@functools.cache
def _top_level_keys() -> tuple[frozenset[str], frozenset[str]]:
    """(section names, top-level leaf keys) of the config defaults."""
    from yacs.config import CfgNode

    from configs.defaults import get_cfg_defaults

    cfg = get_cfg_defaults()
    sections = frozenset(k for k, v in cfg.items() if isinstance(v, CfgNode))
    return sections, frozenset(cfg) - sections


def is_override_key(token: str) -> bool:
    """Whether a command-line token is a config key: ``SECTION.KEY[.SUB...]`` or ``OUTPUT_DIR``.

    Args:
        token: one command-line token.

    Returns:
        True when its first part is a section of the config defaults (or it is a top-level key)
        and every part is UPPER_CASE; e.g. ``MODEL.NAME`` and ``OUTPUT_DIR``, not ``RESULTS.MD``.
    """
    sections, leaves = _top_level_keys()
    if token in leaves:
        return True
    parts = token.split(".")
    return len(parts) > 1 and parts[0] in sections and all(_PART.fullmatch(p) for p in parts)


def _dashed(token: str) -> str:
    """``--config_file[=x]`` -> ``--config-file[=x]``; other tokens unchanged."""
    if not token.startswith("--") or len(token) == 2:
        return token
    name, eq, value = token.partition("=")
    return name.replace("_", "-") + eq + value


def split_overrides(argv: Sequence[str], overrides: bool = True) -> tuple[list[str], list[str]]:
    """Separate ``KEY VALUE`` config overrides from a program's own arguments.

    A config key (:func:`is_override_key`) takes the next token as its value, wherever it
    stands; everything after a bare ``--`` is overrides. Flag names get dashes for underscores.

    Args:
        argv: the command line without the program name.
        overrides: False for programs without a config: nothing is taken as an override.

    Returns:
        (the program's arguments, flat ``[KEY, VALUE, ...]`` list).

    Raises:
        UsageError: a key without a value, or an odd number of tokens after ``--``.
    """
    args: list[str] = []
    opts: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if overrides and token == "--":
            opts += list(argv[i + 1 :])
            break
        if overrides and is_override_key(token):
            if i + 1 >= len(argv):
                raise UsageError(f"the config override {token} has no value (KEY VALUE)")
            opts += [token, argv[i + 1]]
            i += 2
            continue
        args.append(_dashed(token))
        i += 1
    if len(opts) % 2:
        raise UsageError(f"config overrides come in KEY VALUE pairs; got {opts}")
    return args, opts


def make_parser(
    description: str,
    prog: str | None = None,
    config: str | None = "optional",
    overrides: bool = True,
) -> argparse.ArgumentParser:
    """An argument parser with the shared flags: ``--config-file`` and ``--debug``.

    Args:
        description: the program's help text.
        prog: the program as users call it (e.g. 'python -m tools.search').
        config: 'optional' or 'required' adds ``--config-file``; None leaves it out.
        overrides: whether the program takes ``KEY VALUE`` config overrides (for the help).

    Returns:
        The parser; its epilog explains overrides, spellings and ``--debug``.
    """
    epilog = OVERRIDES_HELP if overrides else FLAGS_HELP
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog)
    if config is not None:
        add_config_argument(parser, required=config == "required")
    parser.add_argument(
        DEBUG_FLAG, action="store_true", help=f"show tracebacks of errors (or {DEBUG_ENV}=1)"
    )
    return parser


def add_config_argument(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """Add ``--config-file FILE`` (also spelled ``--config_file``) to a parser or sub-parser.

    Args:
        parser: the parser.
        required: whether the program needs a config file.
    """
    parser.add_argument(
        "--config-file",
        dest="config_file",
        default="",
        required=required,
        metavar="FILE",
        help="YAML config (this project's, an official CLIP-ReID one, or a run's config.yaml)",
    )


def add_num_views_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--num-views N``: a camera x view SIE checkpoint's views (its table does not say).

    Args:
        parser: the parser of a command that loads a trained checkpoint.
    """
    parser.add_argument(
        "--num-views", type=int, default=None, help="training views (camera x view SIE only)"
    )


def parse_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, overrides: bool = True
) -> tuple[argparse.Namespace, list[str]]:
    """Parse a command line: the program's flags with ``parser``, the config overrides apart.

    Args:
        parser: the program's parser (see :func:`make_parser`).
        argv: arguments without the program name (None: ``sys.argv[1:]``).
        overrides: whether the program takes ``KEY VALUE`` config overrides.

    Returns:
        (parsed flags, flat override list).
    """
    args, opts = split_overrides(sys.argv[1:] if argv is None else argv, overrides)
    return parser.parse_args(args), opts


def parse_command_line(
    argv: Sequence[str] | None,
    description: str,
    resume_flag: bool = False,
    prog: str | None = None,
    flags: Sequence[tuple[str, str]] = (),
) -> tuple[str, list[str], dict[str, bool]]:
    """The config file, overrides and switches of an entry script's command line (no side effects).

    Args:
        argv: arguments without the program name (None: ``sys.argv[1:]``).
        description: the program's help text.
        resume_flag: accept ``--resume [PATH]``.
        prog: the program name shown in the help.
        flags: on/off switches of the program, as (``--name``, help) pairs.

    Returns:
        (config file or '', overrides with ``SOLVER.RESUME`` appended for ``--resume``,
        switch name without dashes, dashes as underscores -> given).
    """
    parser = make_parser(description, prog)
    for name, help_text in flags:
        parser.add_argument(name, action="store_true", help=help_text)
    if resume_flag:
        parser.add_argument(
            "--resume",
            nargs="?",
            const="auto",
            default=None,
            metavar="PATH",
            help="resume from a training checkpoint; without PATH from OUTPUT_DIR/last.pth",
        )
    args, opts = parse_args(parser, argv)
    if resume_flag and args.resume is not None:
        opts += ["SOLVER.RESUME", args.resume]
    switches = {n.lstrip("-").replace("-", "_"): False for n, _ in flags}
    switches = {k: bool(getattr(args, k)) for k in switches}
    return args.config_file, opts, switches


def parse_and_setup(
    argv: Sequence[str] | None,
    description: str,
    log_name: str,
    resume_flag: bool = False,
    config_name: str = "config.yaml",
    prog: str | None = None,
    flags: Sequence[tuple[str, str]] = (),
    check: Callable[[CfgNode, dict[str, bool]], None] | None = None,
) -> tuple[CfgNode, torch.device, dict[str, bool]]:
    """Parse ``[--config-file FILE] [--resume [PATH]] [KEY VALUE ...]``; set up config, log, device.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) this also joins the process group
    (:func:`utils.dist.init_distributed`); the caller leaves it with :func:`utils.dist.cleanup`.

    Args:
        argv: arguments without the program name (None: ``sys.argv[1:]``).
        description: the program's help text.
        log_name: log file name inside OUTPUT_DIR.
        resume_flag: accept ``--resume [PATH]`` anywhere (sets SOLVER.RESUME; 'auto', i.e.
            OUTPUT_DIR/last.pth, without a path).
        config_name: name of the resolved config written to OUTPUT_DIR.
        prog: the program name shown in the help.
        flags: on/off switches, as (``--name``, help) pairs.
        check: called with the config and the switches before anything is written to
            OUTPUT_DIR (e.g. refusing to overwrite a run); raises to stop.

    Returns:
        (frozen config, ``torch.device``, switches as :func:`parse_command_line` returns them).

    Raises:
        configs.config.ConfigError: the config file or an override is invalid.
    """
    from utils.dist import get_rank, init_distributed
    from utils.logger import setup_logger

    config_file, opts, switches = parse_command_line(argv, description, resume_flag, prog, flags)
    # Load once without logging set up, then log to OUTPUT_DIR (warnings are re-emitted there).
    logging.disable(logging.WARNING)
    try:
        cfg = load_cfg(config_file or None, opts)
    finally:
        logging.disable(logging.NOTSET)
    if check is not None:
        check(cfg, switches)
    # Under torchrun (WORLD_SIZE > 1) join the process group first: the logger needs the rank.
    device = init_distributed(cfg.MODEL.DEVICE)
    setup_logger(cfg.OUTPUT_DIR, get_rank(), log_name)
    cfg = load_cfg(config_file or None, opts)
    logger.info("config file: %s; overrides: %s", config_file or "(defaults)", opts)
    logger.info("running with config:\n%s", cfg.dump())
    if get_rank() == 0:
        save_cfg(cfg, os.path.join(cfg.OUTPUT_DIR, config_name))
    logger.info("device: %s", device)
    return cfg, device, switches


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------
def is_user_error(err: BaseException) -> bool:
    """Whether an exception is the user's to fix (its message says how), not a bug.

    Args:
        err: the exception.

    Returns:
        True for :class:`UsageError`, ``FileNotFoundError`` and the :data:`USER_ERRORS` types.
    """
    return isinstance(err, (UsageError, FileNotFoundError)) or _is_one_of(err, USER_ERRORS)


def _is_one_of(err: BaseException, entries: Sequence[str]) -> bool:
    """Whether ``err`` is an instance of a 'module:Class' entry (modules not imported: no)."""
    for entry in entries:
        module, name = entry.split(":")
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(err, cls):
            return True
    return False


def run_main(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> NoReturn:
    """Run ``main(argv)`` as a program and exit.

    Exit status: ``main``'s return value when it is an int, else 0; 128 + the signal after a
    training stopped by SIGINT/SIGTERM (its resume hint on stderr); 1 after a run stopped for a
    reason its message explains (:data:`RUN_STOPS`); 2 after a user error (its
    message alone on stderr, the traceback too with ``--debug`` or ``CLIPREID_DEBUG=1``); 130
    on Ctrl-C. Other exceptions propagate with their traceback (exit status 1).

    Args:
        main: the program's ``main``; it receives the arguments without ``--debug``.
        argv: arguments without the program name (None: ``sys.argv[1:]``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    args = [a for a in args if a != DEBUG_FLAG]
    try:
        result = main(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        code = getattr(err, "exit_code", None)  # TrainingInterrupted: the signal's status
        if code is None and _is_one_of(err, RUN_STOPS):
            code = 1
        elif code is None and is_user_error(err):
            code = EXIT_USER_ERROR
        if code is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"{'error: ' if code == EXIT_USER_ERROR else ''}{err}", file=sys.stderr)
        sys.exit(code)
    sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)
