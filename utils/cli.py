"""Command-line front end shared by the entry scripts: parse, load the config, set up the run."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

import torch
from yacs.config import CfgNode

from configs.config import load_cfg, save_cfg
from utils.dist import get_rank, init_distributed
from utils.logger import setup_logger

logger = logging.getLogger(__name__)


def parse_and_setup(
    argv: Sequence[str] | None,
    description: str,
    log_name: str,
    resume_flag: bool = False,
    config_name: str = "config.yaml",
) -> tuple[CfgNode, torch.device]:
    """Parse ``--config_file FILE [KEY VALUE ...]``, build the config, logging and the device.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) this also joins the process group
    (:func:`utils.dist.init_distributed`); the caller leaves it with :func:`utils.dist.cleanup`.

    Args:
        argv: arguments without the program name (None: ``sys.argv[1:]``).
        description: the program's help text.
        log_name: log file name inside OUTPUT_DIR.
        resume_flag: accept ``--resume [PATH]`` (sets SOLVER.RESUME; 'auto' without a path).
        config_name: name of the resolved config written to OUTPUT_DIR.

    Returns:
        (frozen config, device).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config_file", default="", help="YAML config file")
    if resume_flag:
        parser.add_argument(
            "--resume",
            nargs="?",
            const="auto",
            default=None,
            help="resume from a checkpoint path, or OUTPUT_DIR/last.pth when no path is given",
        )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    opts = list(args.opts)
    if resume_flag and args.resume is not None:
        opts += ["SOLVER.RESUME", args.resume]
    # Load once without logging set up, then log to OUTPUT_DIR (warnings are re-emitted there).
    logging.disable(logging.WARNING)
    try:
        cfg = load_cfg(args.config_file or None, opts)
    finally:
        logging.disable(logging.NOTSET)
    # Under torchrun (WORLD_SIZE > 1) join the process group first: the logger needs the rank.
    device = init_distributed(cfg.MODEL.DEVICE)
    setup_logger(cfg.OUTPUT_DIR, get_rank(), log_name)
    cfg = load_cfg(args.config_file or None, opts)
    logger.info("config file: %s; overrides: %s", args.config_file or "(defaults)", opts)
    logger.info("running with config:\n%s", cfg.dump())
    if get_rank() == 0:
        save_cfg(cfg, os.path.join(cfg.OUTPUT_DIR, config_name))
    logger.info("device: %s", device)
    return cfg, device
