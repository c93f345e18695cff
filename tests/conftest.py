"""Test setup: the repository root on sys.path and fast, deterministic torch settings."""

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models run fastest single-threaded, and a busy machine cannot stall them in thread sync.
torch.set_num_threads(1)


def tiny_run_opts(root, out, s1=2, s2=2, extra=()):
    """Command-line overrides of a tiny end-to-end run (tiny ViT, 12 synthetic IDs, CPU).

    Args:
        root: DATASETS.ROOT_DIR (the synthetic set is generated there on first use).
        out: OUTPUT_DIR.
        s1: stage-1 epochs.
        s2: stage-2 epochs.
        extra: more ``KEY VALUE`` pairs, appended last (they win).

    Returns:
        The flat ``[KEY, VALUE, ...]`` list for ``load_cfg`` or ``train_clipreid.main``.
    """
    return [
        "MODEL.DEVICE", "cpu",
        "MODEL.NAME", "ViT-T-16-test",
        "MODEL.PRETRAIN_TAG", "none",
        "INPUT.SIZE_TRAIN", "[64, 32]",
        "INPUT.SIZE_TEST", "[64, 32]",
        "INPUT.PADDING", "4",
        "DATASETS.NAMES", "synthetic",
        "DATASETS.ROOT_DIR", str(root),
        "DATASETS.SYNTHETIC.NUM_IDS", "12",
        "DATASETS.SYNTHETIC.NUM_CAMERAS", "2",
        "DATASETS.SYNTHETIC.IMAGES_PER_ID_CAM", "2",
        "DATASETS.SYNTHETIC.SIZE", "[64, 32]",
        "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.STAGE1.IMS_PER_BATCH", "16",
        "SOLVER.STAGE1.MAX_EPOCHS", str(s1),
        "SOLVER.STAGE1.WARMUP_EPOCHS", "1",
        "SOLVER.STAGE1.CHECKPOINT_PERIOD", "1",
        "SOLVER.STAGE2.IMS_PER_BATCH", "8",
        "SOLVER.STAGE2.BASE_LR", "1e-3",
        "SOLVER.STAGE2.MAX_EPOCHS", str(s2),
        "SOLVER.STAGE2.WARMUP_ITERS", "1",
        "SOLVER.STAGE2.STEPS", "[100]",
        "SOLVER.STAGE2.CHECKPOINT_PERIOD", "1",
        "SOLVER.STAGE2.EVAL_PERIOD", "100",
        "TEST.IMS_PER_BATCH", "32",
        "OUTPUT_DIR", str(out),
        *extra,
    ]  # fmt: skip


def last_eval(out):
    """The last evaluation record of a run's ``metrics.jsonl``."""
    import json

    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r["eval"] for r in records if "eval" in r][-1]


@pytest.fixture(autouse=True, scope="module")
def _restore_root_logger_per_module():
    """Entry scripts and tools configure the root logger; every test module starts without."""
    with restored_root_logger():
        yield


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


def _forked_main(argv, fault):
    from train_clipreid import main
    from utils.cli import run_main
    from utils.faults import ENV

    if fault:
        os.environ[ENV] = fault
    run_main(main, argv)


def run_in_fork(argv, fault=""):
    """Run ``train_clipreid.py argv`` in a forked process, optionally with a fault injected.

    Args:
        argv: the command line (without the program name).
        fault: ``CLIPREID_FAULT`` for the child (see :mod:`utils.faults`), e.g. ``'write:3'``.

    Returns:
        The child's exit code (``-9`` when SIGKILL ended it).
    """
    import multiprocessing

    proc = multiprocessing.get_context("fork").Process(target=_forked_main, args=(argv, fault))
    proc.start()
    proc.join(300)
    return proc.exitcode


class MeanColour(torch.nn.Module):
    """A stand-in model: the feature of an image is its mean colour (plus a fixed projection)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Parameter(
            torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
        )

    def encode_image(self, images, camids=None, viewids=None):
        return images.mean(dim=(2, 3)) @ self.proj
