"""Atomic checkpoint files: written to a temporary name, then moved into place."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from utils.dist import is_main_process

logger = logging.getLogger(__name__)


def save_checkpoint(state: dict[str, Any], path: str) -> None:
    """Write ``state`` to ``path`` atomically (rank 0 only).

    A crash while writing leaves the previous file intact: the data goes to ``path.tmp`` first
    and is moved over ``path`` with ``os.replace``.

    Args:
        state: tensors, numbers, strings and containers of them.
        path: destination file; its folder is created.
    """
    if not is_main_process():
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    logger.info("saved %s", path)


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (or any plain state dict) on the CPU.

    Args:
        path: the file.

    Returns:
        The stored object (a dict).

    Raises:
        FileNotFoundError: naming the path.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    return torch.load(path, map_location="cpu", weights_only=True)
