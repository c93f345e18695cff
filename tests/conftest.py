"""Test setup: the repository root on sys.path and fast, deterministic torch settings."""

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

# Tiny models run fastest single-threaded, and a busy machine cannot stall them in thread sync.
torch.set_num_threads(1)


@contextlib.contextmanager
def restored_root_logger() -> Iterator[None]:
    """Undo what an entry script's logging set-up does to the root logger (handlers, level)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)
        logging.captureWarnings(False)


class PickleExploit:
    """Pickles to a call of ``os.system`` that creates ``marker`` when unpickled (a crafted .pth).

    Args:
        marker: path of the file the command would create.
    """

    def __init__(self, marker: str) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
